"""`m3rt embed --verify N`: N random rows of the output re-encoded in this process and compared."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from m3rt.embed.corpus import Unit
from m3rt.embed.store import Commit, shard_name
from m3rt.embed.worker import UnitEmbedder

# Dense and ColBERT vectors written as float16 carry its rounding; the sparse weights are float32 as computed.
MIN_COSINE = 1 - 1e-6
SPARSE_ATOL = 1e-5


@dataclass
class Verification:
    checked: int = 0
    min_dense_cosine: float = 1.0
    min_colbert_cosine: float = 1.0
    max_sparse_diff: float = 0.0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def line(self) -> str:
        verdict = "all match" if self.ok else f"{len(self.mismatches)} MISMATCHES"
        return (
            f"m3rt embed --verify: {self.checked} rows re-encoded: {verdict} (dense cosine min "
            f"{self.min_dense_cosine:.8f}, ColBERT cosine min {self.min_colbert_cosine:.8f}, "
            f"sparse max |diff| {self.max_sparse_diff:.2e})"
        )


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def verify_sample(
    embedder: UnitEmbedder, output: Path, units: dict[int, Unit], commits: dict[int, Commit], n: int, seed: int = 0
) -> Verification:
    """Re-encode `n` rows drawn uniformly from the committed shards; compare what was written."""
    result = Verification()
    filled = sorted(u for u, c in commits.items() if c.rows)
    counts = np.array([commits[u].rows for u in filled], dtype=np.int64)
    if n <= 0 or not filled:
        return result
    rng = np.random.default_rng(seed)
    draws = rng.choice(int(counts.sum()), size=min(n, int(counts.sum())), replace=False)
    bounds = np.cumsum(counts)
    picked: dict[int, list[int]] = defaultdict(list)
    for draw in np.sort(draws):
        k = int(np.searchsorted(bounds, draw, side="right"))
        picked[filled[k]].append(int(draw - (bounds[k] - counts[k])))
    for unit_index, positions in picked.items():
        _verify_unit(embedder, output, units[unit_index], positions, result)
    return result


def _verify_unit(embedder: UnitEmbedder, output: Path, unit: Unit, positions: list[int], result: Verification) -> None:
    table = pq.read_table(output / shard_name(unit.index)).take(positions)
    rows = embedder.read(unit)
    texts = _texts_of(rows, table.column("id").to_pylist())
    wanted = set(embedder.settings.outputs)
    reference = embedder.model.encode(
        texts,
        max_length=embedder.max_length,
        return_dense="dense" in wanted,
        return_sparse="sparse" in wanted,
        return_colbert_vecs="colbert" in wanted,
        show_progress=False,
    )
    counts = embedder.token_counts(texts)
    ids = table.column("id").to_pylist()
    tokens = table.column("tokens").to_pylist()
    for j, row_id in enumerate(ids):
        result.checked += 1
        if tokens[j] != min(int(counts[j]), embedder.max_length):
            result.mismatches.append(f"{row_id}: tokens {tokens[j]} written, {counts[j]} now")
        if "dense" in wanted:
            written = np.asarray(table.column("dense")[j].as_py(), np.float32)
            cosine = float(_cosines(written, reference["dense_vecs"][j]))
            result.min_dense_cosine = min(result.min_dense_cosine, cosine)
            if cosine < MIN_COSINE:
                result.mismatches.append(f"{row_id}: dense cosine {cosine:.8f}")
        if "sparse" in wanted:
            entry = table.column("sparse")[j].as_py()
            want = reference["lexical_weights"][j]
            if [str(i) for i in entry["indices"]] != list(want):
                result.mismatches.append(f"{row_id}: sparse token ids differ")
            else:
                diff = float(np.max(np.abs(np.subtract(entry["values"], [float(v) for v in want.values()])), initial=0))
                result.max_sparse_diff = max(result.max_sparse_diff, diff)
                if diff > SPARSE_ATOL:
                    result.mismatches.append(f"{row_id}: sparse weights differ by {diff:.2e}")
        if "colbert" in wanted:
            written = np.asarray(table.column("colbert")[j].as_py(), np.float32)
            want = reference["colbert_vecs"][j]
            if written.shape != want.shape:
                result.mismatches.append(f"{row_id}: ColBERT shape {written.shape} written, {want.shape} now")
                continue
            cosine = float(_cosines(written, want).min(initial=1.0))
            result.min_colbert_cosine = min(result.min_colbert_cosine, cosine)
            if cosine < MIN_COSINE:
                result.mismatches.append(f"{row_id}: ColBERT cosine {cosine:.8f}")


def _texts_of(rows, ids: list[str]) -> list[str]:
    """The input text of each written id: the written rows are the embeddable ones, in input order."""
    embeddable = [(i, t) for i, t, r in zip(rows.ids, rows.texts, rows.reasons) if r is None]
    texts, cursor = [], 0
    for row_id in ids:
        while cursor < len(embeddable) and embeddable[cursor][0] != row_id:
            cursor += 1
        if cursor == len(embeddable):
            raise RuntimeError(f"row {row_id!r} is in the output but not in its input unit: the input changed")
        texts.append(embeddable[cursor][1])
        cursor += 1
    return texts
