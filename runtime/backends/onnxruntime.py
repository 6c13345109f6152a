"""ONNX Runtime on the CPU: `session.run` on host arrays, and what every ONNX Runtime backend shares
(session options, the I/O check, reading ONNX Runtime's errors as m3rt's typed ones).

`OnnxRuntimeBackend` runs any provider list through `session.run` (host arrays in and out); it is what
the CPU uses. The CUDA serving path is `m3rt.backends.onnxruntime_cuda`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m3rt.core import Capabilities
from m3rt.errors import ArtifactError, BackendError, BackendOutOfMemory, M3Error
from m3rt.manifest import INPUT_NAMES, OUTPUT_NAMES

try:
    import onnxruntime as ort
except ImportError as exc:  # the base install leaves the choice of ONNX Runtime package to the user
    raise M3Error(
        "ONNX Runtime is not installed: pip install 'm3rt[cpu]' (or 'm3rt[gpu]' on a CUDA machine; "
        "never both, they overwrite each other)"
    ) from exc

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_BUILD_HINT = (
    "the installed onnxruntime is the CPU build; pip uninstall onnxruntime && pip install 'm3rt[gpu]' (onnxruntime-gpu)"
)
# Text of ONNX Runtime allocation failures (its CPU and CUDA allocators, BFC arena, cuBLAS, cuDNN,
# std::bad_alloc): ONNX Runtime raises them all as one exception type, so the text is what tells.
_OOM_MARKERS = (
    "out of memory",
    "failed to allocate",
    "bad_alloc",
    "bad allocation",
    "cudaerrormemoryallocation",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
)


def session_options(intra_op_threads: int | None = None, config: Mapping[str, str] | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        options.intra_op_num_threads = int(intra_op_threads)
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return options


def check_io(session: ort.InferenceSession, graph_path: Path) -> None:
    names_in = tuple(i.name for i in session.get_inputs())
    names_out = {o.name for o in session.get_outputs()}
    if names_in != INPUT_NAMES or not set(OUTPUT_NAMES) <= names_out:
        raise ArtifactError(
            f"{graph_path} has inputs {names_in} and outputs {sorted(names_out)}; "
            f"expected {INPUT_NAMES} and {OUTPUT_NAMES}"
        )


def _provider_name(provider: Any) -> str:
    """ONNX Runtime accepts "Name" or ("Name", {options})."""
    return provider[0] if isinstance(provider, (tuple, list)) else str(provider)


def option_text(value: Any) -> str:
    # Provider options reach ONNX Runtime as strings; its bool parser reads "1"/"0" (istream >> bool).
    return ("1" if value else "0") if isinstance(value, bool) else str(value)


def is_out_of_memory_text(text: str) -> bool:
    text = text.lower()
    return any(marker in text for marker in _OOM_MARKERS)


def backend_error(exc: BaseException, shape: tuple[int, ...], where: str = "ONNX Runtime CUDA") -> BackendError:
    """ONNX Runtime's failure on a batch as a BackendError; BackendOutOfMemory when it was an
    allocation, so that `M3Model` splits the batch and retries it."""
    if is_out_of_memory_text(str(exc)):
        return BackendOutOfMemory(f"{where} out of memory on a batch of shape {shape}: {exc}")
    return BackendError(f"{where} failed on a batch of shape {shape}: {exc}")


class OnnxRuntimeBackend:
    """`session.run` with host arrays; any provider list (CPU by default).

    Thread-safe (`capabilities`): ONNX Runtime documents `InferenceSession.run` as safe to call from several threads,
    and this backend keeps no per-call state, so concurrent `encode` calls run concurrently.
    `session_config`: ONNX Runtime session config entries (`SessionOptions.add_session_config_entry`).
    `notes`: what the loader wants said about this backend (e.g. the int8 form chosen for this CPU).
    """

    name = "onnxruntime"
    capabilities = Capabilities(thread_safe=True)

    def __init__(
        self,
        graph_path: Path,
        providers: Sequence[Any] | None = None,
        intra_op_threads: int | None = None,
        session_config: Mapping[str, str] | None = None,
    ) -> None:
        providers = list(providers or ["CPUExecutionProvider"])
        self.graph_path = Path(graph_path)
        self.notes: list[str] = []
        try:
            options = session_options(intra_op_threads, session_config)
            self._session = ort.InferenceSession(str(graph_path), options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise ArtifactError(f"ONNX Runtime cannot load {graph_path}: {exc}") from exc
        check_io(self._session, graph_path)
        self.providers = self._session.get_providers()
        # ONNX Runtime silently falls back to CPU when a requested GPU provider cannot start.
        missing = [_provider_name(p) for p in providers if _provider_name(p) not in self.providers]
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
            raise backend_error(exc, tuple(input_ids.shape), where="ONNX Runtime") from exc
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(outputs, values)}
