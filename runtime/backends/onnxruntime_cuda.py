"""ONNX Runtime on a CUDA GPU: `OnnxRuntimeCudaBackend`, the GPU serving path.

- inputs: one host->device copy per batch (ids and mask in one int64 buffer allocated by ONNX Runtime's
  CUDA allocator), bound with IOBinding;
- outputs: bound to device buffers of our own and returned there, raw, as `DeviceArray`s; the
  post-processor (`m3rt.postprocess`) reduces the sparse weights and ColBERT vectors with the device
  kernels, so only the compact sparse entries and the unpadded ColBERT rows cross PCIe;
- CUDA graphs for batch-1 queries: the query is right-padded to a bucket length (16/32/64 tokens by
  default) and replayed from one captured graph per bucket (ONNX Runtime's `gpu_graph_id` run option);
  every other batch runs normally (`gpu_graph_id=-1`) in the same session.

Nothing in the CUDA path has run on a GPU yet: the ONNX Runtime calls follow its documentation and
sources (cited inline); `benchmarks/gpu_check.py` is the check that runs it.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from m3rt.backends.onnxruntime import (
    CPU_BUILD_HINT,
    CUDA_PROVIDER,
    backend_error,
    check_io,
    is_out_of_memory_text,
    option_text,
    ort,
    session_options,
)
from m3rt.core import Capabilities
from m3rt.device_array import DeviceArray
from m3rt.errors import ArtifactError, BackendError, BackendOutOfMemory, M3Error
from m3rt.manifest import INPUT_NAMES, OUTPUT_NAMES

# Batch-1 queries up to the largest bucket are padded to the next bucket and replayed from a CUDA
# graph. Three buckets cover FlagEmbedding-style queries (most are under 32 tokens) at three captured
# graphs' worth of memory (the activations of a [1, 64] forward: well under 100 MB).
DEFAULT_GRAPH_BUCKETS = (16, 32, 64)


def cuda_unavailable_reason() -> str | None:
    """Why ONNX Runtime cannot run on a CUDA GPU here (wrong package, no cuda-python, no GPU), or None."""
    available = ort.get_available_providers()
    if CUDA_PROVIDER not in available:
        return (
            f"ONNX Runtime could not start {CUDA_PROVIDER}: {CPU_BUILD_HINT}. "
            f"Providers in this install: {', '.join(available)}"
        )
    from m3rt.kernels.cuda_api import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is not None:
        return f"ONNX Runtime CUDA needs a CUDA GPU: {reason}"
    return None


def _preload_cuda_libraries() -> None:
    """Load the CUDA/cuDNN libraries onnxruntime-gpu links against (from the nvidia-* wheels).

    ONNX Runtime's docs: not needed when a compatible torch was imported first (it has loaded them,
    and the dynamic linker reuses loaded libraries by soname); `preload_dlls` exists since 1.21.
    """
    if "torch" in sys.modules or not hasattr(ort, "preload_dlls"):
        return
    try:
        ort.preload_dlls()
    except Exception:  # noqa: BLE001 - a missing wheel shows up as a clear session error below
        pass


class CudaDevice:
    """Where the backend's buffers live and how its sessions are made: one CUDA GPU.

    Buffers come from ONNX Runtime's CUDA allocator (`OrtValue` on "cuda"); input copies use a stream
    of our own. The backend reaches the device only through this object (`device=` of
    `OnnxRuntimeCudaBackend`), so the same IOBinding code also runs on a stand-in that keeps its
    buffers in host memory, which is how it is tested on machines without a GPU.
    """

    ort_device = "cuda"

    def __init__(self, device_id: int = 0) -> None:
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise BackendError(reason)
        _preload_cuda_libraries()
        from m3rt.kernels.cuda_api import check, runtime_api

        self.device_id = int(device_id)
        self._cudart, self._check = runtime_api(), check
        check(self._cudart.cudaSetDevice(self.device_id))
        # Host->device input copies; synchronized before each run (pageable source, any size).
        self._copy_stream = int(check(self._cudart.cudaStreamCreateWithFlags(self._cudart.cudaStreamNonBlocking)))

    def providers(self, options: dict[str, str], cuda_graph: bool) -> list[Any]:
        cuda = {"device_id": str(self.device_id), **options}
        if cuda_graph:
            cuda["enable_cuda_graph"] = "1"
        return [(CUDA_PROVIDER, cuda), "CPUExecutionProvider"]

    def check_session(self, session: Any) -> None:
        # ONNX Runtime falls back to CPU silently when CUDA cannot start (e.g. missing cuDNN).
        if CUDA_PROVIDER not in session.get_providers():
            raise BackendError(
                f"ONNX Runtime could not start {CUDA_PROVIDER} (running: {', '.join(session.get_providers())}); "
                "its CUDA/cuDNN libraries did not load: import torch first or pip install 'm3rt[gpu]'"
            )

    def activate(self) -> None:
        # Calls may come from any thread; ONNX Runtime sets its device per run, our copies need it too.
        self._check(self._cudart.cudaSetDevice(self.device_id))

    def upload(self, dst_ptr: int, host: np.ndarray) -> None:
        cudart = self._cudart
        kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(cudart.cudaMemcpyAsync(dst_ptr, host.ctypes.data, host.nbytes, kind, self._copy_stream))
        # The copy is on our stream, ONNX Runtime computes on its own: finish the copy before the run.
        self._check(cudart.cudaStreamSynchronize(self._copy_stream))

    def array(self, ptr: int, shape: Sequence[int], dtype: Any, **fields: Any) -> DeviceArray:
        return DeviceArray(ptr, tuple(shape), dtype, self.device_id, **fields)

    def close(self) -> None:
        if self._copy_stream:
            self._cudart.cudaStreamDestroy(self._copy_stream)
        self._copy_stream = 0


class OnnxRuntimeCudaBackend:
    """ONNX Runtime on one CUDA GPU with IOBinding, device-resident outputs and CUDA graphs.

    Not thread-safe (`capabilities`): the CUDA-graph buckets own fixed device buffers, and the host->device copy
    uses one stream; the core runs one batch at a time on it (the GPU runs one at a time anyway).
    Outputs of different calls never share memory, so the post-processing of batch k (in the
    caller's thread) overlaps the run of batch k+1 safely. With CUDA graphs on, every run executes on
    one worker thread of the backend, whichever thread calls (see `_on_worker`).

    `device`: where buffers live and how sessions are made (`CudaDevice(device_id)` by default).
    """

    name = "onnxruntime"

    def __init__(
        self,
        graph_path: Path,
        *,
        device_id: int = 0,
        pad_id: int = 1,
        provider_options: dict[str, Any] | None = None,
        cuda_graph: bool = True,
        graph_buckets: Iterable[int] = DEFAULT_GRAPH_BUCKETS,
        device: Any = None,
    ) -> None:
        self.device = device if device is not None else CudaDevice(device_id)
        self.device_id = self.device.device_id
        self.capabilities = Capabilities(thread_safe=False, output_device=self.device_id)
        self.pad_id = int(pad_id)
        self.graph_path = Path(graph_path)
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self._provider_options = {k: option_text(v) for k, v in (provider_options or {}).items()}
        self.cuda_graph = False
        self._session: Any = None
        if cuda_graph:
            try:
                self._session = self._create_session(cuda_graph=True)
                self.cuda_graph = True
            except BackendOutOfMemory:
                raise
            except BackendError as exc:
                # ONNX Runtime refuses graph capture at session creation when a compute node is not on
                # the CUDA EP (besides shape computation); the plain session still runs everything.
                self.notes.append(f"CUDA graphs off: {exc}")
        if self._session is None:
            self._session = self._create_session(cuda_graph=False)
        self.providers = self._session.get_providers()
        self._output_types = {o.name: o.type for o in self._session.get_outputs()}
        self._output_dims = {o.name: o.shape for o in self._session.get_outputs()}
        self._plain_run = ort.RunOptions()
        if self.cuda_graph:
            # gpu_graph_id=-1: this run neither captures nor replays (onnxruntime_run_options_config_keys.h).
            self._plain_run.add_run_config_entry("gpu_graph_id", "-1")
        self._buckets: dict[int, _GraphBucket] = {}
        self._graphs_paused = False
        # ONNX Runtime's CUDA EP keeps captured graphs per thread (its PerThreadContext), and with graphs
        # enabled it never releases a thread's context: a graph captured in one thread does not replay
        # in another, and every new thread that runs the session (the pipeline starts a backend thread
        # per large encode call) would keep a context of its own for good. So a graph-enabled session
        # runs on one long-lived thread of ours; calls hand over to it (tens of microseconds).
        self._worker: ThreadPoolExecutor | None = None
        if self.cuda_graph:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3rt-onnxruntime")
            # Graphs are an optimisation: whatever fails while setting them up (a symbolic output
            # dimension, a bucket buffer that does not fit, a refused capture) turns them off and the
            # plain session runs everything.
            try:
                for graph_id, length in enumerate(sorted({int(b) for b in graph_buckets if int(b) >= 2}), start=1):
                    self._buckets[length] = _GraphBucket(self, length, graph_id)
                # Capture every graph now, not on the first query of each length: ONNX Runtime captures
                # in cudaStreamCaptureModeGlobal, where CUDA calls from other threads (the pipeline's
                # post-processing kernels of the previous batch) would invalidate the capture.
                self.warmup()
            except Exception as exc:
                self.notes.append(f"CUDA graphs off: setting them up failed: {exc}")
                self._buckets.clear()
                self._worker.shutdown(wait=True)
                self._worker = None
                self.cuda_graph = False
                self._session = None  # release the graph session's memory before the plain one loads
                self._session = self._create_session(cuda_graph=False)
                self._plain_run = ort.RunOptions()

    def _on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._worker is None:
            return fn(*args)
        return self._worker.submit(fn, *args).result()

    # -- construction ---------------------------------------------------------------------------

    def _create_session(self, cuda_graph: bool) -> Any:
        providers = self.device.providers(self._provider_options, cuda_graph)
        try:
            session = ort.InferenceSession(str(self.graph_path), session_options(), providers=providers)
        except Exception as exc:
            text = str(exc)
            if is_out_of_memory_text(text):
                raise BackendOutOfMemory(f"CUDA out of memory while loading {self.graph_path.name}: {text}") from exc
            if "graph capture" in text.lower():
                raise BackendError(text) from exc
            raise ArtifactError(f"ONNX Runtime cannot load {self.graph_path}: {text}") from exc
        check_io(session, self.graph_path)
        self.device.check_session(session)
        return session

    # -- running --------------------------------------------------------------------------------

    def run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: Sequence[str]
    ) -> dict[str, np.ndarray | DeviceArray]:
        """The graph's raw outputs: `DeviceArray`s left on the device (with the batch's device inputs
        beside them), or host arrays at a bucket's padded length when the batch ran from a CUDA graph."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        shape = tuple(input_ids.shape)
        from m3rt.kernels.cuda_api import CAPTURE_GATE

        with self._lock, CAPTURE_GATE.shared():
            try:
                return self._on_worker(self._run, input_ids, attention_mask, outputs)
            except M3Error:
                raise
            except Exception as exc:
                raise backend_error(exc, shape) from exc

    def _run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: Sequence[str]
    ) -> dict[str, np.ndarray | DeviceArray]:
        self.device.activate()
        bucket = self._bucket_for(input_ids)
        if bucket is not None:
            return bucket.run(input_ids, attention_mask, outputs)
        return self._run_plain(input_ids, attention_mask, outputs)

    @property
    def graph_buckets(self) -> dict[int, int]:
        """Bucket length -> how many queries its CUDA graph has run (warm-up included)."""
        return {length: bucket.runs for length, bucket in sorted(self._buckets.items())}

    @contextmanager
    def graphs_off(self) -> Iterator[None]:
        """Within: every batch runs as a plain run of the same session (`gpu_graph_id=-1`), the
        baseline a CUDA graph is measured against."""
        self._graphs_paused = True
        try:
            yield
        finally:
            self._graphs_paused = False

    def _bucket_for(self, input_ids: np.ndarray) -> _GraphBucket | None:
        if not self._buckets or self._graphs_paused or input_ids.shape[0] != 1:
            return None
        fits = [length for length in self._buckets if length >= input_ids.shape[1]]
        return self._buckets[min(fits)] if fits else None

    def _new_buffer(self, shape: Sequence[int], dtype: Any) -> Any:
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device.ort_device, self.device_id)

    def _upload_inputs(self, input_ids: np.ndarray, attention_mask: np.ndarray, buffer: Any = None) -> Any:
        """Both inputs in one int64 device buffer, [2, stride]: one allocation and one copy per batch.

        The mask starts `_input_stride` elements in, a multiple of 256 bytes, so both inputs are as
        aligned as separately allocated buffers whatever B x S is. A fresh buffer per batch (from ONNX
        Runtime's allocator, so no cudaMalloc in steady state) rather than one reused buffer: the device
        kernels read this batch's ids and mask after `run` has returned, while the next batch is
        already being copied.
        """
        count = input_ids.size
        host = np.zeros((2, _input_stride(count)), dtype=np.int64)
        host[0, :count], host[1, :count] = input_ids.ravel(), attention_mask.ravel()
        if buffer is None:
            buffer = self._new_buffer(host.shape, np.int64)
        elif tuple(buffer.shape()) != host.shape:  # a bucket's fixed buffer: never write past it
            raise BackendError(f"input buffer {tuple(buffer.shape())} cannot hold {host.shape}")
        self.device.upload(int(buffer.data_ptr()), host)
        return buffer

    def _bind_inputs(self, io: Any, buffer: Any, shape: tuple[int, int]) -> tuple[DeviceArray, DeviceArray]:
        ptr = int(buffer.data_ptr())
        offset = _input_stride(int(np.prod(shape))) * 8
        arrays = []
        for k, name in enumerate(INPUT_NAMES):
            address = ptr + k * offset
            io.bind_input(name, self.device.ort_device, self.device_id, np.int64, list(shape), address)
            arrays.append(self.device.array(address, shape, np.int64, owner=buffer))
        return arrays[0], arrays[1]

    def _output_shape(self, name: str, batch: int, length: int) -> list[int]:
        if name == "sparse_weights":
            return [batch, length]
        feature = self._output_dims[name][-1]
        if not isinstance(feature, int):
            raise ArtifactError(f"{name} has a symbolic last dimension {feature!r}; expected the vector size")
        return [batch, length - 1, feature] if name == "colbert_vecs" else [batch, feature]

    def _new_output(self, name: str, batch: int, length: int) -> Any:
        return self._new_buffer(self._output_shape(name, batch, length), _numpy_dtype(self._output_types[name]))

    def _run_plain(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: Sequence[str]
    ) -> dict[str, np.ndarray | DeviceArray]:
        # A new IOBinding per call: the outputs ONNX Runtime allocates belong to it, so they stay
        # valid (held by the returned DeviceArrays) while later batches run with their own bindings.
        io = self._session.io_binding()
        buffer = self._upload_inputs(input_ids, attention_mask)
        inputs = self._bind_inputs(io, buffer, tuple(input_ids.shape))
        # Outputs in buffers of our own, from ONNX Runtime's per-device allocator (as the inputs), not
        # from the session's arena: the arena also holds what the captured CUDA graphs use, and a
        # graph replay writes to its captured addresses whether or not the arena has since handed
        # them out. Outputs held for post-processing must never be one of those addresses.
        values = [self._new_output(name, *input_ids.shape) for name in outputs]
        for name, value in zip(outputs, values):
            io.bind_ortvalue_output(name, value)
        self._session.run_with_iobinding(io, self._plain_run)
        return {
            name: self.device.array(
                int(value.data_ptr()), tuple(value.shape()), _numpy_dtype(value.data_type()),
                owner=(io, value, buffer), batch_inputs=inputs,
            )
            for name, value in zip(outputs, values)
        }  # fmt: skip

    def warmup(self) -> None:
        """Run every bucket a few times: ONNX Runtime captures its CUDA graph there (done at construction;
        later calls only replay)."""

        def warm() -> None:
            self.device.activate()
            for bucket in self._buckets.values():
                bucket.warmup()

        from m3rt.kernels.cuda_api import CAPTURE_GATE

        with self._lock, CAPTURE_GATE.exclusive():
            self._on_worker(warm)

    def close(self) -> None:
        with self._lock:
            self._buckets.clear()
            if self._worker is not None:
                self._worker.shutdown(wait=True)
                self._worker = None
            self.device.close()


