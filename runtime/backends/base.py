"""The backend interface: padded int64 ids + mask in, the graph's named outputs out.

The scheduler, tokenizer and post-processing only see this; nothing else knows which engine runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from m3rt.core import Capabilities
from m3rt.errors import ArtifactError, M3Error
from m3rt.manifest import Manifest

BACKENDS = ("onnxruntime", "tensorrt", "auto")


class Backend(Protocol):
    name: str
    # What the core may do with it: thread safety, row limits, device-resident outputs.
    capabilities: Capabilities

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: Sequence[str]) -> dict[str, Any]:
        """Run one padded batch; returns the requested outputs: float32 NumPy arrays, or (GPU backends)
        `m3rt.device_array.DeviceArray`s that `m3rt.postprocess` reduces on the device."""
        ...


def _tensorrt_usable() -> bool:
    from m3rt.backends.tensorrt import import_tensorrt
    from m3rt.kernels.cuda_api import gpu_unavailable_reason

    try:
        import_tensorrt()
    except M3Error:
        return False
    return gpu_unavailable_reason() is None


# The ONNX Runtime CPU int8 graphs: int8 weights (exact on VNNI/AMX) and their uint8 twin (exact everywhere).
INT8_CPU_GRAPHS = ("int8", "int8-u8")
CUDA_PROVIDER = "CUDAExecutionProvider"
# `backend_options` the ONNX Runtime CPU backend takes (the rest are the CUDA backend's).
CPU_OPTIONS = ("flash_from_tokens", "long_session_arena", "share_weights")


def _auto_picks_cuda(precision: str, options: dict[str, Any]) -> bool:
    """`backend="auto"` with no device or providers given: ONNX Runtime CUDA when onnxruntime-gpu
    can run on a visible GPU (int8 stays on the CPU: its graphs are built for the CPU's kernels)."""
    if options.get("device") is not None or options.get("providers") or precision == "int8":
        return False
    from m3rt.backends.onnxruntime_cuda import cuda_unavailable_reason

    return cuda_unavailable_reason() is None


def parse_device(device: str | None, providers: Sequence[Any] | None = None) -> tuple[str, int]:
    """("cpu", 0) or ("cuda", index) from "cpu" / "cuda" / "cuda:N"; None means CUDA when the provider
    list asks for CUDAExecutionProvider (its "device_id" option gives the index), else CPU."""
    cuda_entries = [p for p in providers or () if (p[0] if isinstance(p, (tuple, list)) else p) == CUDA_PROVIDER]
    if device is None:
        if not cuda_entries:
            return "cpu", 0
        entry = cuda_entries[0]
        options = entry[1] if isinstance(entry, (tuple, list)) and len(entry) > 1 else {}
        return "cuda", int(options.get("device_id", 0))
    text = str(device).strip().lower()
    if text == "cpu":
        return "cpu", 0
    if text == "cuda" or text.startswith("cuda:"):
        index = text.split(":", 1)[1] if ":" in text else "0"
        if not index.isdigit():
            raise ArtifactError(f"device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
        return "cuda", int(index)
    raise ArtifactError(f"device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")


def select_graph(manifest: Manifest, precision: str, device: str) -> str:
    """The manifest graph to run for this precision on this device.

    On CUDA, fp16 prefers the transformer-optimizer-fused graph (`fp16-fused`) when the artifact has
    one: it measured 1.4-5.9x the plain graph there. A graph recorded as CUDA-only is never chosen for
    the CPU, even when asked for by name.
    """
    name = precision
    if device == "cuda" and precision == "fp16" and manifest.has_graph("fp16-fused"):
        name = "fp16-fused"
    if device == "cpu" and precision == "int8" and not manifest.has_graph(name) and manifest.has_graph("int8-u8"):
        name = "int8-u8"
    graph = manifest.graph(name)
    provider = graph.execution_provider
    if device == "cpu" and provider not in (None, "CPUExecutionProvider"):
        raise ArtifactError(
            f"{graph.file} is built for ONNX Runtime's {provider} (fused contrib kernels); load it with "
            f"device='cuda', or pick another precision for the CPU ({', '.join(sorted(manifest.graph_names))})"
        )
    return name


def long_document_graph(manifest: Manifest, graph: str, device: str) -> str | None:
    """The flash-attention twin of `graph` that the CPU runs long batches on (`<graph>-flash`: the same
    weights, scores never held whole), or None."""
    twin = f"{graph}-flash"
    return twin if device == "cpu" and manifest.has_graph(twin) else None


def create_backend(name: str, manifest: Manifest, precision: str, **options: Any) -> Backend:
    """`auto` takes the TensorRT engine of this precision when there is one and TensorRT can run it.

    Options: `providers` (ONNX Runtime provider list), `intra_op_threads`, `device` ("cpu", "cuda",
    "cuda:N"; CUDA also when `providers` asks for CUDAExecutionProvider), `backend_options` (keyword
    arguments of `OnnxRuntimeCudaBackend`: cuda_graph, graph_buckets, device_postprocess, colbert_fp16; on the
    CPU, `flash_from_tokens`: the padded length from which batches run on the flash-attention graph, and
    `long_session_arena`: whether that graph's session keeps ONNX Runtime's memory arena, `share_weights`:
    whether both graphs' sessions share one unprepacked copy of the weights).
    """
    if name not in BACKENDS:
        raise ArtifactError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "auto":
        name = "tensorrt" if precision in manifest.engine_names and _tensorrt_usable() else "onnxruntime"
        if name == "onnxruntime" and _auto_picks_cuda(precision, options):
            options = {**options, "device": "cuda"}
    if name == "tensorrt":
        from m3rt.backends.tensorrt import TensorRTBackend

        if precision not in manifest.engine_names:
            raise ArtifactError(
                f"{manifest.root} has no {precision} TensorRT engine; build one on the GPU machine with "
                f"m3-export --engine (engines here: {', '.join(sorted(manifest.engine_names)) or 'none'})"
            )
        info = manifest.engine(precision)
        return TensorRTBackend(manifest.root / info.file, info)
    providers = options.get("providers")
    device, device_id = parse_device(options.get("device"), providers)
    graph = select_graph(manifest, precision, device)
    if device == "cuda":
        from m3rt.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend

        cuda_options: dict[str, Any] = {}
        for p in providers or ():
            if isinstance(p, (tuple, list)) and p[0] == CUDA_PROVIDER and len(p) > 1:
                cuda_options = {k: v for k, v in dict(p[1]).items() if k != "device_id"}
        return OnnxRuntimeCudaBackend(
            manifest.graph_path(graph),
            device_id=device_id,
            pad_id=manifest.special_tokens["pad"],
            provider_options=cuda_options,
            **{k: v for k, v in dict(options.get("backend_options") or {}).items() if k not in CPU_OPTIONS},
        )
    from m3rt.backends.onnxruntime import FLASH_FROM_TOKENS, OnnxRuntimeBackend

    notes = []
    if graph in INT8_CPU_GRAPHS:
        from m3rt.int8_kernel import int8_kernel
        from m3rt.validation import check_int8_on_this_cpu, int8_graph_for

        kernel = int8_kernel()
        if precision == "int8":
            graph = int8_graph_for(manifest, kernel)
        notes.append(f"int8: {manifest.graph(graph).file} for this CPU's {kernel.describe()} kernels")
        validated = check_int8_on_this_cpu(manifest, graph, kernel)
        if validated:
            notes.append(validated)
    long_graph = long_document_graph(manifest, graph, device)
    cpu_options = {k: v for k, v in dict(options.get("backend_options") or {}).items() if k in CPU_OPTIONS}
    if long_graph:
        crossover = FLASH_FROM_TOKENS.get(manifest.graph(graph).precision, FLASH_FROM_TOKENS["fp32"])
        cpu_options.setdefault("flash_from_tokens", crossover)
    engine = OnnxRuntimeBackend(
        manifest.graph_path(graph),
        providers=providers,
        intra_op_threads=options.get("intra_op_threads"),
        long_graph_path=manifest.graph_path(long_graph) if long_graph else None,
        **cpu_options,
    )
    engine.notes.extend(notes)
    return engine
