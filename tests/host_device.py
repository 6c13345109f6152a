"""A stand-in for `CudaDevice` whose buffers live in host memory, for machines without a GPU.

`OnnxRuntimeCudaBackend(graph, device=HostDevice())` runs the backend's own IOBinding code (fixed
input buffers, outputs bound to OrtValues of its own, bucket padding, the graph worker thread, raw
outputs as device arrays with the batch's inputs beside them) on ONNX Runtime's CPU provider. Its
arrays are `HostArray`s; `HostPointerKernels` has `DeviceKernels`' interface over host pointers,
computed by the CPU kernels, so the post-processor's device path (dispatch, pointers, shapes,
keep-alive) runs for real. The CUDA kernels themselves are checked against the CPU kernels in
tests/test_cuda_kernels.py.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3rt.device_array import DeviceArray
from m3rt.kernels.sparse import aggregate_sparse


def host_view(ptr: int, shape: Sequence[int], dtype: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.zeros(tuple(shape), dtype)
    return np.frombuffer((ctypes.c_char * (count * dtype.itemsize)).from_address(ptr), dtype=dtype).reshape(shape)


@dataclass(frozen=True)
class HostArray(DeviceArray):
    """A DeviceArray whose pointer is a host address."""

    def to_host(self) -> np.ndarray:
        return host_view(self.ptr, self.shape, self.dtype).copy()


class HostDevice:
    """`CudaDevice`'s interface on ONNX Runtime's CPU allocator (no CUDA graphs are captured: the
    buckets run as plain padded runs through the same code)."""

    ort_device = "cpu"

    def __init__(self, device_id: int = 0) -> None:
        self.device_id = device_id
        self.closed = False

    def providers(self, options: dict[str, str], cuda_graph: bool) -> list[Any]:
        return ["CPUExecutionProvider"]

    def check_session(self, session: Any) -> None:
        pass

    def activate(self) -> None:
        pass

    def upload(self, dst_ptr: int, host: np.ndarray) -> None:
        ctypes.memmove(dst_ptr, host.ctypes.data, host.nbytes)

    def array(self, ptr: int, shape: Sequence[int], dtype: Any, **fields: Any) -> HostArray:
        return HostArray(ptr, tuple(shape), dtype, self.device_id, **fields)

    def close(self) -> None:
        self.closed = True


class HostPointerKernels:
    """`DeviceKernels`' interface over host memory, computed by the CPU kernels; counts its calls."""

    def __init__(self) -> None:
        self.calls = {"aggregate_sparse": 0, "compact_colbert": 0}
        self.closed = False

    def aggregate_sparse(
        self,
        weights_ptr: int,
        input_ids_ptr: int,
        attention_mask_ptr: int | None,
        shape: Sequence[int],
        special_ids: Iterable[int],
        stream: int | None = None,
    ) -> Any:
        self.calls["aggregate_sparse"] += 1
        batch, seq_len = int(shape[0]), int(shape[1])
        weights = host_view(weights_ptr, shape, np.float32).reshape(batch, seq_len).copy()
        ids = host_view(input_ids_ptr, (batch, seq_len), np.int64).copy()
        mask = host_view(attention_mask_ptr, (batch, seq_len), np.int64).copy() if attention_mask_ptr else None
        return aggregate_sparse(weights, ids, mask, special_ids)

    def compact_colbert(
        self, colbert_ptr: int, shape: Sequence[int], counts: Any, stream: int | None = None, fp16: bool = False
    ) -> list[np.ndarray]:
        self.calls["compact_colbert"] += 1
        vecs = host_view(colbert_ptr, shape, np.float32)
        counts = np.clip(np.asarray(counts, dtype=np.int64).reshape(-1), 0, int(shape[1]))
        dtype = np.float16 if fp16 else np.float32
        return [vecs[row, :n].astype(dtype, copy=True) for row, n in enumerate(counts.tolist())]

    def close(self) -> None:
        self.closed = True