def _numpy_dtype(onnx_type: str) -> Any:
    return np.float16 if onnx_type == "tensor(float16)" else np.float32


def _input_stride(count: int) -> int:
    """Elements from the start of the ids to the start of the mask: `count` rounded up to 32 int64s
    (256 bytes, the alignment CUDA's own allocations have)."""
    return -(-count // 32) * 32


class _GraphBucket:
    """Batch-1 inputs padded to `length` tokens, run from a CUDA graph with fixed device buffers.

    CUDA graphs replay fixed kernel launches on fixed addresses, so the shapes and every bound buffer
    must stay the same: inputs are copied into this bucket's own buffer and all three outputs are
    bound to preallocated OrtValues (ONNX Runtime's CUDA-graph recipe: bind OrtValues, update them in
    place, `run_with_iobinding` with the same binding). `gpu_graph_id` (>= 1; 0 is reserved, -1 skips)
    selects this bucket's graph in the one session; ONNX Runtime captures it after its warm-up runs.
    One session rather than one per bucket: the weights (1.1 GB in fp16) are loaded once.

    Padding does not change a real token's outputs: padded positions have attention_mask 0, and the
    fused Attention op turns the mask into per-row key lengths (right padding), so padded keys get
    no attention weight; XLM-R's position ids count non-pad tokens, so real positions are unchanged.
    The dense vector is the first token's; the post-processor reads sparse and ColBERT at the batch's
    real positions only.
    (GEMMs of a different row count may pick other kernels: float round-off only.)

    Outputs are copied to the host before `run` returns: the next query of this length overwrites
    the buffers, and for a query of 16-64 tokens the copies (at most ~260 KB) and the CPU post-
    processing cost less than launching the device kernels.
    """

    def __init__(self, backend: OnnxRuntimeCudaBackend, length: int, graph_id: int) -> None:
        self.backend, self.length, self.graph_id = backend, length, graph_id
        self.io = backend._session.io_binding()
        self.inputs = backend._new_buffer([2, _input_stride(length)], np.int64)
        backend._bind_inputs(self.io, self.inputs, (1, length))
        self.outputs: dict[str, Any] = {}
        for name in OUTPUT_NAMES:
            value = backend._new_output(name, 1, length)
            self.io.bind_ortvalue_output(name, value)
            self.outputs[name] = value
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.runs = 0

    def warmup(self) -> None:
        # ONNX Runtime runs a few regular runs per graph id before it captures (allocations happen
        # there, not during capture); three covers every version's minimum.
        ids = np.full((1, self.length), self.backend.pad_id, dtype=np.int64)
        mask = np.zeros((1, self.length), dtype=np.int64)
        ids[0, :2], mask[0, :2] = (0, 2), 1
        for _ in range(3):
            self.run(ids, mask, ())

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        real = input_ids.shape[1]
        ids = np.full((1, self.length), self.backend.pad_id, dtype=np.int64)
        mask = np.zeros((1, self.length), dtype=np.int64)
        ids[:, :real], mask[:, :real] = input_ids, attention_mask
        self.backend._upload_inputs(ids, mask, self.inputs)
        self.backend._session.run_with_iobinding(self.io, self.run_options)
        self.runs += 1
        # Host copies, since the next query of this length overwrites the buffers; at the bucket's
        # padded length (the post-processor reads the batch's own positions).
        return {name: self.outputs[name].numpy() for name in outputs}
