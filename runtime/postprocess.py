"""Post-processing: a padded batch's raw backend outputs -> per-text results, back in input order.

The heads (`m3rt.heads`: dense, sparse, ColBERT) are the unit. Each has a host reduction (NumPy,
`m3rt.kernels`) and, for the two outputs that are large before they are reduced, a device version
(`m3rt.kernels.device`) that reduces on the GPU and copies only the compact result back.

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
from typing import Any, NamedTuple

import numpy as np

from m3rt.device_array import DeviceArray
from m3rt.errors import BackendOutOfMemory
from m3rt.heads import HEAD_OUTPUTS, HEADS, OUTPUT_SPARSE, reductions
from m3rt.kernels.sparse import SparseRows
from m3rt.scheduler import Batch


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
        # Graph output -> its reduction, one per registered head.
        self.heads = reductions(special_ids, colbert_fp16)
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
        head = self.heads[name]
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


class Collected(NamedTuple):
    """One call's results in input order; None for an output that was not requested."""

    dense: np.ndarray | None
    sparse: SparseRows | None
    colbert: list[np.ndarray] | None


class OutputCollector:
    """Assembles one call's results by input position; each input row must be delivered exactly once.

    Besides the heads' results it can keep, for the granularity levels, each row's raw per-token
    sparse weights (`token_weights=True`) and, for rows listed in `hidden_rows` ({row: positions}),
    the last hidden states at those positions (output `hidden_output`, which must then be delivered).
    Not thread-safe: one pipeline's post-processing stage owns it.
    """

    def __init__(
        self,
        num_texts: int,
        hidden_size: int,
        outputs: Sequence[str],
        postprocessor: PostProcessor,
        *,
        token_weights: bool = False,
        hidden_rows: Mapping[int, np.ndarray] | None = None,
        hidden_output: str = "last_hidden_state",
    ) -> None:
        unknown = set(outputs) - set(HEAD_OUTPUTS)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}")
        self.num_texts = num_texts
        self.outputs = tuple(h.output for h in HEADS if h.output in outputs)
        self._post = postprocessor
        self._delivered = np.zeros(num_texts, dtype=bool)
        self._stores = {name: postprocessor.heads[name].start(num_texts, hidden_size) for name in self.outputs}
        self.token_weights: list[np.ndarray | None] | None = (
            [None] * num_texts if token_weights and OUTPUT_SPARSE in self.outputs else None
        )
        self._hidden_rows = dict(hidden_rows or {})
        self._hidden_output = hidden_output
        self.hidden: dict[int, np.ndarray] = {}

    def add(self, batch: Batch, values: Mapping[str, Any]) -> None:
        """Post-process one batch's raw backend outputs (every requested output must be present)."""
        rows = np.asarray(batch.indices, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_texts):
            raise ValueError(f"batch rows outside 0..{self.num_texts - 1}")
        ordered = np.sort(rows)  # not np.unique: its first call in a process imports numpy.ma, racily under threads
        if self._delivered[rows].any() or bool((ordered[1:] == ordered[:-1]).any()):
            raise RuntimeError(f"inputs {rows[self._delivered[rows]].tolist()} delivered twice")
        wanted = [*self.outputs, *([self._hidden_output] if self._hidden_rows else [])]
        missing = [name for name in wanted if name not in values]
        if missing:
            raise RuntimeError(f"the backend returned no {', '.join(missing)}")
        for name in self.outputs:
            raw = values[name]
            if name == OUTPUT_SPARSE and self.token_weights is not None:
                # The token level needs each position's weight as well, so the raw weights come to the host.
                raw = _host(raw)
                raw = raw.reshape(raw.shape[0], raw.shape[1])[:, : batch.input_ids.shape[1]]
                lengths = np.asarray(batch.attention_mask).sum(axis=1)
                for k, row in enumerate(rows.tolist()):
                    self.token_weights[row] = np.array(raw[k, : lengths[k]], dtype=np.float32)
            self._post.heads[name].put(self._stores[name], rows, self._post.apply(name, raw, batch))
        if self._hidden_rows:
            hidden = _host(values[self._hidden_output])
            for k, row in enumerate(rows.tolist()):
                if row in self._hidden_rows:
                    self.hidden[row] = np.array(hidden[k, self._hidden_rows[row]], dtype=np.float32)
        self._delivered[rows] = True

    def results(self) -> dict[str, Any]:
        """Graph output -> its results in input order, for the requested outputs."""
        if self.outputs and not self._delivered.all():
            lost = np.flatnonzero(~self._delivered)
            raise RuntimeError(f"{lost.size} inputs got no output (first: {lost[:5].tolist()})")
        return {name: self._post.heads[name].done(self._stores[name], self.num_texts) for name in self.outputs}

    def finish(self) -> Collected:
        """(dense, sparse, colbert) in input order; None for an output that was not requested."""
        results = self.results()
        return Collected(*(results.get(name) for name in HEAD_OUTPUTS))


def _host(values: Any) -> np.ndarray:
    return values.to_host() if isinstance(values, DeviceArray) else np.asarray(values)
