"""The backend interface: padded int64 ids + mask in, the graph's named outputs out.

The scheduler, tokenizer and post-processing only see this; nothing else knows which engine runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from m3rt.errors import ArtifactError


class Backend(Protocol):
    name: str

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run one padded batch; returns float32 arrays for the requested output names."""
        ...


def available_backends() -> list[str]:
    return ["onnxruntime"]


def create_backend(name: str, graph_path: Path, **options: Any) -> Backend:
    if name in ("onnxruntime", "auto"):
        from m3rt.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(graph_path, **options)
    raise ArtifactError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")
