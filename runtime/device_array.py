"""Device-resident backend outputs: a pointer, a shape, a dtype and whatever keeps the memory alive.

A GPU backend returns its raw outputs as `DeviceArray`s and leaves them on the device; the
post-processor (`m3rt.postprocess`) reduces the large ones there with the device kernels
(`m3rt.kernels.device.DeviceKernels`), which copy only the compact results back, and copies the
rest with `to_host`.

Nothing here imports cuda-python: a `DeviceArray` is plain data. `to_host` copies through the CUDA
runtime and is only called where a GPU exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DeviceArray:
    """A C-contiguous array in device memory.

    `owner` holds the object(s) that own the memory (an ONNX Runtime OrtValue and its IOBinding): as
    long as this DeviceArray is referenced, the memory cannot be freed or reused. `batch_inputs` is
    the batch's (input_ids, attention_mask) as the backend bound them on the same device, int64
    [B, S]: the sparse kernel reads the token ids and the mask from there instead of uploading them
    again.
    """

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    device: int = 0
    owner: Any = field(default=None, repr=False, compare=False)
    batch_inputs: tuple[DeviceArray, DeviceArray] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(x) for x in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> DeviceArray:
        """Rows `start:stop` along the first axis, in place (no copy); `batch_inputs` likewise."""
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        start, stop, _ = slice(start, stop).indices(self.shape[0])
        inputs = self.batch_inputs
        return replace(
            self,
            ptr=self.ptr + start * row_bytes,
            shape=(max(stop - start, 0), *self.shape[1:]),
            batch_inputs=None if inputs is None else (inputs[0].rows(start, stop), inputs[1].rows(start, stop)),
        )

    def to_host(self) -> np.ndarray:
        """A host copy (synchronous). The producer's work must be complete (ONNX Runtime's is when
        `run_with_iobinding` returns)."""
        out = np.empty(self.shape, dtype=self.dtype)
        if out.nbytes:
            from m3rt.kernels.cuda_api import CAPTURE_GATE, check, runtime_api

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
