"""Post-processing: a padded batch's raw backend outputs -> per-text results, back in input order.

`OutputCollector` receives (batch, outputs) pairs in any order (the pipeline may deliver them out of
order, and an out-of-memory retry delivers a batch as halves) and assembles dense [n, D], sparse
`SparseRows` and per-text ColBERT arrays indexed by each text's position in the caller's input. It
never knows which backend ran.

`sparse_rows` and `colbert_rows` are the seam for device-resident outputs: today every backend hands
back NumPy arrays and the CPU kernels run; a backend that keeps outputs on the GPU will be handled
there (a device branch on values that are not NumPy arrays), and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from m3rt.kernels import SparseRows, aggregate_sparse, split_colbert
from m3rt.scheduler import Batch

OUTPUT_DENSE = "dense_vecs"
OUTPUT_SPARSE = "sparse_weights"
OUTPUT_COLBERT = "colbert_vecs"


def sparse_rows(values: Any, batch: Batch, special_ids: Iterable[int]) -> SparseRows:
    """The batch's `sparse_weights` [B, S(, 1)] aggregated into CSR rows, in batch row order."""
    return aggregate_sparse(np.asarray(values), batch.input_ids, batch.attention_mask, special_ids)


def colbert_rows(values: Any, batch: Batch) -> list[np.ndarray]:
    """The batch's `colbert_vecs` [B, S-1, D] cut to each text's `tokens - 1` vectors, in batch row order."""
    return split_colbert(np.asarray(values), batch.attention_mask)


class OutputCollector:
    """Assembles one `encode` call's results; each input row must be delivered exactly once.

    Not thread-safe: one pipeline's post-processing stage owns it.
    """

    def __init__(self, num_texts: int, hidden_size: int, outputs: Sequence[str], special_ids: Iterable[int]) -> None:
        unknown = set(outputs) - {OUTPUT_DENSE, OUTPUT_SPARSE, OUTPUT_COLBERT}
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}")
        self.num_texts = num_texts
        self.outputs = tuple(outputs)
        self._special_ids = tuple(special_ids)
        self._delivered = np.zeros(num_texts, dtype=bool)
        self._dense = np.zeros((num_texts, hidden_size), dtype=np.float32) if OUTPUT_DENSE in outputs else None
        # Sparse rows arrive batch by batch in any order: keep the parts and which inputs they are.
        self._sparse_parts: list[SparseRows] = []
        self._sparse_inputs: list[np.ndarray] = []
        self._colbert: list[np.ndarray | None] | None = [None] * num_texts if OUTPUT_COLBERT in outputs else None

    def add(self, batch: Batch, values: Mapping[str, Any]) -> None:
        """Post-process one batch's backend outputs (every requested output must be present)."""
        rows = np.asarray(batch.indices, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_texts):
            raise ValueError(f"batch rows outside 0..{self.num_texts - 1}")
        if self._delivered[rows].any() or len(np.unique(rows)) != len(rows):
            raise RuntimeError(f"inputs {rows[self._delivered[rows]].tolist()} delivered twice")
        missing = [name for name in self.outputs if name not in values]
        if missing:
            raise RuntimeError(f"the backend returned no {', '.join(missing)}")
        if self._dense is not None:
            self._dense[rows] = np.asarray(values[OUTPUT_DENSE])
        if OUTPUT_SPARSE in self.outputs:
            self._sparse_parts.append(sparse_rows(values[OUTPUT_SPARSE], batch, self._special_ids))
            self._sparse_inputs.append(rows)
        if self._colbert is not None:
            for index, vecs in zip(rows.tolist(), colbert_rows(values[OUTPUT_COLBERT], batch)):
                self._colbert[index] = vecs
        self._delivered[rows] = True

    def finish(self) -> tuple[np.ndarray | None, SparseRows | None, list[np.ndarray] | None]:
        """(dense, sparse, colbert) in input order; None for an output that was not requested."""
        if self.outputs and not self._delivered.all():
            lost = np.flatnonzero(~self._delivered)
            raise RuntimeError(f"{lost.size} inputs got no output (first: {lost[:5].tolist()})")
        sparse = None
        if OUTPUT_SPARSE in self.outputs:
            sparse = SparseRows.concat(self._sparse_parts)
            if self._sparse_parts:
                # Parts come in delivery order; invert that permutation to restore input order.
                position = np.empty(self.num_texts, dtype=np.int64)
                position[np.concatenate(self._sparse_inputs)] = np.arange(self.num_texts)
                sparse = sparse.take(position)
        return self._dense, sparse, self._colbert  # type: ignore[return-value]
