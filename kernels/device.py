"""Device-side post-processing: the CUDA kernels of kernels/cuda/, compiled at run time with NVRTC.

The model's outputs already live on the GPU; aggregating the sparse weights and dropping ColBERT
padding there means only the compact results cross PCIe. CPU twins with the reference semantics:
`m3rt.kernels.sparse.aggregate_sparse` and `m3rt.kernels.colbert.split_colbert`.

cuda-python is imported lazily (never by `import m3rt.kernels`). It is used through
`cuda.bindings` (nvrtc, driver, runtime), whose API mirrors the C API and is stable across
releases; `cuda.core` lived in `cuda.core.experimental`, "subject to change without deprecation",
until recently, so it is not relied on. Device pointers are plain ints (OrtValue.data_ptr(), CuPy
`.data.ptr`, torch `.data_ptr()`), streams are `cudaStream_t` handles as ints (0 = legacy default).
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from m3rt.errors import BackendError, BackendOutOfMemory, InputError
from m3rt.kernels.colbert import colbert_counts, split_colbert
from m3rt.kernels.cuda_api import (
    CAPTURE_GATE,
    INSTALL_HINT,
    NVRTC_OUT_OF_MEMORY,
    as_text,
    check,
    check_driver,
    driver_api,
    gpu_unavailable_reason,
    nvrtc_api,
    runtime_api,
    unpack,
)
from m3rt.kernels.sparse import SparseRows, aggregate_sparse

CUDA_DIR = Path(__file__).resolve().parent / "cuda"
HEADER = "m3rt_kernels.cuh"
SOURCES = ("sparse_aggregate.cu", "colbert_compact.cu")
KERNELS = (
    "m3rt_sparse_clear",
    "m3rt_sparse_insert",
    "m3rt_sparse_count",
    "m3rt_sparse_offsets",
    "m3rt_sparse_compact",
    "m3rt_colbert_compact",
)
# Must match M3RT_ROW_THREADS / M3RT_SCAN_THREADS / M3RT_COPY_THREADS and sizeof(m3rt_sparse_slot).
ROW_THREADS = 256
SCAN_THREADS = 1024
COPY_THREADS = 256
SLOT_BYTES = 12
# Grid-stride kernels need no more blocks than keep the GPU busy; fewer launches of huge grids.
MAX_STRIDE_BLOCKS = 8192
MAX_GRID_Y = 65535

NVRTC_HINT = (
    "libnvrtc was not found: install the CUDA toolkit, or pip install nvidia-cuda-nvrtc (CUDA 13) / "
    "nvidia-cuda-nvrtc-cu12 (CUDA 12)"
)


def _nvrtc_call(nvrtc, result: tuple, what: str) -> Any:
    return unpack(
        result,
        lambda err: f"NVRTC {what} failed: {as_text(nvrtc.nvrtcGetErrorString(err)[1])}",
        out_of_memory=NVRTC_OUT_OF_MEMORY,
    )


def read_sources() -> dict[str, bytes]:
    """The CUDA sources by file name (header first), as shipped in the package."""
    names = (HEADER, *SOURCES)
    missing = [n for n in names if not (CUDA_DIR / n).is_file()]
    if missing:
        raise BackendError(f"CUDA sources missing from the m3rt install: {', '.join(missing)} in {CUDA_DIR}")
    return {name: (CUDA_DIR / name).read_bytes() for name in names}


def supported_archs() -> list[int]:
    """Compute capabilities (e.g. 90) the available NVRTC can target."""
    nvrtc = nvrtc_api()
    try:
        return sorted(int(a) for a in _nvrtc_call(nvrtc, nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))
    except BackendError:
        raise
    except Exception as exc:  # cuda-python raises its own loader errors when libnvrtc is absent
        raise BackendError(f"{NVRTC_HINT} ({exc})") from exc


def target_arch(major: int, minor: int) -> str:
    """`sm_XY` (a cubin) when NVRTC knows the device, else PTX for the newest older arch (driver JIT)."""
    cc = major * 10 + minor
    archs = supported_archs()
    if cc in archs:
        return f"sm_{cc}"
    older = [a for a in archs if a <= cc]
    if not older:
        raise BackendError(f"NVRTC cannot target compute capability {major}.{minor} (supports {archs})")
    return f"compute_{older[-1]}"


@functools.cache
def compile_sources(arch: str = "sm_90") -> bytes:
    """Compile every kernel into one image: a cubin for `sm_XY`, PTX for `compute_XY`.

    Needs only libnvrtc, no GPU. Cached per process and arch. The header and the sources are handed
    to NVRTC from memory, so nothing depends on include paths or the current directory.
    """
    nvrtc = nvrtc_api()
    files = read_sources()
    program_src = "".join(f'#include "{name}"\n' for name in SOURCES).encode()
    names = list(files)
    try:
        prog = _nvrtc_call(
            nvrtc,
            nvrtc.nvrtcCreateProgram(
                program_src, b"m3rt_kernels.cu", len(names), list(files.values()), [n.encode() for n in names]
            ),
            "nvrtcCreateProgram",
        )
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(f"{NVRTC_HINT} ({exc})") from exc
    try:
        # No fast-math: the kernels must reproduce the CPU results bit for bit.
        options = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        if int(err) != 0:
            size = _nvrtc_call(nvrtc, nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            _nvrtc_call(nvrtc, nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            raise BackendError(f"NVRTC could not compile the m3rt kernels for {arch}:\n{log.decode(errors='replace')}")
        if arch.startswith("sm_"):
            size = _nvrtc_call(nvrtc, nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
            image = b" " * size
            _nvrtc_call(nvrtc, nvrtc.nvrtcGetCUBIN(prog, image), "nvrtcGetCUBIN")
        else:
            size = _nvrtc_call(nvrtc, nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
            image = b" " * size
            _nvrtc_call(nvrtc, nvrtc.nvrtcGetPTX(prog, image), "nvrtcGetPTX")
        return image
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def sparse_table_log2(seq_len: int) -> int:
    """log2 of the hash-table slots per row: a power of two >= 2 * seq_len (m3rt_sparse_table_log2)."""
    log2 = 4
    while (1 << log2) < 2 * seq_len:
        log2 += 1
    return log2


class _Modules:
    """One loaded module per device per process (the primary context outlives any DeviceKernels)."""

    lock = threading.Lock()
    by_device: dict[int, tuple[str, dict[str, Any]]] = {}

    @classmethod
    def get(cls, device: int) -> tuple[str, dict[str, Any]]:
        with cls.lock:
            if device not in cls.by_device:
                driver = driver_api()
                props = check(runtime_api().cudaGetDeviceProperties(device))
                arch = target_arch(props.major, props.minor)
                image = compile_sources(arch)
                if not image.endswith(b"\0"):
                    image += b"\0"  # PTX is read as a C string (a cubin does not care)
                image = np.frombuffer(image, dtype=np.uint8)
                module = check_driver(driver.cuModuleLoadData(image.ctypes.data))
                functions = {name: check_driver(driver.cuModuleGetFunction(module, name.encode())) for name in KERNELS}
                cls.by_device[device] = (arch, functions)
            return cls.by_device[device]


class DeviceKernels:
    """Runs m3rt's CUDA kernels on device buffers and returns compact host results.

    Every method enqueues on `stream` (by default the instance's own non-blocking stream), copies only
    the compact result to pinned host memory and synchronizes that stream before returning. The
    inputs must be complete in `stream`'s order: pass the stream that produced them, or synchronize
    their producer first. ONNX Runtime's outputs are complete when `run_with_iobinding` returns: it
    synchronizes its stream then unless the run option `disable_synchronize_execution_providers` is
    "1" (InferenceSession::Run -> OnRunEnd(sync_stream=true); a CUDA-graph replay syncs too), which
    m3rt never sets, so the post-processor reads them on the kernels' own stream without waiting.
    Scratch buffers grow and are then reused, so steady state allocates nothing on the device. Sparse scratch is about
    12 * B * (2 S rounded up to a power of two) + 16 * B * S bytes (~80 MiB for B = 256, S = 8192).
    One instance serializes its own calls (a lock); use one instance per thread for concurrency.
    Calls make `device` current on the calling thread.
    """

    def __init__(self, device: int = 0) -> None:
        reason = gpu_unavailable_reason()
        if reason is not None:
            raise BackendError(f"device kernels need a CUDA GPU: {reason}. GPU support: {INSTALL_HINT}")
        self.device = device
        self._cudart = runtime_api()
        self._driver = driver_api()
        self._activate()
        check(self._cudart.cudaFree(0))  # older runtimes create the primary context lazily
        self.arch, self._functions = _Modules.get(device)
        self._lock = threading.Lock()
        self._device_buffers: dict[str, tuple[int, int]] = {}
        self._host_buffers: dict[str, tuple[int, int]] = {}
        self._specials: tuple[int, ...] | None = None
        self.stream = int(check(self._cudart.cudaStreamCreateWithFlags(self._cudart.cudaStreamNonBlocking)))

    # -- public API ------------------------------------------------------------------------------

    @property
    def scratch(self) -> dict[str, tuple[int, int]]:
        """The device scratch buffers by name: (pointer, bytes); equal across calls in steady state."""
        with self._lock:
            return dict(self._device_buffers)

    def aggregate_sparse(
        self,
        weights_ptr: int,
        input_ids_ptr: int,
        attention_mask_ptr: int | None,
        shape: Sequence[int],
        special_ids: Iterable[int],
        stream: int | None = None,
    ) -> SparseRows:
        """Device twin of `aggregate_sparse`.

        weights: float32 of `shape` [B, S] or [B, S, 1]; input_ids and attention_mask: int64 [B, S],
        contiguous; attention_mask_ptr None or 0 keeps every position.
        """
        batch, seq_len = _sparse_shape(shape)
        stream = self.stream if stream is None else stream
        if batch == 0 or seq_len == 0:
            return SparseRows(np.zeros(batch + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        tokens = batch * seq_len
        log2 = sparse_table_log2(seq_len)
        slots = batch << log2
        cudart = self._cudart
        with self._lock, CAPTURE_GATE.shared(), self._released_on_out_of_memory(stream):
            self._activate()
            specials_ptr, num_special = self._upload_specials(special_ids, stream)
            table = self._device("sparse_table", slots * SLOT_BYTES)
            slot_of = self._device("sparse_slot_of", tokens * 4)
            counts = self._device("sparse_counts", batch * 4)
            offsets = self._device("sparse_offsets", (batch + 1) * 8)
            entries = self._device("sparse_entries", tokens * 12)
            p, i32, i64 = np.uint64, np.int32, np.int64
            self._launch("m3rt_sparse_clear", _stride_grid(slots), ROW_THREADS, stream, (p, table), (i64, slots))
            self._launch(
                "m3rt_sparse_insert", _stride_grid(tokens), ROW_THREADS, stream,
                (p, weights_ptr), (p, input_ids_ptr), (p, attention_mask_ptr or 0), (p, specials_ptr),
                (i32, num_special), (i32, batch), (i32, seq_len), (i32, log2), (p, table), (p, slot_of),
            )  # fmt: skip
            self._launch(
                "m3rt_sparse_count", batch, ROW_THREADS, stream,
                (p, slot_of), (p, table), (i32, batch), (i32, seq_len), (i32, log2), (p, counts),
            )  # fmt: skip
            self._launch("m3rt_sparse_offsets", 1, SCAN_THREADS, stream, (p, counts), (i32, batch), (p, offsets))
            self._launch(
                "m3rt_sparse_compact", batch, ROW_THREADS, stream,
                (p, input_ids_ptr), (p, slot_of), (p, table), (p, offsets), (i32, batch), (i32, seq_len),
                (i32, log2), (p, entries),
            )  # fmt: skip
            # The entry count is known only on the device: read the offsets first (B + 1 int64s), then
            # copy exactly offsets[B] ids and weights in one transfer.
            host = self._host("sparse", (batch + 1) * 8)
            self._copy_to_host(host, offsets, (batch + 1) * 8, stream)
            check(cudart.cudaStreamSynchronize(stream))
            indptr = _host_array(host, (batch + 1) * 8, np.int64).copy()
            total = int(indptr[-1])
            if total == 0:
                return SparseRows(indptr, np.zeros(0, np.int64), np.zeros(0, np.float32))
            host = self._host("sparse", total * 12)
            self._copy_to_host(host, entries, total * 12, stream)
            check(cudart.cudaStreamSynchronize(stream))
            ids = _host_array(host, total * 8, np.int64).copy()
            weights = _host_array(host + total * 8, total * 4, np.float32).copy()
        return SparseRows(indptr, ids, weights)

    def compact_colbert(
        self,
        colbert_ptr: int,
        shape: Sequence[int],
        counts: np.ndarray | Sequence[int],
        stream: int | None = None,
        fp16: bool = False,
    ) -> list[np.ndarray]:
        """Device twin of `split_colbert`: per-row host arrays [counts[r], D].

        colbert: float32 [B, S-1, D] contiguous; counts: per-row valid vectors (host), e.g.
        `colbert_counts(attention_mask)`, clamped to [0, S-1]. fp16=True converts on the device
        (round to nearest even, as numpy's astype(float16)) and returns float16 arrays.
        """
        if len(shape) != 3:
            raise InputError(f"colbert shape {tuple(shape)} must be [batch, seq - 1, dim]")
        batch, rows_per_text, dim = (int(x) for x in shape)
        counts = np.clip(np.asarray(counts, dtype=np.int64).reshape(-1), 0, rows_per_text)
        if counts.shape[0] != batch:
            raise InputError(f"{counts.shape[0]} ColBERT counts for a batch of {batch}")
        stream = self.stream if stream is None else stream
        dtype = np.dtype(np.float16 if fp16 else np.float32)
        offsets = np.zeros(batch + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        total = int(offsets[-1])
        if total == 0 or dim == 0:
            return [np.zeros((int(n), dim), dtype) for n in counts]
        out_bytes = total * dim * dtype.itemsize
        offsets_bytes = (batch + 1) * 8
        with self._lock, CAPTURE_GATE.shared(), self._released_on_out_of_memory(stream):
            self._activate()
            d_offsets = self._device("colbert_offsets", offsets_bytes)
            d_out = self._device("colbert_out", out_bytes)
            # One pinned buffer: the offsets to upload, then the result (the stream orders the two).
            host = self._host("colbert", offsets_bytes + out_bytes)
            _host_array(host, offsets_bytes, np.int64)[:] = offsets
            kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            check(self._cudart.cudaMemcpyAsync(d_offsets, host, offsets_bytes, kind, stream))
            vec = 4 if dim % 4 == 0 else 1
            grid_x = max(1, min(-(-int(counts.max()) * dim // (vec * COPY_THREADS)), 1024))
            p, i32 = np.uint64, np.int32
            self._launch(
                "m3rt_colbert_compact", (grid_x, min(batch, MAX_GRID_Y)), COPY_THREADS, stream,
                (p, colbert_ptr), (p, d_offsets), (i32, batch), (i32, rows_per_text), (i32, dim), (i32, int(fp16)),
                (p, d_out),
            )  # fmt: skip
            self._copy_to_host(host + offsets_bytes, d_out, out_bytes, stream)
            check(self._cudart.cudaStreamSynchronize(stream))
            flat = _host_array(host + offsets_bytes, out_bytes, dtype).reshape(total, dim)
            # Copies, so that the reused pinned buffer is free again and a kept text owns only its rows.
            return [flat[lo:hi].copy() for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist())]

    def close(self) -> None:
        """Free the scratch buffers and the stream (the compiled module stays loaded for the process)."""
        with self._lock, CAPTURE_GATE.shared():
            self._activate()
            self._free_scratch()
            if self.stream:
                self._cudart.cudaStreamDestroy(self.stream)
                self.stream = 0

    def self_check(self) -> None:
        """Run both kernels once on a small batch and compare with the CPU kernels, bit for bit.

        What compiles and loads can still fail at its first launch, or launch and compute nothing (a
        cuda-python whose launch API takes its arguments differently): checked here, at set-up, so
        that the post-processor falls back to the host with a note instead of failing every batch.
        BackendError says what differed.
        """
        ids = np.array([[0, 7, 9, 7, 2, 1], [0, 5, 2, 1, 1, 1]], np.int64)
        mask = (ids != 1).astype(np.int64)
        weights = np.array([[0.5, 0.25, 0.75, 1.5, 0.1, 9.0], [0.3, 2.0, 0.2, 9.0, 9.0, 9.0]], np.float32)
        vecs = np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4) / 8
        arrays = [np.ascontiguousarray(a) for a in (weights, ids, mask, vecs)]
        cudart, kind = self._cudart, self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        pointers: list[int] = []
        try:
            with self._lock, CAPTURE_GATE.shared():
                self._activate()
                for array in arrays:
                    pointers.append(int(check(cudart.cudaMalloc(array.nbytes))))
                    check(cudart.cudaMemcpyAsync(pointers[-1], array.ctypes.data, array.nbytes, kind, self.stream))
                check(cudart.cudaStreamSynchronize(self.stream))
            w_ptr, ids_ptr, mask_ptr, vecs_ptr = pointers
            sparse = self.aggregate_sparse(w_ptr, ids_ptr, mask_ptr, weights.shape, (0, 1, 2, 3))
            colbert = self.compact_colbert(vecs_ptr, vecs.shape, colbert_counts(mask))
        finally:
            with CAPTURE_GATE.shared():
                for ptr in pointers:
                    cudart.cudaFree(ptr)
        want_sparse = aggregate_sparse(weights, ids, mask, (0, 1, 2, 3))
        want_colbert = split_colbert(vecs, mask)
        same_sparse = all(
            np.array_equal(getattr(sparse, k), getattr(want_sparse, k)) for k in ("indptr", "indices", "values")
        )
        same_colbert = len(colbert) == len(want_colbert) and all(
            g.shape == w.shape and np.array_equal(g, w) for g, w in zip(colbert, want_colbert)
        )
        if not (same_sparse and same_colbert):
            wrong = [name for name, ok in (("sparse", same_sparse), ("ColBERT", same_colbert)) if not ok]
            raise BackendError(
                f"the device kernels' {' and '.join(wrong)} results differ from the CPU kernels' on a small "
                f"check batch (arch {self.arch}; a cuda-python launch API this code does not match?)"
            )

    def __enter__(self) -> DeviceKernels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------

    def _free_scratch(self) -> None:
        for ptr, _ in self._device_buffers.values():
            self._cudart.cudaFree(ptr)
        for ptr, _ in self._host_buffers.values():
            self._cudart.cudaFreeHost(ptr)
        self._device_buffers.clear()
        self._host_buffers.clear()
        self._specials = None

    @contextmanager
    def _released_on_out_of_memory(self, stream: int) -> Iterator[None]:
        """An allocation failure frees every scratch buffer before it propagates: the caller retries
        smaller parts (m3rt.postprocess splits the batch), which then find the memory free."""
        try:
            yield
        except BackendOutOfMemory:
            self._cudart.cudaStreamSynchronize(stream)  # nothing of ours may still read the buffers
            self._free_scratch()
            raise

    def _activate(self) -> None:
        # cudaSetDevice makes the device's primary context current (initialising it, CUDA >= 12),
        # which the driver-API module and launches use; cheap when it is already current.
        check(self._cudart.cudaSetDevice(self.device))

    def _device(self, name: str, nbytes: int) -> int:
        return self._grow(self._device_buffers, name, nbytes, self._cudart.cudaMalloc, self._cudart.cudaFree)

    def _host(self, name: str, nbytes: int) -> int:
        return self._grow(self._host_buffers, name, nbytes, self._cudart.cudaMallocHost, self._cudart.cudaFreeHost)

    @staticmethod
    def _grow(buffers: dict[str, tuple[int, int]], name: str, nbytes: int, alloc: Callable, free: Callable) -> int:
        ptr, size = buffers.get(name, (0, 0))
        if nbytes <= size:
            return ptr
        if ptr:
            free(ptr)  # implicitly synchronizes, and only on growth
            del buffers[name]
        # Headroom so that slowly growing batches do not reallocate every call.
        size = max(nbytes, size + size // 2, 1 << 16)
        size = -(-size // (1 << 16)) * (1 << 16)
        ptr = int(check(alloc(size)))
        buffers[name] = (ptr, size)
        return ptr

    def _upload_specials(self, special_ids: Iterable[int], stream: int) -> tuple[int, int]:
        specials = tuple(int(x) for x in special_ids)
        if not specials:
            return 0, 0
        ptr = self._device("specials", len(specials) * 8)
        if specials != self._specials:
            # On the kernels' stream, from pinned memory: a cudaMemcpy on the legacy stream is not
            # ordered before work on a non-blocking stream. Every call ends with a synchronize of its
            # stream, so a later call on another stream finds the copy complete.
            nbytes = len(specials) * 8
            host = self._host("specials", nbytes)
            _host_array(host, nbytes, np.int64)[:] = specials
            kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            check(self._cudart.cudaMemcpyAsync(ptr, host, nbytes, kind, stream))
            self._specials = specials
        return ptr, len(specials)

    def _copy_to_host(self, host_ptr: int, device_ptr: int, nbytes: int, stream: int) -> None:
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(self._cudart.cudaMemcpyAsync(host_ptr, device_ptr, nbytes, kind, stream))

    def _launch(self, name: str, grid: int | tuple[int, int], block: int, stream: int, *args: tuple) -> None:
        gx, gy = grid if isinstance(grid, tuple) else (grid, 1)
        # cuLaunchKernel takes void*[]: one pointer per argument to a value of the kernel's own type.
        values = [np.array([value], dtype=dtype) for dtype, value in args]
        pointers = np.array([v.ctypes.data for v in values], dtype=np.uint64)
        check_driver(
            self._driver.cuLaunchKernel(
                self._functions[name], gx, gy, 1, block, 1, 1, 0, self._driver.CUstream(stream),
                pointers.ctypes.data, 0,
            )
        )  # fmt: skip


def _sparse_shape(shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(int(x) for x in shape)
    if len(shape) == 3 and shape[2] == 1:
        shape = shape[:2]
    if len(shape) != 2:
        raise InputError(f"sparse weights shape {shape} must be [batch, seq] or [batch, seq, 1]")
    batch, seq_len = shape
    if seq_len >= 1 << 28 or batch >= 1 << 31:
        raise InputError(f"sparse weights shape {shape} is too large for the device kernel")
    return batch, seq_len


def _stride_grid(n: int) -> int:
    return max(1, min(-(-n // ROW_THREADS), MAX_STRIDE_BLOCKS))


def _host_array(ptr: int, nbytes: int, dtype: Any) -> np.ndarray:
    """A numpy view of pinned host memory (valid until the buffer grows)."""
    return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype)
