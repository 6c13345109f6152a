"""Post-processing: a padded batch's raw backend outputs -> per-text results, back in input order.

`OutputCollector` receives (batch, outputs) pairs in any order (the pipeline may deliver them out of
order, and an out-of-memory retry delivers a batch as halves) and assembles dense [n, D], sparse
`SparseRows` and per-text ColBERT arrays indexed by each text's position in the caller's input. It
never knows which backend ran.

`dense_rows`, `sparse_rows` and `colbert_rows` are the seam for device-resident outputs: NumPy arrays
go to the CPU kernels; `m3rt.device_array.DeviceArray`s (the ONNX Runtime CUDA backend's sparse
weights and ColBERT vectors) go to the device kernels of their `DeviceContext`, which reduce them on
the GPU and copy only the compact result to the host. Both give the same host results (the device
kernels are checked bit for bit against the CPU ones), so nothing after this seam knows the difference.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from m3rt.device_array import DeviceArray, DeviceContext
from m3rt.kernels import SparseRows, aggregate_sparse, split_colbert
from m3rt.scheduler import Batch

OUTPUT_DENSE = "dense_vecs"
OUTPUT_SPARSE = "sparse_weights"
OUTPUT_COLBERT = "colbert_vecs"


def _device_context(values: DeviceArray, batch: Batch, what: str) -> DeviceContext:
    context = values.context
    if context is None:
        raise RuntimeError(f"device-resident {what} came without a DeviceContext (kernels, stream, inputs)")
    if values.dtype != np.float32:
        raise RuntimeError(f"device-resident {what} is {values.dtype}; the device kernels read float32")
    if context.input_ids.shape != batch.input_ids.shape:
        raise RuntimeError(f"device inputs {context.input_ids.shape} do not match the batch {batch.input_ids.shape}")
    return context


def dense_rows(values: Any) -> np.ndarray:
    """The batch's `dense_vecs` [B, D] on the host (a small copy when it is device-resident)."""
    return values.to_host() if isinstance(values, DeviceArray) else np.asarray(values)


def sparse_rows(values: Any, batch: Batch, special_ids: Iterable[int]) -> SparseRows:
    """The batch's `sparse_weights` [B, S(, 1)] aggregated into CSR rows, in batch row order."""
    if isinstance(values, DeviceArray):
        ctx = _device_context(values, batch, "sparse_weights")
        return ctx.kernels.aggregate_sparse(
            values.ptr, ctx.input_ids.ptr, ctx.attention_mask.ptr, values.shape, special_ids, ctx.stream
        )
    return aggregate_sparse(np.asarray(values), batch.input_ids, batch.attention_mask, special_ids)


def colbert_rows(values: Any, batch: Batch) -> list[np.ndarray]:
    """The batch's `colbert_vecs` [B, S-1, D] cut to each text's `tokens - 1` vectors, in batch row order.

    Device-resident vectors are compacted on the GPU (float16 there when the backend was asked for
    `colbert_fp16`; float32 otherwise, as the CPU path returns).
    """
    if isinstance(values, DeviceArray):
        from m3rt.kernels.device import colbert_counts

        ctx = _device_context(values, batch, "colbert_vecs")
        counts = colbert_counts(batch.attention_mask)
        return ctx.kernels.compact_colbert(values.ptr, values.shape, counts, ctx.stream, fp16=ctx.colbert_fp16)
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
            self._dense[rows] = dense_rows(values[OUTPUT_DENSE])
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
