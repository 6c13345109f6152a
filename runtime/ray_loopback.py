"""Keeping a Ray node on 127.0.0.1 (shared by the Ray-based verbs; imports Ray only when called)."""

from __future__ import annotations

import os

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def keep_ray_on_loopback() -> None:
    """Ray replaces a loopback node address by the machine's interface address unless multi-node
    clusters are off (its Windows/macOS mode): turn them off, here (Ray read the setting at import)
    and for every process Ray starts (they read the environment), so all its services bind and dial
    127.0.0.1 only."""
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
