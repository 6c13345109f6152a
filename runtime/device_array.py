"""Device-resident backend outputs: a pointer, a shape, a dtype and whatever keeps the memory alive.

A GPU backend returns `DeviceArray`s for the outputs that are large and reduced before they reach
the host (the per-token sparse weights, the ColBERT vectors); `m3rt.postprocess` hands them to the
device kernels (`m3rt.kernels.device.DeviceKernels`), which copy only the compact results back.

Nothing here imports cuda-python: a `DeviceArray` is plain data. `to_host` copies through the CUDA
runtime and is only called where a GPU exists.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DeviceArray:
    """A C-contiguous array in device memory.

    `owner` holds the object(s) that own the memory (an ONNX Runtime OrtValue and its IOBinding):
    as long as this DeviceArray is referenced, the memory cannot be freed or reused. `context` is
    what device post-processing needs besides the array itself (kernels, stream, the batch's
    device-resident inputs); it is shared by the outputs of one backend call.
    """

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    device: int = 0
    device_type: str = "cuda"  # "cpu": ONNX Runtime CPU memory (the backend's test mode, HostPointerKernels)
    owner: Any = field(default=None, repr=False, compare=False)
    context: DeviceContext | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(x) for x in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def to_host(self) -> np.ndarray:
        """A host copy (synchronous). The producer's work must be complete (ONNX Runtime's is when
        `run_with_iobinding` returns)."""
        out = np.empty(self.shape, dtype=self.dtype)
        if out.nbytes and self.device_type == "cpu":
            ctypes.memmove(out.ctypes.data, self.ptr, out.nbytes)
        elif out.nbytes:
            from m3rt.cuda import CAPTURE_GATE, check, runtime_api

            cudart = runtime_api()
            with CAPTURE_GATE.shared():
                check(cudart.cudaSetDevice(self.device))
                kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
                check(cudart.cudaMemcpy(out.ctypes.data, self.ptr, out.nbytes, kind))
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        # np.asarray(device_array) must never read a device pointer as host memory; it copies instead.
        host = self.to_host()
        return host if dtype is None else host.astype(dtype)


@dataclass(frozen=True)
class DeviceContext:
    """What the device kernels need for one backend call's outputs.

    `kernels` has `DeviceKernels`' interface (`aggregate_sparse`, `compact_colbert`); `input_ids` and
    `attention_mask` are the batch's int64 [B, S] inputs as the backend bound them on the device;
    `stream` is the CUDA stream the kernels run on (they synchronize it before returning).
    """

    kernels: Any
    input_ids: DeviceArray
    attention_mask: DeviceArray
    stream: int = 0
    colbert_fp16: bool = False


def _host_view(ptr: int, shape: Sequence[int], dtype: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.zeros(tuple(shape), dtype)
    return np.frombuffer((ctypes.c_char * (count * dtype.itemsize)).from_address(ptr), dtype=dtype).reshape(shape)


class HostPointerKernels:
    """`DeviceKernels`' interface over host memory, computed by the CPU kernels.

    For the CUDA backend's `device_type="cpu"` mode: ONNX Runtime CPU outputs bound through IOBinding,
    wrapped in DeviceArrays with host addresses, reduced through the very same post-processing seam.
    It checks that path's plumbing (pointers, shapes, keep-alive, dispatch) where there is no GPU; the
    CUDA kernels themselves are checked against the CPU kernels by `check_kernels_against_cpu`.
    """

    def aggregate_sparse(
        self,
        weights_ptr: int,
        input_ids_ptr: int,
        attention_mask_ptr: int | None,
        shape: Sequence[int],
        special_ids: Iterable[int],
        stream: int = 0,
    ) -> Any:
        from m3rt.kernels import aggregate_sparse

        batch, seq_len = int(shape[0]), int(shape[1])
        weights = _host_view(weights_ptr, shape, np.float32).reshape(batch, seq_len).copy()
        ids = _host_view(input_ids_ptr, (batch, seq_len), np.int64).copy()
        mask = _host_view(attention_mask_ptr, (batch, seq_len), np.int64).copy() if attention_mask_ptr else None
        return aggregate_sparse(weights, ids, mask, special_ids)

    def compact_colbert(
        self, colbert_ptr: int, shape: Sequence[int], counts: Any, stream: int = 0, fp16: bool = False
    ) -> list[np.ndarray]:
        vecs = _host_view(colbert_ptr, shape, np.float32)
        counts = np.clip(np.asarray(counts, dtype=np.int64).reshape(-1), 0, int(shape[1]))
        dtype = np.float16 if fp16 else np.float32
        return [vecs[row, :n].astype(dtype, copy=True) for row, n in enumerate(counts.tolist())]
