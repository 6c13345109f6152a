"""Minimal CUDA helpers over cuda-python (`cuda.bindings.runtime`), imported lazily.

cuda-python ships wheels, imports without a GPU and is what TensorRT's own samples use; pycuda
needs the CUDA toolkit to build and is not used.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from m3rt.errors import BackendError, BackendOutOfMemory

INSTALL_HINT = "pip install 'm3rt[gpu]' (cuda-python)"


def _cuda_module(name: str, legacy: str):
    """`cuda.bindings.<name>`, or `cuda.<legacy>` in the cuda-python < 12.6 layout."""
    try:
        return importlib.import_module(f"cuda.bindings.{name}")
    except ImportError:
        try:
            return importlib.import_module(f"cuda.{legacy}")
        except ImportError as exc:
            raise BackendError(f"cuda-python is not installed: {INSTALL_HINT}") from exc


class CaptureGate:
    """Keeps m3rt's own CUDA work out of CUDA graph captures, process-wide.

    ONNX Runtime captures a graph in `cudaStreamCaptureModeGlobal`: a CUDA call from any other thread
    meanwhile (a copy, a kernel launch of the post-processing) invalidates the capture and fails that
    call. Captures hold the gate exclusively; every other CUDA entry point of m3rt (backend runs,
    device kernels, device-to-host copies) holds it shared, so a backend built while another pipeline
    post-processes waits for it, and the other way round. Waiting captures go first.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._capturing = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._capturing or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._capturing or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._capturing = True
        try:
            yield
        finally:
            with self._cond:
                self._capturing = False
                self._cond.notify_all()


CAPTURE_GATE = CaptureGate()


def runtime_api():
    return _cuda_module("runtime", "cudart")


def driver_api():
    return _cuda_module("driver", "cuda")


def nvrtc_api():
    return _cuda_module("nvrtc", "nvrtc")


# The allocation-failure code of each API: cudaErrorMemoryAllocation (runtime) and
# CUDA_ERROR_OUT_OF_MEMORY (driver) are 2; NVRTC_ERROR_OUT_OF_MEMORY is 1 (NVRTC's 2 is
# NVRTC_ERROR_PROGRAM_CREATION_FAILURE).
CUDA_OUT_OF_MEMORY = 2
NVRTC_OUT_OF_MEMORY = 1


def unpack(result: tuple, describe: Callable[[Any], str], out_of_memory: int = CUDA_OUT_OF_MEMORY) -> Any:
    """cuda-python returns (error, *values); raise `describe(error)` on error, return the value(s).
    The API's allocation failure (`out_of_memory`) raises BackendOutOfMemory (a batch that needs it is
    split and retried)."""
    err, *values = result
    if int(err) == out_of_memory:
        raise BackendOutOfMemory(describe(err))
    if int(err) != 0:
        raise BackendError(describe(err))
    return values[0] if len(values) == 1 else tuple(values)


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _error_name(err: Any, lookup: Callable[[Any], tuple]) -> str:
    """The API's name for `err`; the enum's own name when the lookup itself fails (cuGetErrorName
    needs libcuda, which a machine without the driver lacks)."""
    try:
        return as_text(lookup(err)[1])
    except Exception:  # noqa: BLE001 - the error being described matters more than this one
        return str(getattr(err, "name", err))


def check(result: tuple) -> Any:
    """A CUDA runtime call's value(s); BackendError on error."""
    return unpack(result, lambda err: f"CUDA error {int(err)} ({_error_name(err, runtime_api().cudaGetErrorName)})")


def check_driver(result: tuple) -> Any:
    """A CUDA driver call's value(s); BackendError on error."""
    return unpack(result, lambda err: f"CUDA driver error {int(err)} ({_error_name(err, driver_api().cuGetErrorName)})")


def gpu_unavailable_reason() -> str | None:
    try:
        cudart = runtime_api()
    except BackendError as exc:
        return str(exc)
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        return "no CUDA GPU is visible (cudaGetDeviceCount found none)"
    return None


def device_description(device: int = 0) -> dict[str, str]:
    props = check(runtime_api().cudaGetDeviceProperties(device))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}
