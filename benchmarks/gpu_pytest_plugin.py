"""A pytest plugin for the GPU check's test run (`-p m3rt.benchmarks.gpu_pytest_plugin`).

- torch is imported as the run starts, before any ONNX Runtime session: it loads the CUDA libraries
  onnxruntime-gpu links against (shared/gpu/README.md), whichever test module comes first;
- each failure's report is written as it happens: pytest prints tracebacks at the end of the session,
  which a run killed at its time-out never reaches. With M3RT_TEST_FAILURES set to a file, each
  failed or erroring test phase is appended to it at once as one JSON line: {"test", "when", "report"}.
"""

from __future__ import annotations

import json
import os
from typing import Any

try:
    import torch  # noqa: F401
except ImportError:  # the tests that need it say so themselves
    pass

MAX_REPORT_CHARS = 6000


def pytest_runtest_logreport(report: Any) -> None:
    path = os.environ.get("M3RT_TEST_FAILURES")
    if not path or not report.failed:
        return
    record = {"test": report.nodeid, "when": report.when, "report": str(report.longrepr)[-MAX_REPORT_CHARS:]}
    with open(path, "a", encoding="utf-8") as sink:
        sink.write(json.dumps(record) + "\n")
