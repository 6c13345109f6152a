"""ONNX Runtime on the CPU: `session.run` on host arrays, and what every ONNX Runtime backend shares
(session options, the I/O check, reading ONNX Runtime's errors as m3rt's typed ones).

`OnnxRuntimeBackend` runs any provider list through `session.run` (host arrays in and out); it is what
the CPU uses. The CUDA serving path is `m3rt.backends.onnxruntime_cuda`.
"""

from __future__ import annotations

import threading
from collections import Counter
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


# Padded length from which the CPU backend runs a batch on the flash-attention graph when it has one,
# per precision: below it the plain graph takes less CPU time (MultiHeadAttention transposes Q/K/V per
# layer), from it on the flash graph takes less and never holds a layer's [rows, heads, S, S] scores.
# Measured on the full-size model (benchmarks/RESULTS.md, "Plain or flash attention per batch").
FLASH_FROM_TOKENS = {"fp32": 512, "int8": 1024}


def _external_weights(graph_path: Path) -> dict[str, tuple[str, int, int, np.dtype, tuple[int, ...]]]:
    """Initializers kept in external data files: name -> (file, offset, length, dtype, shape)."""
    try:
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype
    except ImportError:  # without onnx the two sessions keep a copy of the weights each
        return {}
    try:
        model = onnx.load(str(graph_path), load_external_data=False)
    except Exception as exc:  # a truncated or foreign file: protobuf's DecodeError, OSError, ...
        raise ArtifactError(f"ONNX Runtime cannot load {graph_path}: {exc}") from exc
    table = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {item.key: item.value for item in tensor.external_data}
        table[tensor.name] = (
            entry["location"],
            int(entry.get("offset", 0)),
            int(entry["length"]),
            np.dtype(tensor_dtype_to_np_dtype(tensor.data_type)),
            tuple(int(d) for d in tensor.dims),
        )
    return table


class SharedWeights:
    """The weights two graphs of one artifact read from the same external data file, mapped once and
    handed to both sessions as shared initializers, so that serving both costs one copy of the weights.

    Prepacking is turned off for sessions that use them: a prepacked copy is per session, which would
    double the weights again (ONNX Runtime's Python API has no shared prepacked-weights container).
    """

    def __init__(self, first: Path, second: Path) -> None:
        a, b = _external_weights(first), _external_weights(second)
        self._maps: dict[str, np.memmap] = {}
        self.values: dict[str, ort.OrtValue] = {}
        for name, record in a.items():
            if b.get(name) != record:
                continue
            location, offset, length, dtype, shape = record
            path = first.parent / location
            if path.resolve() != (second.parent / location).resolve():
                continue
            data = self._maps.setdefault(location, np.memmap(path, dtype=np.uint8, mode="r"))
            raw = data[offset : offset + length]
            # A tensor at an offset its element size does not divide cannot be viewed in place.
            array = raw.view(dtype) if offset % dtype.itemsize == 0 else np.frombuffer(raw.tobytes(), dtype)
            self.values[name] = ort.OrtValue.ortvalue_from_numpy(array.reshape(shape))

    def add_to(self, options: ort.SessionOptions) -> None:
        for name, value in self.values.items():
            options.add_initializer(name, value)
        if self.values:
            options.add_session_config_entry("session.disable_prepacking", "1")


