"""ONNX Runtime backend (CPU execution provider by default; any provider list on request)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from m3rt.errors import ArtifactError, BackendError, M3Error
from m3rt.manifest import INPUT_NAMES, OUTPUT_NAMES

try:
    import onnxruntime as ort
except ImportError as exc:  # the base install leaves the choice of ONNX Runtime package to the user
    raise M3Error(
        "ONNX Runtime is not installed: pip install 'm3rt[cpu]' (or 'm3rt[gpu]' on a CUDA machine; "
        "never both, they overwrite each other)"
    ) from exc


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self,
        graph_path: Path,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = int(intra_op_threads)
        providers = list(providers or ["CPUExecutionProvider"])
        try:
            self._session = ort.InferenceSession(str(graph_path), options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise ArtifactError(f"ONNX Runtime cannot load {graph_path}: {exc}") from exc
        names_in = tuple(i.name for i in self._session.get_inputs())
        names_out = {o.name for o in self._session.get_outputs()}
        if names_in != INPUT_NAMES or not set(OUTPUT_NAMES) <= names_out:
            raise ArtifactError(
                f"{graph_path} has inputs {names_in} and outputs {sorted(names_out)}; "
                f"expected {INPUT_NAMES} and {OUTPUT_NAMES}"
            )
        self.providers = self._session.get_providers()
        # ONNX Runtime silently falls back to CPU when a requested GPU provider cannot start.
        missing = [p for p in providers if p not in self.providers]
        if missing:
            raise BackendError(
                f"ONNX Runtime could not start {', '.join(missing)} (running: {', '.join(self.providers)}; "
                f"available in this install: {', '.join(ort.get_available_providers())}). For CUDA install "
                "'m3rt[gpu]' (onnxruntime-gpu, not onnxruntime) on a machine with an NVIDIA GPU."
            )

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        try:
            values = self._session.run(list(outputs), feeds)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime failed on a batch of shape {tuple(input_ids.shape)}: {exc}") from exc
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(outputs, values)}
