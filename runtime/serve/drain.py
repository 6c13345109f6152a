"""Draining on shutdown: new requests refused, those in progress finished, then Ray stopped.

Serve's own shutdown stops the HTTP proxy together with the replicas, which closes the connections
of requests still being answered. So `m3rt serve` drains first, through a small named actor (the
gate): every replica reports its requests in progress to it and learns from it whether to drain;
the server flips the gate on SIGTERM and waits, at most its drain timeout, until every replica
reports none in progress.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray

from m3rt.serve.app import Admission

NAMESPACE = "m3rt"
REPORT_S = 0.2
# A replica silent for this long is gone (killed, or stopped by Serve): it holds no requests.
SILENT_S = 3.0


class GateState:
    """What the gate actor holds: the drain switch and each replica's last report."""

    def __init__(self) -> None:
        self.draining = False
        self.drain_started = 0.0
        self.reports: dict[str, tuple[float, int]] = {}

    def drain(self) -> None:
        self.draining, self.drain_started = True, time.monotonic()

    def report(self, replica: str, pending: int) -> bool:
        self.reports[replica] = (time.monotonic(), pending)
        return self.draining

    def drained(self) -> bool:
        """Every replica still reporting has reported, since the drain began, none in progress."""
        now = time.monotonic()
        live = [(at, pending) for at, pending in self.reports.values() if now - at < SILENT_S]
        return all(at > self.drain_started + REPORT_S and pending == 0 for at, pending in live)


DrainGate = ray.remote(num_cpus=0)(GateState)


def start_gate(name: str) -> Any:
    """The gate, owned by the calling driver (it goes when the driver goes)."""
    return DrainGate.options(name=name, namespace=NAMESPACE).remote()


def report_forever(gate_name: str, replica: str, admission: Admission) -> threading.Thread:
    """A replica's reporter: its requests in progress to the gate, the gate's drain switch to its app."""

    def loop() -> None:
        gate = None
        while True:
            try:
                gate = gate or ray.get_actor(gate_name, namespace=NAMESPACE)
                admission.draining = ray.get(gate.report.remote(replica, admission.pending), timeout=5)
            except Exception:  # noqa: BLE001 - no gate (a `serve run` deployment) or it went: keep serving
                gate = None
            time.sleep(REPORT_S)

    thread = threading.Thread(target=loop, name="m3rt-drain-report", daemon=True)
    thread.start()
    return thread


def drain(gate: Any, timeout_s: float) -> bool:
    """Flip the gate and wait until every replica has finished its requests; False past `timeout_s`."""
    ray.get(gate.drain.remote())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(REPORT_S)
        if ray.get(gate.drained.remote()):
            # Requests the proxy had already routed reach a replica within a report or two: refused
            # there (503) if new; wait for one more round so none is cut off in transit.
            time.sleep(2 * REPORT_S)
            if ray.get(gate.drained.remote()):
                return True
    return False
