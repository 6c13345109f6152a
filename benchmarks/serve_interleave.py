"""Latency of one-text requests while one ~200k-token request runs on the same `m3rt serve` replica.

Two servers in one run, the same artifact and load: the big request sent to the model in parts of
`--max-batch-tokens` (how `m3rt serve` runs it) and, for comparison, with a batch budget above the
whole request (one part: every other request waits behind it).

Usage: python -m m3rt.benchmarks.serve_interleave ARTIFACT [--seconds 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def _percentiles(latencies: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}  # fmt: skip


def _small_requests(http: Any, url: str, until: threading.Event | float) -> list[float]:
    """One client sending one short text at a time until `until` (an event set, or a deadline)."""
    latencies = []
    session = http.Session()
    while not (until.is_set() if isinstance(until, threading.Event) else time.monotonic() > until):
        started = time.perf_counter()
        response = session.post(f"{url}/v1/embeddings", json={"input": "one short query text"}, timeout=600)
        response.raise_for_status()
        latencies.append(time.perf_counter() - started)
    return latencies


def measure(artifact: Path, out: Path, budget: int, seconds: float) -> dict[str, Any]:
    import requests as http

    from m3rt.serve.process import serving

    big = [f"document {i} " + "words of a long passage to encode " * 1400 for i in range(25)]  # 25 x 8192 tokens
    options = ["--no-verify", "--max-batch-tokens", str(budget), "--no-access-log"]
    with serving(artifact, out / f"server-{budget}.log", options, ready_s=300) as (_, url):
        _small_requests(http, url, time.monotonic() + 1)  # warm-up
        alone = _small_requests(http, url, time.monotonic() + seconds)
        done = threading.Event()
        result: dict[str, Any] = {}

        def send_big() -> None:
            started = time.perf_counter()
            response = http.post(f"{url}/v1/embeddings", json={"input": big, "truncate": True}, timeout=600)
            result["big_status"], result["big_s"] = response.status_code, time.perf_counter() - started
            result["big_tokens"] = response.json()["usage"]["total_tokens"] if response.ok else None
            done.set()

        sender = threading.Thread(target=send_big)
        sender.start()
        time.sleep(0.2)  # the big request is at the replica first
        during = _small_requests(http, url, done)
        sender.join()
    return {"max_batch_tokens": budget, "alone": _percentiles(alone), "during_big": _percentiles(during), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="m3rt-interleave-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = [measure(args.artifact, out, budget, args.seconds) for budget in (16384, 1 << 20)]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
