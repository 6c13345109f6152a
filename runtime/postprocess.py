"""Post-processing: a padded batch's raw backend outputs -> per-text results, back in input order.

The three heads are the unit: `DenseHead` (the normalised CLS vector, [B, D] as the graph gives it),
`SparseHead` (per-token weights aggregated per token id, FlagEmbedding's rules) and `ColbertHead`
(each text's `tokens - 1` vectors). Each has a host version (NumPy, `m3rt.kernels`) and, for the two
outputs that are large before they are reduced, a device version (`m3rt.kernels.device`) that reduces
on the GPU and copies only the compact result back. The device versions are checked bit for bit
against the host ones, so nothing after this seam knows which ran.

`PostProcessor` owns the heads and the device kernels (one `DeviceKernels` per GPU, created on first
use; its stream is the post-processing stream). Backends return raw outputs only: host arrays, or
`DeviceArray`s left on the device, possibly padded beyond the batch's length (a backend that runs
fixed shapes); the heads read the batch's positions only. `OutputCollector` receives (batch,
outputs) pairs in any order (the pipeline may deliver them out of order, and an out-of-memory retry
delivers a batch as halves) and assembles one `encode` call's results by input position.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from m3rt.device_array import DeviceArray
from m3rt.errors import BackendOutOfMemory
from m3rt.kernels import SparseRows, aggregate_sparse, colbert_counts, split_colbert
from m3rt.scheduler import Batch

OUTPUT_DENSE = "dense_vecs"
OUTPUT_SPARSE = "sparse_weights"
OUTPUT_COLBERT = "colbert_vecs"
OUTPUTS = (OUTPUT_DENSE, OUTPUT_SPARSE, OUTPUT_COLBERT)


def _host(values: Any) -> np.ndarray:
    return values.to_host() if isinstance(values, DeviceArray) else np.asarray(values)


def _on_device_as_batch(values: Any, batch: Batch, rows: int) -> bool:
    """Whether device kernels can read `values` for this batch as they are: float32, the batch's
    shape (`rows` per-token rows per text) and the batch's inputs bound beside it."""
    if not isinstance(values, DeviceArray) or values.dtype != np.float32 or values.batch_inputs is None:
        return False
    ids, mask = values.batch_inputs
    shape = batch.input_ids.shape
    return tuple(ids.shape) == shape and tuple(mask.shape) == shape and values.shape[:2] == (shape[0], rows)


class DenseHead:
    """[B, D] float32: the graph already normalised the CLS vector; a small copy when on the device."""

    name = OUTPUT_DENSE

    def host(self, values: Any, batch: Batch) -> np.ndarray:
        return np.asarray(_host(values), dtype=np.float32)


class SparseHead:
    """Per-token weights [B, S(, 1)] -> CSR rows: the max weight per token id, specials and masked
    positions dropped, non-positive weights dropped (FlagEmbedding's `_process_token_weights`)."""

    name = OUTPUT_SPARSE

    def __init__(self, special_ids: Iterable[int]) -> None:
        self.special_ids = tuple(int(x) for x in special_ids)

    def host(self, values: Any, batch: Batch) -> SparseRows:
        weights = np.asarray(_host(values), dtype=np.float32)
        length = batch.input_ids.shape[1]
        return aggregate_sparse(weights[:, :length], batch.input_ids, batch.attention_mask, self.special_ids)

    def device(self, values: DeviceArray, batch: Batch, kernels: Any) -> SparseRows | None:
        if not _on_device_as_batch(values, batch, batch.input_ids.shape[1]):
            return None
        ids, mask = values.batch_inputs  # type: ignore[misc]
        return kernels.aggregate_sparse(values.ptr, ids.ptr, mask.ptr, values.shape, self.special_ids)


class ColbertHead:
    """[B, S'-1, D] -> per text its `tokens - 1` vectors (`<s>` dropped, `</s>` kept); float16 when
    `fp16` (converted on the device where the vectors are, halving what crosses PCIe)."""

    name = OUTPUT_COLBERT

    def __init__(self, fp16: bool = False) -> None:
        self.dtype = np.dtype(np.float16 if fp16 else np.float32)

    def host(self, values: Any, batch: Batch) -> list[np.ndarray]:
        vecs = np.asarray(_host(values), dtype=np.float32)[:, : batch.input_ids.shape[1] - 1]
        # float16 -> float32 -> float16 is exact, so a float16 graph output is returned unchanged.
        return [v.astype(self.dtype, copy=False) for v in split_colbert(vecs, batch.attention_mask)]

    def device(self, values: DeviceArray, batch: Batch, kernels: Any) -> list[np.ndarray] | None:
        if not _on_device_as_batch(values, batch, batch.input_ids.shape[1] - 1):
            return None
        counts = colbert_counts(batch.attention_mask)
        return kernels.compact_colbert(values.ptr, values.shape, counts, fp16=self.dtype == np.float16)


