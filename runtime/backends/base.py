"""The backend interface: padded int64 ids + mask in, the graph's named outputs out.

The scheduler, tokenizer and post-processing only see this; nothing else knows which engine runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from m3rt.errors import ArtifactError, M3Error
from m3rt.manifest import Manifest

BACKENDS = ("onnxruntime", "tensorrt", "auto")


class Backend(Protocol):
    name: str

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run one padded batch; returns float32 arrays for the requested output names."""
        ...


def _tensorrt_usable() -> bool:
    from m3rt.backends.tensorrt import import_tensorrt
    from m3rt.cuda import gpu_unavailable_reason

    try:
        import_tensorrt()
    except M3Error:
        return False
    return gpu_unavailable_reason() is None


def create_backend(name: str, manifest: Manifest, precision: str, **options: Any) -> Backend:
    """`auto` takes the TensorRT engine of this precision when there is one and TensorRT can run it."""
    if name not in BACKENDS:
        raise ArtifactError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "auto":
        name = "tensorrt" if precision in manifest.engines and _tensorrt_usable() else "onnxruntime"
    if name == "tensorrt":
        from m3rt.backends.tensorrt import TensorRTBackend

        info = manifest.engines.get(precision)
        if info is None:
            raise ArtifactError(
                f"{manifest.root} has no {precision} TensorRT engine; build one on the GPU machine with "
                f"m3-export --engine (engines here: {', '.join(sorted(manifest.engines)) or 'none'})"
            )
        return TensorRTBackend(manifest.root / info["file"], info)
    from m3rt.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(
        manifest.graph_path(precision),
        providers=options.get("providers"),
        intra_op_threads=options.get("intra_op_threads"),
    )
