"""`m3rt embed`'s job: plan the units, skip the committed ones, embed the rest here or on a Ray cluster,
commit each as it lands, show progress and sum up."""

from __future__ import annotations

import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from m3rt.embed.corpus import Unit, find_inputs, plan_units
from m3rt.embed.store import Commit, OutputFolder
from m3rt.embed.verify import Verification, verify_sample
from m3rt.embed.worker import EmbedSettings, UnitEmbedder
from m3rt.errors import InputError
from m3rt.manifest import load_manifest


@dataclass(frozen=True)
class ClusterOptions:
    """Where Ray runs the job: `address` ("auto", "ray://host:10001", a GCS address) and per-actor resources."""

    address: str
    node_ip_address: str | None = None
    actors: int | None = None
    num_cpus: float = 1
    num_gpus: float = 0


@dataclass
class Summary:
    """This run's work (`rows`, `errors`, `tokens`, `seconds`) and the whole output's (`total_*`)."""

    rows: int = 0
    errors: int = 0
    tokens: int = 0
    seconds: float = 0.0
    units: int = 0
    skipped_units: int = 0
    total_rows: int = 0
    total_errors: int = 0
    rows_per_node: dict[str, int] = field(default_factory=dict)
    verification: Verification | None = None

    def as_dict(self) -> dict:
        out = asdict(self)
        out["rows_per_second"] = self.rows / self.seconds if self.seconds else 0.0
        out["tokens_per_second"] = self.tokens / self.seconds if self.seconds else 0.0
        return out

    def lines(self) -> list[str]:
        rate = self.rows / self.seconds if self.seconds else 0.0
        tokens_rate = self.tokens / self.seconds if self.seconds else 0.0
        return [
            f"m3rt embed: {self.rows} rows, {self.tokens} tokens in {self.seconds:.1f} s "
            f"({rate:,.1f} rows/s, {tokens_rate:,.0f} tokens/s); {self.errors} rows to the errors file; "
            f"{self.units} shards written, {self.skipped_units} already committed",
            f"m3rt embed: the output holds {self.total_rows} rows; {self.total_errors} in _errors.jsonl",
        ]


def run_embed(
    settings: EmbedSettings,
    inputs: Sequence[str],
    output: Path,
    *,
    input_format: str | None = None,
    cluster: ClusterOptions | None = None,
    progress: bool = True,
    verify_rows: int = 0,
) -> Summary:
    """Embed every row of `inputs` not yet committed in `output`, then re-encode `verify_rows` random
    rows of the output in this process and compare (`Summary.verification`)."""
    settings.check()
    manifest = load_manifest(settings.artifact, verify=False)  # not an artifact: say so before reading inputs
    max_length = settings.max_length or manifest.max_length
    if not 2 <= max_length <= manifest.max_length:
        raise InputError(f"--max-length must be within 2..{manifest.max_length}, got {max_length}")
    files = find_inputs(inputs, input_format, exclude=output)
    job = settings.job(max_length)
    job["inputs"] = [{"path": f.path, "format": f.format, "size": f.size, "mtime_ns": f.mtime_ns} for f in files]
    folder = OutputFolder(output)
    with folder.locked():
        folder.claim(job)
        committed = folder.commits()
        folder.sweep(committed)
        units = plan_units(files, settings.rows_per_unit)
        pending = [u for u in units if u.index not in committed]
        summary = Summary(skipped_units=len(units) - len(pending))
        started = time.perf_counter()
        bar = tqdm(
            total=sum(u.stop - u.start for u in pending), unit="rows", desc="m3rt embed", disable=not progress,
            file=sys.stderr, dynamic_ncols=True,
        )  # fmt: skip
        per_node: Counter[str] = Counter()
        try:
            for commit in _embed(settings, output, pending, cluster):
                if commit.unit in committed:  # a retried unit reported twice: its first report counts
                    continue
                folder.commit(commit)
                committed[commit.unit] = commit
                summary.rows += commit.rows
                summary.errors += commit.errors
                summary.tokens += commit.tokens
                summary.units += 1
                per_node[commit.node] += commit.rows
                bar.update(commit.rows + commit.errors)
                elapsed = time.perf_counter() - started
                bar.set_postfix_str(f"{summary.tokens / elapsed:,.0f} tok/s", refresh=False)
        finally:
            bar.close()
            summary.seconds = time.perf_counter() - started
            summary.rows_per_node = dict(per_node)
            summary.total_rows = sum(c.rows for c in committed.values())
            summary.total_errors = folder.gather_errors()
        if verify_rows > 0:
            embedder = UnitEmbedder(settings)
            try:
                by_index = {u.index: u for u in units}
                summary.verification = verify_sample(embedder, output, by_index, committed, verify_rows)
            finally:
                embedder.close()
    return summary


def _embed(
    settings: EmbedSettings, output: Path, pending: list[Unit], cluster: ClusterOptions | None
) -> Iterator[Commit]:
    if not pending:
        return iter(())
    if cluster is not None:
        from m3rt.embed.ray_job import embed_on_ray

        return embed_on_ray(settings, output, pending, cluster)
    return _embed_here(settings, output, pending)


def _embed_here(settings: EmbedSettings, output: Path, pending: list[Unit]) -> Iterator[Commit]:
    """In this process: the next unit is read and the previous one written while one is encoded."""
    embedder = UnitEmbedder(settings)
    node = socket.gethostname()
    try:
        with ThreadPoolExecutor(1, "m3rt-embed-read") as reader, ThreadPoolExecutor(1, "m3rt-embed-write") as writer:
            next_rows = reader.submit(embedder.read, pending[0])
            writes: deque = deque()
            for k, unit in enumerate(pending):
                rows = next_rows.result()
                if k + 1 < len(pending):
                    next_rows = reader.submit(embedder.read, pending[k + 1])
                embedded = embedder.encode(unit, rows)
                while writes:  # one shard written while the next is encoded: two held in memory at most
                    yield writes.popleft().result()
                writes.append(writer.submit(embedder.write, output, embedded, node))
            while writes:
                yield writes.popleft().result()
    finally:
        embedder.close()
