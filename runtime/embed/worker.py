"""One loaded model turning work units into shards: read, tokenise, encode, write.

The same object runs in the `m3rt embed` process (the embedded default) and in each Ray Data actor.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from m3rt.embed.corpus import Rows, Unit, read_unit
from m3rt.embed.store import Commit, publish, shard_name, write_errors
from m3rt.embed.table import DENSE_DTYPES, OUTPUTS, schema, to_table
from m3rt.errors import InputError


@dataclass(frozen=True)
class EmbedSettings:
    """How to load the model and what to write; `job()` is the part that decides the output's content."""

    artifact: str
    outputs: tuple[str, ...] = ("dense", "sparse")
    dense_dtype: str = "float32"
    max_length: int | None = None
    truncate: bool = True
    text_field: str = "text"
    id_field: str | None = None
    backend: str = "onnxruntime"
    precision: str = "fp32"
    device: str | None = None
    threads: int | None = None
    token_budget: int = 16384
    verify_artifact: bool = True
    rows_per_unit: int = 10_000

    def check(self) -> None:
        if not self.outputs or any(o not in OUTPUTS for o in self.outputs):
            raise InputError(f"outputs must be some of {', '.join(OUTPUTS)}, got {', '.join(self.outputs) or 'none'}")
        if self.dense_dtype not in DENSE_DTYPES:
            raise InputError(f"--dense-dtype must be one of {', '.join(DENSE_DTYPES)}, got {self.dense_dtype!r}")
        if self.rows_per_unit < 1:
            raise InputError("--shard-rows must be >= 1")

    def job(self, max_length: int) -> dict[str, Any]:
        manifest = Path(self.artifact) / "m3rt.json"
        return {
            "artifact_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
            "precision": self.precision,
            "outputs": sorted(self.outputs),
            "dense_dtype": self.dense_dtype,
            "max_length": max_length,
            "truncate": self.truncate,
            "text_field": self.text_field,
            "id_field": self.id_field,
            "rows_per_unit": self.rows_per_unit,
        }


@dataclass
class Embedded:
    """A unit encoded, not yet written."""

    unit: Unit
    table: Any
    errors: list[dict[str, Any]]
    tokens: int
    seconds: float


class UnitEmbedder:
    def __init__(self, settings: EmbedSettings) -> None:
        from m3rt.model import M3Model

        self.settings = settings
        self.model = M3Model.load(
            settings.artifact,
            backend=settings.backend,
            precision=settings.precision,
            device=settings.device,
            verify=settings.verify_artifact,
            intra_op_threads=settings.threads,
            token_budget=settings.token_budget,
        )
        self.max_length = settings.max_length or self.model.max_length
        if not 2 <= self.max_length <= self.model.max_length:
            raise InputError(f"--max-length must be within 2..{self.model.max_length}, got {self.max_length}")
        self.schema = schema(settings.outputs, self.model.manifest.hidden_size, settings.dense_dtype)

    def close(self) -> None:
        self.model.close()

    def read(self, unit: Unit) -> Rows:
        return read_unit(unit, self.settings.text_field, self.settings.id_field)

    def token_counts(self, texts: list[str]) -> np.ndarray:
        """Tokens each text gives the model; with truncation off, `max_length + 1` marks one that does
        not fit (tokenised one longer than the limit so the excess shows without a second pass)."""
        limit = self.max_length if self.settings.truncate else self.max_length + 1
        ids = self.model.tokenizer.encode(texts, max_length=limit, truncate=True).ids
        return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))

    def encode(self, unit: Unit, rows: Rows) -> Embedded:
        started = time.perf_counter()
        good = [i for i, reason in enumerate(rows.reasons) if reason is None]
        counts = self.token_counts([rows.texts[i] for i in good]) if good else np.zeros(0, np.int64)
        if not self.settings.truncate:
            for i, n in zip(good, counts):
                if n > self.max_length:
                    rows.reasons[i] = f"longer than max_length={self.max_length} tokens (--no-truncate)"
            keep = counts <= self.max_length
            good, counts = [i for i, k in zip(good, keep) if k], counts[keep]
        outputs, good, counts = self._encode_rows(rows, good, counts)
        errors = [
            {"id": rows.ids[i], "source": unit.path, "line": rows.lines[i], "reason": reason}
            for i, reason in enumerate(rows.reasons)
            if reason is not None
        ]
        table = to_table(
            self.schema,
            [rows.ids[i] for i in good],
            counts,
            outputs.get("dense_vecs"),
            outputs.get("lexical_weights"),
            outputs.get("colbert_vecs"),
        )
        return Embedded(unit, table, errors, int(counts.sum()), time.perf_counter() - started)

    def _encode_rows(self, rows: Rows, good: list[int], counts: np.ndarray) -> tuple[dict, list[int], np.ndarray]:
        """`encode` of the good rows in one call; if it refuses the input, row by row, so that only the
        rows it refuses go to the errors file."""
        wanted = set(self.settings.outputs)
        options = dict(
            max_length=self.max_length,
            return_dense="dense" in wanted,
            return_sparse="sparse" in wanted,
            return_colbert_vecs="colbert" in wanted,
            sparse_format="csr",
            show_progress=False,
        )
        if not good:
            return self._empty(), good, counts
        try:
            return self.model.encode([rows.texts[i] for i in good], **options), good, counts
        except InputError:
            pass
        parts, kept = [], []
        for position, i in enumerate(good):
            try:
                parts.append(self.model.encode([rows.texts[i]], **options))
                kept.append(position)
            except InputError as exc:
                rows.reasons[i] = f"refused by encode: {exc}"
        return (_concat(parts) if parts else self._empty()), [good[p] for p in kept], counts[kept]

    def _empty(self) -> dict[str, Any]:
        from m3rt.kernels.sparse import SparseRows

        dim = self.model.manifest.hidden_size
        return {
            "dense_vecs": np.zeros((0, dim), np.float32),
            "lexical_weights": SparseRows(np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)),
            "colbert_vecs": [],
        }

    def write(self, output: Path, embedded: Embedded, node: str) -> Commit:
        """The shard and its errors in place (atomically); the commit that names them, not yet logged."""
        write_errors(output, embedded.unit.index, embedded.errors)
        publish(
            output,
            lambda tmp: pq.write_table(embedded.table, tmp, compression="snappy", use_dictionary=False),
            output / shard_name(embedded.unit.index),
        )
        return Commit(
            embedded.unit.index,
            embedded.table.num_rows,
            len(embedded.errors),
            embedded.tokens,
            round(embedded.seconds, 4),
            node,
        )

    def process(self, output: Path, unit: Unit, node: str) -> Commit:
        return self.write(output, self.encode(unit, self.read(unit)), node)


def _concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    from m3rt.kernels.sparse import SparseRows

    out: dict[str, Any] = {}
    if parts[0]["dense_vecs"] is not None:
        out["dense_vecs"] = np.concatenate([p["dense_vecs"] for p in parts])
    if parts[0]["lexical_weights"] is not None:
        out["lexical_weights"] = SparseRows.concat([p["lexical_weights"] for p in parts])
    if parts[0]["colbert_vecs"] is not None:
        out["colbert_vecs"] = [v for p in parts for v in p["colbert_vecs"]]
    return out
