"""`m3rt embed`: a corpus (JSON lines, Parquet, plain text) to Parquet shards of dense, sparse and
ColBERT vectors, resumable, exactly once, on this machine or on a Ray cluster (extra `m3rt[embed]`).

- `corpus`: input files, their work units, each unit's rows (with the reason a row cannot be embedded);
- `table`: the shards' Arrow schema;
- `worker`: one loaded model turning units into shards;
- `store`: the output folder, its commit log and atomic shard commits;
- `runner`: the job, here or on Ray (`ray_job`: Ray Data over an actor pool); `verify`: `--verify N`.
"""

from m3rt.embed.runner import ClusterOptions, Summary, run_embed
from m3rt.embed.worker import EmbedSettings

__all__ = ["ClusterOptions", "EmbedSettings", "Summary", "run_embed"]