class OnnxRuntimeBackend:
    """`session.run` with host arrays; any provider list (CPU by default).

    Thread-safe (`capabilities`): ONNX Runtime documents `InferenceSession.run` as safe to call from several threads,
    and this backend keeps no per-call state, so concurrent `encode` calls run concurrently.
    `session_config`: ONNX Runtime session config entries (`SessionOptions.add_session_config_entry`).
    `notes`: what the loader wants said about this backend (e.g. the int8 form chosen for this CPU).

    `long_graph_path`: the same model with flash attention (`model.flash.onnx`); then batches padded to
    `flash_from_tokens` or more run on it, shorter ones on `graph_path`, and requests for outputs only
    it has (the encoder's hidden states) too. Both sessions share the weights file's tensors, without
    ONNX Runtime's prepacking (`share_weights=False`: each session its own prepacked copy, twice the
    weights' memory, faster short int8 batches; RESULTS.md, "Plain or flash attention per batch");
    `long_session_arena=False` runs the flash session without ONNX Runtime's CPU memory arena.
    """

    name = "onnxruntime"
    capabilities = Capabilities(thread_safe=True)

    def __init__(
        self,
        graph_path: Path,
        providers: Sequence[Any] | None = None,
        intra_op_threads: int | None = None,
        session_config: Mapping[str, str] | None = None,
        long_graph_path: Path | None = None,
        flash_from_tokens: int = FLASH_FROM_TOKENS["fp32"],
        long_session_arena: bool = False,
        share_weights: bool = True,
    ) -> None:
        providers = list(providers or ["CPUExecutionProvider"])
        self.graph_path = Path(graph_path)
        self.long_graph_path = Path(long_graph_path) if long_graph_path is not None else None
        if isinstance(flash_from_tokens, bool) or not isinstance(flash_from_tokens, int) or flash_from_tokens < 2:
            raise ArtifactError(f"flash_from_tokens must be an int >= 2, got {flash_from_tokens!r}")
        self.flash_from_tokens = flash_from_tokens
        self.notes: list[str] = []
        # Batches run per graph file name: which graph served what.
        self.batches: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        shared = (
            SharedWeights(self.graph_path, self.long_graph_path) if self.long_graph_path and share_weights else None
        )
        if shared is not None and not shared.values:
            self.notes.append(
                f"{self.graph_path.name} and {self.long_graph_path.name} share no external weights here "
                "(no onnx package, or no common weight file): each session holds its own copy"
            )
        self._session = self._open(self.graph_path, providers, intra_op_threads, session_config, shared)
        self._long_session = (
            self._open(self.long_graph_path, providers, intra_op_threads, session_config, shared, long_session_arena)
            if self.long_graph_path is not None
            else None
        )
        # The sessions read these buffers: kept as long as the backend is.
        self.shared_weights = shared
        self._outputs = {o.name for o in self._session.get_outputs()}
        self.providers = self._session.get_providers()
        # ONNX Runtime silently falls back to CPU when a requested GPU provider cannot start.
        missing = [_provider_name(p) for p in providers if _provider_name(p) not in self.providers]
        if missing:
            raise BackendError(
                f"ONNX Runtime could not start {', '.join(missing)} (running: {', '.join(self.providers)}; "
                f"available in this install: {', '.join(ort.get_available_providers())}). For CUDA install "
                "'m3rt[gpu]' (onnxruntime-gpu, not onnxruntime) on a machine with an NVIDIA GPU."
            )

    @staticmethod
    def _open(
        graph_path: Path,
        providers: list[Any],
        intra_op_threads: int | None,
        session_config: Mapping[str, str] | None,
        shared: SharedWeights | None,
        arena: bool = True,
    ) -> ort.InferenceSession:
        try:
            options = session_options(intra_op_threads, session_config)
            # Long batches allocate few, large tensors: freed back at once instead of kept by the
            # arena, whose growth by doubling would add to the peak (RESULTS.md, "Long documents").
            options.enable_cpu_mem_arena = arena
            if shared is not None:
                shared.add_to(options)
            session = ort.InferenceSession(str(graph_path), options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise ArtifactError(f"ONNX Runtime cannot load {graph_path}: {exc}") from exc
        check_io(session, graph_path)
        return session

    def uses_flash(self, length: int, outputs: Sequence[str] = OUTPUT_NAMES) -> bool:
        """Whether a batch padded to `length` tokens asking for `outputs` runs on the flash graph."""
        if self._long_session is None:
            return False
        return length >= self.flash_from_tokens or not set(outputs) <= self._outputs

    def graph_for(self, length: int, outputs: Sequence[str] = OUTPUT_NAMES) -> Path:
        """The graph file a batch padded to `length` tokens runs on."""
        return self.long_graph_path if self.uses_flash(length, outputs) else self.graph_path

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        flash = self.uses_flash(int(input_ids.shape[1]), outputs)
        session = self._long_session if flash else self._session
        try:
            values = session.run(list(outputs), feeds)
        except Exception as exc:
            raise backend_error(exc, tuple(input_ids.shape), where="ONNX Runtime") from exc
        with self._count_lock:
            self.batches[(self.long_graph_path if flash else self.graph_path).name] += 1
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(outputs, values)}
