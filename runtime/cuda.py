"""Minimal CUDA helpers over cuda-python (`cuda.bindings.runtime`), imported lazily.

cuda-python ships wheels, imports without a GPU and is what TensorRT's own samples use; pycuda
needs the CUDA toolkit to build and is not used.
"""

from __future__ import annotations

from typing import Any

from m3rt.errors import BackendError

INSTALL_HINT = "pip install 'm3rt[gpu]' (cuda-python)"


def runtime_api():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6 layout
        except ImportError as exc:
            raise BackendError(f"cuda-python is not installed: {INSTALL_HINT}") from exc
    return cudart


def check(result: tuple) -> Any:
    """cuda-python returns (error, *values); raise on error, return the value(s)."""
    err, *values = result
    if int(err) != 0:
        cudart = runtime_api()
        name = cudart.cudaGetErrorName(err)[1]
        raise BackendError(f"CUDA error {int(err)} ({name.decode() if isinstance(name, bytes) else name})")
    return values[0] if len(values) == 1 else tuple(values)


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
