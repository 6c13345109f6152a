"""TensorRT backend: a serialised plan, one execution context, cuda-python buffers and a stream.

Thin on purpose; it cannot run on machines without TensorRT and a GPU (none of ours has TensorRT),
and its TensorRT names are checked against the 10.x and 11.x bindings by tests/test_tensorrt_api.py.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from m3rt.core import Capabilities
from m3rt.errors import ArtifactError, BackendError
from m3rt.kernels.cuda_api import CAPTURE_GATE, check, device_description, runtime_api
from m3rt.manifest import INPUT_NAMES, EngineInfo
from m3rt.profiles import Profile, select_profile

TENSORRT_INSTALL_HINT = (
    "install TensorRT 10.14+ or 11 for your CUDA version from NVIDIA (pip install tensorrt-cu12 or "
    "tensorrt-cu13 with NVIDIA's package index) on a machine with an NVIDIA GPU"
)


def import_tensorrt():
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        raise BackendError(f"TensorRT is not importable ({exc}); {TENSORRT_INSTALL_HINT}") from exc
    return trt


class _Buffer:
    """A grow-only device buffer with a pinned host twin."""

    def __init__(self, cudart) -> None:
        self._cudart, self.nbytes, self.device, self.host = cudart, 0, 0, 0

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.nbytes:
            return
        self.free()
        self.device = check(self._cudart.cudaMalloc(nbytes))
        self.host = check(self._cudart.cudaMallocHost(nbytes))
        self.nbytes = nbytes

    def host_array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = (ctypes.c_byte * count).from_address(int(self.host))
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def free(self) -> None:
        if self.nbytes:
            self._cudart.cudaFree(self.device)
            self._cudart.cudaFreeHost(self.host)
            self.nbytes = 0


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, plan_path: Path, info: EngineInfo, device: int = 0) -> None:
        trt = import_tensorrt()
        self._cudart = cudart = runtime_api()
        check(cudart.cudaSetDevice(device))
        here = {"tensorrt_version": trt.__version__, **device_description(device)}
        built = {k: getattr(info, k) for k in here}
        if built != here:
            raise ArtifactError(
                f"{plan_path.name} was built for {built['gpu']} (compute {built['compute_capability']}) with "
                f"TensorRT {built['tensorrt_version']}; this is {here['gpu']} (compute {here['compute_capability']}) "
                f"with TensorRT {here['tensorrt_version']}. Rebuild it here: m3-export --engine ..."
            )
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if engine is None:
            raise ArtifactError(f"TensorRT cannot deserialise {plan_path}")
        self._trt, self._runtime, self._engine = trt, runtime, engine
        # Activation memory sized for the active profile, reallocated when the profile changes, rather
        # than for the largest (8192-token) profile up front: a server mostly runs short batches.
        self._context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE)
        self._stream = check(cudart.cudaStreamCreate())
        self._profiles = [Profile(p["name"], p["max"][0], p["max"][1], p["min"][1]) for p in info.profiles]
        self._active_profile = -1
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._buffers = {name: _Buffer(cudart) for name in names}
        # One stream, one context and grow-only buffers: one batch at a time.
        self.capabilities = Capabilities(thread_safe=False, max_rows=self.max_rows)

    def close(self) -> None:
        """Frees the device and pinned buffers and the stream; the backend cannot run afterwards."""
        for buffer in self._buffers.values():
            buffer.free()
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = None

    def max_rows(self, sequence: int) -> int:
        """The batch size of the optimisation profile that runs this padded length."""
        return self._profiles[select_profile(self._profiles, sequence)].max_batch

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One batch within its profile's batch size (the core slices larger ones: `max_rows`)."""
        with CAPTURE_GATE.shared():  # no CUDA call of ours while another backend captures a graph
            return self._run(input_ids, attention_mask, outputs)

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        k = select_profile(self._profiles, input_ids.shape[1])
        if len(input_ids) > self._profiles[k].max_batch:
            raise BackendError(f"{len(input_ids)} rows exceed profile {self._profiles[k].name}'s batch")
        cudart, context, engine, stream = self._cudart, self._context, self._engine, self._stream
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if k != self._active_profile:
            context.set_optimization_profile_async(k, stream)
            self._active_profile = k
        for name, array in zip(INPUT_NAMES, (input_ids, attention_mask)):
            array = np.ascontiguousarray(array, dtype=np.int64)
            buffer = self._buffers[name]
            buffer.ensure(array.nbytes)
            buffer.host_array(array.shape, array.dtype)[...] = array
            check(cudart.cudaMemcpyAsync(buffer.device, buffer.host, array.nbytes, h2d, stream))
            context.set_input_shape(name, array.shape)
            context.set_tensor_address(name, buffer.device)
        shapes = {}
        for name in self._outputs:
            shape = tuple(context.get_tensor_shape(name))
            dtype = np.dtype(self._trt.nptype(engine.get_tensor_dtype(name)))
            buffer = self._buffers[name]
            buffer.ensure(max(1, int(np.prod(shape))) * dtype.itemsize)
            context.set_tensor_address(name, buffer.device)
            shapes[name] = (shape, dtype)
        if not context.execute_async_v3(stream):
            raise BackendError(f"TensorRT execution failed for a batch of shape {input_ids.shape}")
        for name in outputs:
            shape, dtype = shapes[name]
            nbytes = int(np.prod(shape)) * dtype.itemsize
            check(cudart.cudaMemcpyAsync(self._buffers[name].host, self._buffers[name].device, nbytes, d2h, stream))
        check(cudart.cudaStreamSynchronize(stream))
        return {name: self._buffers[name].host_array(*shapes[name]).astype(np.float32, copy=True) for name in outputs}
