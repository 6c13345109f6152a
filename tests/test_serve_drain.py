"""The drain gate's rule, without Ray: drained once every live replica has reported, after the drain
began, nothing in progress; a replica silent for SILENT_S counts as gone."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from m3rt.serve import drain  # noqa: E402


def test_drained_only_after_fresh_reports_of_nothing_in_progress(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(drain.time, "monotonic", lambda: clock[0])
    gate = drain.GateState()
    assert gate.report("a", 2) is False and gate.report("b", 0) is False
    gate.drain()
    clock[0] += drain.REPORT_S / 2
    gate.report("b", 0)
    assert gate.drained() is False  # reports within a report interval of the drain may predate it
    clock[0] += 1
    assert gate.report("a", 1) is True and gate.report("b", 0) is True
    assert gate.drained() is False  # a still has a request in progress
    clock[0] += 1
    gate.report("a", 0)
    assert gate.drained() is True


def test_a_silent_replica_does_not_hold_the_drain(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(drain.time, "monotonic", lambda: clock[0])
    gate = drain.GateState()
    gate.report("killed", 3)
    gate.drain()
    clock[0] += 1
    gate.report("alive", 0)
    assert gate.drained() is False
    clock[0] += drain.SILENT_S
    gate.report("alive", 0)
    assert gate.drained() is True
