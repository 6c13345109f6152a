"""The same job on a Ray cluster: Ray Data's `map_batches` over an actor pool, one loaded model per
actor, one work unit per call. Each actor writes its unit's shard into the output folder (which every
node must see, as the artifact and the inputs); the driver commits units as their results stream back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from m3rt.embed.corpus import Unit
from m3rt.embed.store import Commit
from m3rt.embed.worker import EmbedSettings, UnitEmbedder
from m3rt.ray_loopback import LOOPBACK_NAMES, keep_ray_on_loopback


class UnitActor:
    """A Ray Data actor: loads the model once, then embeds and writes the units it is handed."""

    def __init__(self, settings: dict[str, Any], output: str) -> None:
        import ray

        self.embedder = UnitEmbedder(EmbedSettings(**{**settings, "outputs": tuple(settings["outputs"])}))
        self.output = Path(output)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        commits = [
            self.embedder.process(self.output, Unit.from_json(str(item)), self.node).to_line().decode()
            for item in batch["unit"]
        ]
        return {"commit": np.array(commits, dtype=object)}


def _pool_size(ray: Any, cluster: Any, units: int) -> int:
    if cluster.actors is not None:
        return max(1, min(cluster.actors, units))
    resources = ray.cluster_resources()
    if cluster.num_gpus > 0:
        fits = int(resources.get("GPU", 0) // cluster.num_gpus)
    else:
        fits = int(resources.get("CPU", 1) // max(cluster.num_cpus, 1e-9))
    return max(1, min(fits, units))


def embed_on_ray(settings: EmbedSettings, output: Path, pending: list[Unit], cluster: Any) -> Iterator[Commit]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data

    if cluster.node_ip_address in LOOPBACK_NAMES:
        keep_ray_on_loopback()
    init = {"_node_ip_address": cluster.node_ip_address} if cluster.node_ip_address else {}
    ray.init(address=cluster.address, log_to_driver=False, **init)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # m3rt embed shows its own, in rows and tokens
        context.print_on_execution_start = False
        if settings.threads is None:
            # Every actor's ONNX Runtime would otherwise start a thread per core of its node.
            settings = EmbedSettings(**{**asdict(settings), "threads": max(1, int(cluster.num_cpus))})
        size = _pool_size(ray, cluster, len(pending))
        units = ray.data.from_items([{"unit": u.to_json()} for u in pending], override_num_blocks=len(pending))
        commits = units.map_batches(
            UnitActor,
            fn_constructor_kwargs={"settings": asdict(settings), "output": str(output.resolve())},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=cluster.num_cpus,
            num_gpus=cluster.num_gpus,
        )
        for row in commits.iter_rows():
            yield Commit(**json.loads(row["commit"]))
    finally:
        ray.shutdown()
