"""Which sockets a process tree listens on: the check behind `m3rt serve --host 127.0.0.1`.

Ray keeps its services on loopback only through settings of its own (`m3rt.serve.deployment`); should
one of them stop working in a Ray release, a service would listen on every interface, unauthenticated.
The server therefore looks at what its processes actually listen on and refuses to run otherwise.
"""

from __future__ import annotations

import ipaddress

import psutil


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def listening_off_loopback(pid: int) -> list[tuple[int, str, str, int]]:
    """(pid, command name, address, port) of every TCP socket that process `pid` or any of its
    descendants listens on at an address that is not loopback."""
    root = psutil.Process(pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = proc.name()
            connections = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # exited meanwhile: listens on nothing
        for conn in connections:
            if conn.status == psutil.CONN_LISTEN and not is_loopback(conn.laddr.ip):
                found.append((proc.pid, name, conn.laddr.ip, conn.laddr.port))
    return found
