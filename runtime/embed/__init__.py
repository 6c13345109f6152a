"""`m3rt embed`: a corpus (JSON lines, Parquet, plain text) to Parquet shards of dense, sparse and
ColBERT vectors, resumable, exactly once, on this machine or on a Ray cluster (extra `m3rt[embed]`).

- `corpus`: input files, their work units, each unit's rows (with the reason a row cannot be embedded);
- `table`: the shards' Arrow schema;
- `worker`: one loaded model turning units into shards;
- `store`: the output folder, its commit log and atomic shard commits;
- `runner`: the job, here or on Ray (`ray_job`: Ray Data over an actor pool); `verify`: `--verify N`.
"""

from importlib import import_module
from typing import Any

_PUBLIC = {
    "ClusterOptions": "m3rt.embed.runner",
    "Summary": "m3rt.embed.runner",
    "run_embed": "m3rt.embed.runner",
    "EmbedSettings": "m3rt.embed.worker",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    # Looked up on use: the `m3rt` command imports this package for the verb's options, and its other
    # verbs must run without the embed extra (pyarrow).
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'm3rt.embed' has no attribute {name!r}")
