"""A pytest plugin (`-p m3rt.benchmarks.live_failures`) that writes each failure's report as it happens.

pytest prints tracebacks at the end of the session; a run killed at its time-out never gets there.
With M3RT_TEST_FAILURES set to a file, each failed or erroring test phase is appended to it at once
as one JSON line: {"test", "when", "report"}.
"""

from __future__ import annotations

import json
import os
from typing import Any

MAX_REPORT_CHARS = 6000


def pytest_runtest_logreport(report: Any) -> None:
    path = os.environ.get("M3RT_TEST_FAILURES")
    if not path or not report.failed:
        return
    record = {"test": report.nodeid, "when": report.when, "report": str(report.longrepr)[-MAX_REPORT_CHARS:]}
    with open(path, "a", encoding="utf-8") as sink:
        sink.write(json.dumps(record) + "\n")
