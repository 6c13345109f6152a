"""Ray on loopback for the tests of the Ray-based verbs: a local multi-node cluster whose every node is
on 127.0.0.1, and the check that a set of processes listens on and talks to loopback only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psutil

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def connections(processes) -> tuple[list, list]:
    """(listening, established) inet sockets of these processes."""
    listening, established = [], []
    for proc in processes:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening.append((proc.pid, conn.laddr))
                elif conn.status == psutil.CONN_ESTABLISHED and conn.raddr:
                    established.append((proc.pid, conn.raddr))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return listening, established


def assert_loopback_only(processes) -> None:
    listening, established = connections(processes)
    assert listening, "no listening sockets found: the check would prove nothing"
    assert [(pid, a) for pid, a in listening if a.ip not in LOOPBACK] == []
    assert [(pid, a) for pid, a in established if a.ip not in LOOPBACK] == []


def start_loopback_cluster(monkeypatch, nodes: int = 2, num_cpus: int = 1):
    """A running `ray.cluster_utils.Cluster` of `nodes` nodes on 127.0.0.1 with this process connected
    to it; the caller shuts it down (`ray.shutdown()`, `cluster.shutdown()`). Multi-node mode is off
    in this process and in the cluster's (what `m3rt.ray_loopback.keep_ray_on_loopback` does for the
    commands), undone after the test."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"node_ip_address": "127.0.0.1", "num_cpus": num_cpus, "include_dashboard": False},
    )
    try:
        for _ in range(nodes - 1):
            cluster.add_node(node_ip_address="127.0.0.1", num_cpus=num_cpus)
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
    except BaseException:
        ray.shutdown()
        cluster.shutdown()
        raise
    return cluster


@contextmanager
def loopback_cluster(monkeypatch, nodes: int = 2, num_cpus: int = 1) -> Iterator:
    """`start_loopback_cluster`, shut down on exit."""
    import ray

    cluster = start_loopback_cluster(monkeypatch, nodes, num_cpus)
    try:
        yield cluster
    finally:
        try:
            ray.shutdown()
        finally:
            cluster.shutdown()
