"""The fail-closed check of a loopback server: what its process tree listens on, found with psutil."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections import namedtuple

import pytest

psutil = pytest.importorskip("psutil")

from m3rt.serve.loopback import is_loopback, listening_off_loopback  # noqa: E402

Addr = namedtuple("Addr", "ip port")


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("::ffff:10.1.2.3", False), ("host.example", False)],
)  # fmt: skip
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_a_child_listening_on_loopback_passes_and_one_off_loopback_is_named(monkeypatch):
    # A grandchild (a shell's child) listening on 127.0.0.1: found in the tree, and on loopback.
    code = "import socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(); print(s.getsockname()[1]); sys.stdout.flush(); time.sleep(60)"  # noqa: E501
    child = subprocess.Popen(["sh", "-c", f'{sys.executable} -c "{code}"; true'], stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        tree = psutil.Process(child.pid).children(recursive=True)
        seen = [c.laddr.port for p in tree for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        assert port in seen
        assert listening_off_loopback(child.pid) == []

        # The same tree with that socket reported on every interface (tests bind loopback only).
        real = psutil.Process.net_connections

        def widened(self, kind="inet"):
            return [
                c._replace(laddr=Addr("0.0.0.0", c.laddr.port)) if c.laddr.port == port else c for c in real(self, kind)
            ]

        monkeypatch.setattr(psutil.Process, "net_connections", widened)
        found = listening_off_loopback(child.pid)
        assert [(ip, p) for _, _, ip, p in found] == [("0.0.0.0", port)]
    finally:
        for proc in psutil.Process(child.pid).children(recursive=True):
            proc.kill()
        child.kill()
        child.wait()


def test_the_server_refuses_to_run_with_a_socket_off_loopback(monkeypatch):
    pytest.importorskip("ray.serve")
    from m3rt.serve import deployment

    monkeypatch.setattr(deployment, "listening_off_loopback", lambda pid: [(pid, "raylet", "0.0.0.0", 1234)])
    with pytest.raises(deployment.OffLoopbackError, match=r"raylet .* on 0.0.0.0:1234; refusing to run"):
        deployment._refuse_off_loopback("127.0.0.1")
    monkeypatch.setattr(deployment, "listening_off_loopback", lambda pid: [])
    deployment._refuse_off_loopback("127.0.0.1")
    with socket.socket() as sock:  # the real check on this test process: nothing off loopback here
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        monkeypatch.undo()
        deployment._refuse_off_loopback("127.0.0.1")
