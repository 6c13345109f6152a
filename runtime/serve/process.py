"""`m3rt serve` as a subprocess on a free loopback port: started, waited for, stopped with SIGINT.

What the server's tests and its benchmark both need; nothing here imports Ray.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_ready(url: str, deadline_s: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll /ready until it answers 200 (before the app is deployed the proxy answers 404 or nothing)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server behind {url} exited before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):  # not listening yet, or a replica still starting
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}/ready did not answer 200 within {deadline_s} s")


@contextmanager
def serving(
    artifact: str | Path, log: Path, options: Sequence[str] = (), ready_s: float = 180
) -> Iterator[tuple[subprocess.Popen, str]]:
    """`m3rt serve ARTIFACT OPTIONS` on a free loopback port, ready: (process, URL). Stopped with SIGINT
    on exit unless it has stopped already (killed when it does not stop within a minute)."""
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "m3rt.cli", "serve", str(artifact), "--port", str(port), *options]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://{LOOPBACK}:{port}"
    try:
        wait_ready(url, ready_s, alive=lambda: proc.poll() is None)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
