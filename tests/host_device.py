"""A stand-in for `CudaDevice` whose buffers live in host memory, for machines without a GPU.

`OnnxRuntimeCudaBackend(graph, device=HostDevice())` runs the backend's own IOBinding code (fixed
input buffers, outputs bound to OrtValues of its own, bucket padding, the graph worker thread, raw
outputs as device arrays with the batch's inputs beside them) on ONNX Runtime's CPU provider. Its
arrays are `HostArray`s; `HostPointerKernels` has `DeviceKernels`' interface over host pointers,
computed by the CPU kernels, so the post-processor's device path (dispatch, pointers, shapes,
keep-alive) runs for real. The CUDA kernels themselves are checked against the CPU kernels in
tests/test_cuda_kernels.py.

`RecordingCuda` stands in for cuda-python's runtime and driver modules under `DeviceKernels` itself:
allocations are host memory, copies copy, kernel launches are recorded with their stream and
arguments but not run. `unordered_reads()` reports a kernel that reads a buffer whose host->device
copy is not ordered before it (another stream, no synchronize between).
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


# ---------------------------------------------------------------------------------------------------
# A recording stand-in for cuda-python's runtime and driver modules (host memory, no kernels run):
# what `DeviceKernels` and the test helpers enqueue, on which stream, in which order.


class _Enum:
    def __init__(self, **values: int) -> None:
        self.__dict__.update(values)


@dataclass
class CudaCall:
    op: str  # "h2d", "d2h", "launch", "sync", "malloc", "free"
    stream: int | None  # None: the synchronous legacy-stream cudaMemcpy
    ptr: int = 0  # the device buffer written (h2d) or read (d2h)
    args: tuple[int, ...] = ()  # a launch's arguments read as 64-bit values
    name: str = ""
    pinned: bool = False  # h2d: the source is page-locked (cudaMallocHost)


# Arguments of each kernel (kernels/cuda/*.cu), to read a launch's parameter array.
ARGUMENT_COUNTS = {
    "m3rt_sparse_clear": 2,
    "m3rt_sparse_insert": 10,
    "m3rt_sparse_count": 6,
    "m3rt_sparse_offsets": 3,
    "m3rt_sparse_compact": 8,
    "m3rt_colbert_compact": 7,
}


class RecordingCuda:
    """`cuda.bindings.runtime` and `.driver` as far as m3rt uses them, over host memory.

    Copies really copy; kernel launches are recorded, not run. `out_of_memory_above` makes any
    cudaMalloc larger than it fail with cudaErrorMemoryAllocation (2).
    """

    LEGACY = 0

    def __init__(self, out_of_memory_above: int | None = None) -> None:
        self.calls: list[CudaCall] = []
        self.out_of_memory_above = out_of_memory_above
        self._memory: dict[int, Any] = {}  # device and pinned allocations by address
        self.device_ptrs: set[int] = set()
        self.pinned_ptrs: set[int] = set()
        self._next_stream = 100
        self.cudaMemcpyKind = _Enum(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
        self.cudaStreamNonBlocking = 1
        self.runtime, self.driver = self, self  # one object serves both modules

    # -- runtime ---------------------------------------------------------------------------------
    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaGetErrorName(self, err):
        return 0, {2: b"cudaErrorMemoryAllocation"}.get(int(err), b"cudaErrorUnknown")

    def cudaSetDevice(self, device):
        return (0,)

    def _alloc(self, nbytes: int, pinned: bool):
        buffer = ctypes.create_string_buffer(max(int(nbytes), 1))
        ptr = ctypes.addressof(buffer)
        self._memory[ptr] = buffer
        (self.pinned_ptrs if pinned else self.device_ptrs).add(ptr)
        self.calls.append(CudaCall("malloc", None, ptr, name="pinned" if pinned else "device"))
        return 0, ptr

    def cudaMalloc(self, nbytes):
        if self.out_of_memory_above is not None and nbytes > self.out_of_memory_above:
            return 2, None
        return self._alloc(nbytes, pinned=False)

    def cudaMallocHost(self, nbytes):
        return self._alloc(nbytes, pinned=True)

    def cudaFree(self, ptr):
        if ptr:
            self._memory.pop(int(ptr), None)
            self.device_ptrs.discard(int(ptr))
            self.calls.append(CudaCall("free", None, int(ptr)))
        return (0,)

    def cudaFreeHost(self, ptr):
        self._memory.pop(int(ptr), None)
        self.pinned_ptrs.discard(int(ptr))
        return (0,)

    def cudaStreamCreateWithFlags(self, flags):
        self._next_stream += 1
        return 0, self._next_stream

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaStreamSynchronize(self, stream):
        self.calls.append(CudaCall("sync", int(stream)))
        return (0,)

    def _copy(self, dst, src, nbytes, kind, stream):
        ctypes.memmove(int(dst), int(src), int(nbytes))
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.calls.append(CudaCall("h2d", stream, int(dst), pinned=self._in_pinned(int(src))))
        else:
            self.calls.append(CudaCall("d2h", stream, int(src)))
        return (0,)

    def _in_pinned(self, address: int) -> bool:
        return any(p <= address < p + len(self._memory[p]) for p in self.pinned_ptrs)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        return self._copy(dst, src, nbytes, kind, int(stream))

    def cudaMemcpy(self, dst, src, nbytes, kind):
        return self._copy(dst, src, nbytes, kind, None)

    # -- driver ----------------------------------------------------------------------------------
    def CUstream(self, stream):
        return int(stream)

    def cuGetErrorName(self, err):
        return 0, b"CUDA_ERROR_OUT_OF_MEMORY" if int(err) == 2 else b"CUDA_ERROR_UNKNOWN"

    def cuLaunchKernel(self, function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        count = ARGUMENT_COUNTS[str(function)]
        pointers = host_view(int(params), (count,), np.uint64)
        # Each argument read as 64 bits: enough to recognise the device pointers among them.
        args = tuple(int(host_view(int(p), (1,), np.uint64)[0]) for p in pointers)
        self.calls.append(CudaCall("launch", int(stream), args=args, name=str(function)))
        return (0,)

    # -- what the log says -----------------------------------------------------------------------
    def unordered_reads(self) -> list[str]:
        """Launches that read a device buffer whose last host->device copy is not ordered before them:
        the copy was on another stream (the legacy one included) and that stream was not synchronized
        in between."""
        problems = []
        last_write: dict[int, tuple[int, CudaCall]] = {}
        for at, call in enumerate(self.calls):
            if call.op == "h2d":
                last_write[call.ptr] = (at, call)
            elif call.op == "launch":
                for ptr in set(call.args) & self.device_ptrs:
                    if ptr not in last_write:
                        continue
                    where, copy = last_write[ptr]
                    synced = any(c.op == "sync" and c.stream == copy.stream for c in self.calls[where:at])
                    if copy.stream != call.stream and not synced:
                        problems.append(f"{call.name} on stream {call.stream} reads a copy made on {copy.stream}")
        return problems


def install_recording_cuda(monkeypatch: Any, cuda: RecordingCuda) -> RecordingCuda:
    """Route m3rt's cuda-python calls (and the kernel test helpers') to `cuda`; the kernels are
    registered under their own names instead of being compiled and loaded."""
    from m3rt.kernels import cuda_api
    from m3rt.kernels import device as dk

    for module in (cuda_api, dk):
        monkeypatch.setattr(module, "runtime_api", lambda: cuda)
        monkeypatch.setattr(module, "driver_api", lambda: cuda)
    monkeypatch.setattr(dk, "gpu_unavailable_reason", lambda: None)
    monkeypatch.setattr(dk._Modules, "get", classmethod(lambda cls, device: ("sm_90", {k: k for k in dk.KERNELS})))
    try:
        import kernel_cases

        monkeypatch.setattr(kernel_cases, "runtime_api", lambda: cuda)
    except ImportError:
        pass
    return cuda