def _reduce_on_device(head: Any, values: DeviceArray, batch: Batch, kernels: Any) -> Any:
    """`head.device`, or `head.host` where the kernels cannot read `values`. When the kernels' scratch
    does not fit in device memory, the rows are halved and retried (each half on the device again), a
    single row that still does not fit is reduced on the host: nothing is lost."""
    try:
        result = head.device(values, batch, kernels)
    except BackendOutOfMemory:
        rows = len(batch.indices)
        if rows == 1:
            return head.host(values, batch)
        parts = [
            _reduce_on_device(head, values.rows(lo, hi), _row_slice(batch, lo, hi), kernels)
            for lo, hi in ((0, rows // 2), (rows // 2, rows))
        ]
        return SparseRows.concat(parts) if isinstance(parts[0], SparseRows) else [*parts[0], *parts[1]]
    return head.host(values, batch) if result is None else result


def _row_slice(batch: Batch, start: int, stop: int) -> Batch:
    # Not scheduler.take_rows: the device outputs keep the batch's padded width, so must the inputs.
    rows = slice(start, stop)
    return Batch(batch.indices[rows], batch.input_ids[rows], batch.attention_mask[rows])


def default_device_kernels(device: int) -> Any:
    from m3rt.kernels.device import DeviceKernels

    kernels = DeviceKernels(device)
    try:
        kernels.self_check()  # a first launch that fails or computes nothing fails here, at set-up
    except BaseException:
        kernels.close()
        raise
    return kernels


class PostProcessor:
    """The three heads over raw backend outputs, on the host or on the device where the outputs are.

    `device_postprocess=False` copies device-resident outputs to the host and reduces them there.
    `device_kernels(device)` builds the kernels for one GPU (a `DeviceKernels` by default); when that
    fails (no libnvrtc, say) the outputs of that GPU are reduced on the host and `notes` says why.
    Thread-safe: each `DeviceKernels` serialises its own calls.
    """

    def __init__(
        self,
        special_ids: Iterable[int],
        *,
        colbert_fp16: bool = False,
        device_postprocess: bool = True,
        device_kernels: Callable[[int], Any] = default_device_kernels,
    ) -> None:
        self.dense = DenseHead()
        self.sparse = SparseHead(special_ids)
        self.colbert = ColbertHead(colbert_fp16)
        self.device_postprocess = bool(device_postprocess)
        self.notes: list[str] = []
        self._make_kernels = device_kernels
        self._kernels: dict[int, Any] = {}
        self._lock = threading.Lock()

    def kernels_for(self, device: int) -> Any:
        """The device kernels of GPU `device`, or None when post-processing runs on the host."""
        if not self.device_postprocess:
            return None
        with self._lock:
            if device not in self._kernels:
                try:
                    self._kernels[device] = self._make_kernels(device)
                except Exception as exc:  # noqa: BLE001 - a cuda-python binding mismatch too: the host path still works
                    self.notes.append(
                        f"device post-processing off, outputs copied to the host: {type(exc).__name__}: {exc}"
                    )
                    self._kernels[device] = None
            return self._kernels[device]

    @property
    def active_devices(self) -> list[int]:
        """The GPUs whose outputs the device kernels have reduced so far."""
        with self._lock:
            return sorted(device for device, kernels in self._kernels.items() if kernels is not None)

    def apply(self, name: str, values: Any, batch: Batch) -> Any:
        """One head on one batch's raw output `name`; results in batch row order."""
        head = {OUTPUT_DENSE: self.dense, OUTPUT_SPARSE: self.sparse, OUTPUT_COLBERT: self.colbert}[name]
        if isinstance(values, DeviceArray) and hasattr(head, "device"):
            kernels = self.kernels_for(values.device)
            if kernels is not None:
                return _reduce_on_device(head, values, batch, kernels)
        return head.host(values, batch)

    def close(self) -> None:
        """Free the device kernels' buffers and streams."""
        with self._lock:
            for kernels in self._kernels.values():
                if kernels is not None and hasattr(kernels, "close"):
                    kernels.close()
            self._kernels.clear()


class OutputCollector:
    """Assembles one `encode` call's results; each input row must be delivered exactly once.

    Not thread-safe: one pipeline's post-processing stage owns it.
    """

    def __init__(self, num_texts: int, hidden_size: int, outputs: Sequence[str], postprocessor: PostProcessor) -> None:
        unknown = set(outputs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}")
        self.num_texts = num_texts
        self.outputs = tuple(outputs)
        self._post = postprocessor
        self._delivered = np.zeros(num_texts, dtype=bool)
        self._dense = np.zeros((num_texts, hidden_size), dtype=np.float32) if OUTPUT_DENSE in outputs else None
        # Sparse rows arrive batch by batch in any order: keep the parts and which inputs they are.
        self._sparse_parts: list[SparseRows] = []
        self._sparse_inputs: list[np.ndarray] = []
        self._colbert: list[np.ndarray | None] | None = [None] * num_texts if OUTPUT_COLBERT in outputs else None

    def add(self, batch: Batch, values: Mapping[str, Any]) -> None:
        """Post-process one batch's raw backend outputs (every requested output must be present)."""
        rows = np.asarray(batch.indices, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_texts):
            raise ValueError(f"batch rows outside 0..{self.num_texts - 1}")
        ordered = np.sort(rows)  # not np.unique: its first call in a process imports numpy.ma, racily under threads
        if self._delivered[rows].any() or bool((ordered[1:] == ordered[:-1]).any()):
            raise RuntimeError(f"inputs {rows[self._delivered[rows]].tolist()} delivered twice")
        missing = [name for name in self.outputs if name not in values]
        if missing:
            raise RuntimeError(f"the backend returned no {', '.join(missing)}")
        if self._dense is not None:
            self._dense[rows] = self._post.apply(OUTPUT_DENSE, values[OUTPUT_DENSE], batch)
        if OUTPUT_SPARSE in self.outputs:
            self._sparse_parts.append(self._post.apply(OUTPUT_SPARSE, values[OUTPUT_SPARSE], batch))
            self._sparse_inputs.append(rows)
        if self._colbert is not None:
            for index, vecs in zip(rows.tolist(), self._post.apply(OUTPUT_COLBERT, values[OUTPUT_COLBERT], batch)):
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
