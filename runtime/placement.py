"""What runs a model, decided in one place: `resolve` -> `Placement`; `create_backend` builds it.

The engines are a registry (`ENGINES`: name -> `EngineSpec`). Each says which devices it runs on,
which artifact record it serves for a precision on a device, why it cannot run here (if it cannot)
and how its backend is built. `resolve` reads only the registry and the manifest, so an engine is
added by registering it; backends know nothing of placements, manifests' choices or the model.

`backend="auto"` tries TensorRT (an engine of this precision, TensorRT and a GPU present), then
ONNX Runtime CUDA (no device asked for, not int8, onnxruntime-gpu sees a GPU), then ONNX Runtime on
the CPU; an explicit device keeps every engine that cannot run there out of the choice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import m3rt.backends.openvino as openvino_engine
import m3rt.int8_kernel as int8_arithmetic
from m3rt.errors import ArtifactError, M3Error
from m3rt.int8_kernel import Int8Kernel
from m3rt.manifest import EngineInfo, GraphInfo, Manifest

CUDA_PROVIDER = "CUDAExecutionProvider"
# The ONNX Runtime CPU int8 graphs: int8 weights (exact on VNNI/AMX) and their uint8 twin (exact everywhere).
INT8_CPU_GRAPHS = ("int8", "int8-u8")
_DEVICE_HINT = "expected 'cpu', 'cuda' or 'cuda:N'"


class Device(NamedTuple):
    """A device kind ("cpu" or "cuda") and its index (0 on the CPU)."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def parse_device(device: str | None, providers: Sequence[Any] | None = None) -> Device:
    """Device("cpu", 0) or Device("cuda", index) from "cpu" / "cuda" / "cuda:N"; None means CUDA when
    the provider list asks for CUDAExecutionProvider (its "device_id" option gives the index), else CPU."""
    requested = _requested_device(device, providers)
    return requested if requested is not None else Device("cpu", 0)


def _requested_device(device: str | None, providers: Sequence[Any] | None = None) -> Device | None:
    """The device asked for by `device` or by a CUDA provider entry; None when neither asks."""
    if device is None:
        cuda_entries = [p for p in providers or () if _provider_name(p) == CUDA_PROVIDER]
        if not cuda_entries:
            return None
        entry = cuda_entries[0]
        options = entry[1] if isinstance(entry, (tuple, list)) and len(entry) > 1 else {}
        return Device("cuda", int(options.get("device_id", 0)))
    if not isinstance(device, str):
        raise ArtifactError(f"device {device!r}: {_DEVICE_HINT}")
    text = device.strip().lower()
    if text == "cpu":
        return Device("cpu", 0)
    if text == "cuda" or text.startswith("cuda:"):
        index = text.split(":", 1)[1] if ":" in text else "0"
        if not index.isdigit():
            raise ArtifactError(f"device {device!r}: {_DEVICE_HINT}")
        return Device("cuda", int(index))
    raise ArtifactError(f"device {device!r}: {_DEVICE_HINT}")


def _provider_name(provider: Any) -> str:
    return provider[0] if isinstance(provider, (tuple, list)) else str(provider)


@dataclass(frozen=True)
class Placement:
    """What runs: which engine, on which device, serving which artifact records.

    `graph`: the ONNX graph served (for TensorRT, the graph its plan was built from, when recorded).
    `plan`: the TensorRT plan, for the TensorRT engine only. `long_document_graph`: a second graph of
    the same engine and precision for long padded batches (flash attention), when the engine selects
    per batch. `int8_kernel`: this CPU's int8 arithmetic when an int8 graph runs on it, and
    `int8_check` whether that graph's gate was measured in other arithmetic (the loader then measures
    it here before serving it). `auto`: what `precision="auto"` measured and picked.
    """

    engine: str
    device: Device
    precision: str
    graph: GraphInfo | None
    plan: EngineInfo | None = None
    long_document_graph: GraphInfo | None = None
    int8_kernel: Int8Kernel | None = None
    int8_check: bool = False
    # How `precision="auto"` chose this placement (`m3rt.auto_precision.AutoChoice`); None when asked for.
    auto: Any = None

    @property
    def graphs(self) -> tuple[GraphInfo, ...]:
        """Every ONNX graph this placement may run a batch on."""
        return tuple(g for g in (self.graph, self.long_document_graph) if g is not None)

    @property
    def quadratic_attention(self) -> bool:
        """Whether some batch may hold a layer's attention scores whole ([rows, heads, length, length]):
        every graph but the flash-attention one does (TensorRT plans count as such: unknown)."""
        if self.plan is not None or self.graph is None:
            return True
        return not all(g.flash_attention for g in self.graphs)

    def outputs(self) -> frozenset[str]:
        """The output names every graph of this placement has (empty when a TensorRT plan's are not recorded)."""
        names = [frozenset(g.details.get("outputs", {})) for g in self.graphs] if self.plan is None else []
        return frozenset.intersection(*names) if names else frozenset()


Record = GraphInfo | EngineInfo


@dataclass(frozen=True)
class EngineSpec:
    """One engine of the registry.

    `devices`: the device kinds it runs on. `select(manifest, precision, device)`: the record it serves
    (ArtifactError when the artifact has none for it). `runs(record, device)`: whether it runs that
    record (an ONNX graph, a TensorRT plan) on that device. `unavailable(device)`: why it cannot run
    here, or None. `create(manifest, placement, options)`: the backend (options: providers,
    intra_op_threads, backend_options).
    """

    name: str
    devices: tuple[str, ...]
    select: Callable[[Manifest, str, Device], Record]
    runs: Callable[[Record, Device], bool]
    unavailable: Callable[[Device], str | None]
    create: Callable[[Manifest, Placement, Mapping[str, Any]], Any]

    def supports(self, record: Record, device: Device) -> bool:
        """Whether this engine runs `record` on `device`."""
        return device.kind in self.devices and self.runs(record, device)


ENGINES: dict[str, EngineSpec] = {}


def register(spec: EngineSpec) -> None:
    """Add (or replace) an engine of the registry."""
    ENGINES[spec.name] = spec


def select_graph(manifest: Manifest, precision: str, device: str | Device) -> str:
    """The manifest graph ONNX Runtime runs for this precision on this device kind.

    On CUDA, fp16 prefers the transformer-optimizer-fused graph (`fp16-fused`) when the artifact has
    one: it measured 1.4-5.9x the plain graph there. A graph recorded as CUDA-only is never chosen for
    the CPU, even when asked for by name.
    """
    kind = device.kind if isinstance(device, Device) else device
    name = precision
    if kind == "cuda" and precision == "fp16" and manifest.has_graph("fp16-fused"):
        name = "fp16-fused"
    if kind == "cpu" and precision == "int8" and not manifest.has_graph(name) and manifest.has_graph("int8-u8"):
        name = "int8-u8"
    graph = manifest.graph(name)
    provider = graph.execution_provider
    if kind == "cpu" and provider not in (None, "CPUExecutionProvider"):
        raise ArtifactError(
            f"{graph.file} is built for ONNX Runtime's {provider} (fused contrib kernels); load it with "
            f"device='cuda', or pick another precision for the CPU ({', '.join(sorted(manifest.graph_names))})"
        )
    return name


def int8_graph_for(manifest: Manifest, kernel: Int8Kernel) -> str:
    """The CPU int8 graph to serve: int8 weights where u8 x s8 sums are exact, else the uint8 twin."""
    if not kernel.u8s8_exact and manifest.has_graph("int8-u8"):
        return "int8-u8"
    if manifest.has_graph("int8"):
        return "int8"
    if manifest.has_graph("int8-u8"):
        return "int8-u8"
    raise ArtifactError(f"{manifest.root} has no 'int8' graph; it has: {', '.join(sorted(manifest.graph_names))}")


def served_as_measured(graph: GraphInfo, kernel: Int8Kernel) -> bool:
    """Whether this CPU computes the graph's integer products exactly, as its recorded gate was measured.

    A gate measured with exact (int32) sums holds wherever the sums are exact again: uint8 weights
    everywhere, int8 weights where this CPU's u8 x s8 kernel does not saturate.
    """
    measured = graph.measured_on
    if not measured or not measured.get("exact"):
        return False
    if graph.weight_type == "uint8":
        return True
    return kernel.u8s8_exact


def _auto_candidates(manifest: Manifest, precision: str, requested: Device | None) -> list[tuple[str, Device]]:
    """`backend="auto"`: (engine, device) in order of preference, only those that can run where asked."""
    candidates = []
    if precision in manifest.engine_names:
        candidates.append(("tensorrt", requested or Device("cuda", 0)))
    if requested is None and precision != "int8":  # int8 graphs are built for the CPU's kernels
        candidates.append(("onnxruntime", Device("cuda", 0)))
    candidates.append(("onnxruntime", requested or Device("cpu", 0)))
    return [(name, device) for name, device in candidates if device.kind in ENGINES[name].devices]


def resolve(
    manifest: Manifest,
    precision: str = "fp32",
    device: str | None = None,
    *,
    backend: str = "onnxruntime",
    providers: Sequence[Any] | None = None,
) -> Placement:
    """The placement of `precision` of `manifest`: engine `backend` ("onnxruntime", "openvino",
    "tensorrt" or "auto") on `device` ("cpu", "cuda", "cuda:N"; None: the engine's default, or CUDA when
    `providers` asks for CUDAExecutionProvider). ArtifactError when the engine cannot serve it there.

    `precision="auto"` (CPU only) picks engine and precision: the fastest form whose gate holds on this
    CPU, measured once per CPU and artifact (`m3rt.auto_precision`); `backend` must then be "auto" or
    the default "onnxruntime"."""
    requested = _requested_device(device, providers)
    if requested is None and providers:
        requested = Device("cpu", 0)  # a provider list without CUDA keeps ONNX Runtime on the CPU
    if precision == "auto":
        raise ArtifactError("precision='auto' is measured, not resolved: m3rt.auto_precision.resolve_auto")
    if backend == "auto":
        reasons = []
        for name, where in _auto_candidates(manifest, precision, requested):
            reason = ENGINES[name].unavailable(where)
            if reason is None:
                return _place(manifest, precision, name, where)
            reasons.append(f"{name} on {where}: {reason}")
        raise ArtifactError(f"no engine can run {precision} here ({'; '.join(reasons)})")
    if backend not in ENGINES:
        choices = ", ".join([*ENGINES, "auto"])
        raise ArtifactError(f"unknown backend {backend!r}; choose from {choices}")
    spec = ENGINES[backend]
    where = requested or Device(spec.devices[0], 0)
    if where.kind not in spec.devices:
        raise ArtifactError(f"the {backend} backend runs on {', '.join(spec.devices)}, not on {where}")
    return _place(manifest, precision, backend, where)


def _place(manifest: Manifest, precision: str, engine: str, device: Device) -> Placement:
    spec = ENGINES[engine]
    record = spec.select(manifest, precision, device)
    if not spec.supports(record, device):
        raise ArtifactError(f"the {engine} backend cannot run {record.file} on {device}")
    if isinstance(record, EngineInfo):
        built_from = [g for g in map(manifest.graph, manifest.graph_names) if g.file == record.built_from]
        return Placement(engine, device, precision, built_from[0] if built_from else None, plan=record)
    if device.kind != "cpu":
        return Placement(engine, device, precision, record)
    if record.name not in INT8_CPU_GRAPHS:
        twin = _flash_twin(manifest, record) if engine == "onnxruntime" else None
        return Placement(engine, device, precision, record, long_document_graph=twin)
    kernel = int8_arithmetic.int8_kernel()  # looked up when called: tests stand in another CPU's
    if precision == "int8":
        record = manifest.graph(int8_graph_for(manifest, kernel))
    return Placement(
        engine,
        device,
        precision,
        record,
        long_document_graph=_flash_twin(manifest, record),
        int8_kernel=kernel,
        int8_check=not served_as_measured(record, kernel),
    )


def _flash_twin(manifest: Manifest, graph: GraphInfo) -> GraphInfo | None:
    """The flash-attention twin of a CPU graph (`<graph>-flash`: the same weights, scores never held
    whole), which ONNX Runtime's CPU backend runs long batches on; None when the artifact has none."""
    twin = f"{graph.name}-flash"
    return manifest.graph(twin) if manifest.has_graph(twin) else None


# `backend_options` of ONNX Runtime's CPU backend (the rest are its CUDA backend's).
CPU_OPTIONS = ("flash_from_tokens", "long_session_arena", "share_weights")


def create_backend(manifest: Manifest, placement: Placement, **options: Any) -> Any:
    """The backend of `placement`. Options: `providers` (ONNX Runtime provider list),
    `intra_op_threads`, `backend_options` (keyword arguments of `OnnxRuntimeCudaBackend`:
    cuda_graph, graph_buckets, device_postprocess, colbert_fp16; on the CPU, `flash_from_tokens`: the
    padded length from which batches run on the flash-attention graph, `long_session_arena`: whether
    that graph's session keeps ONNX Runtime's memory arena, `share_weights`: whether both graphs'
    sessions share one unprepacked copy of the weights)."""
    return ENGINES[placement.engine].create(manifest, placement, options)


# ---------------------------------------------------------------------- the built-in engines


def _onnxruntime_select(manifest: Manifest, precision: str, device: Device) -> GraphInfo:
    return manifest.graph(select_graph(manifest, precision, device))


def _onnxruntime_runs(record: Record, device: Device) -> bool:
    # A graph recorded for one execution provider (the CUDA-fused graph) runs there only.
    if not isinstance(record, GraphInfo):
        return False
    return device.kind != "cpu" or record.execution_provider in (None, "CPUExecutionProvider")


def _onnxruntime_unavailable(device: Device) -> str | None:
    try:
        if device.kind == "cuda":
            from m3rt.backends.onnxruntime_cuda import cuda_unavailable_reason

            return cuda_unavailable_reason()
        import m3rt.backends.onnxruntime  # noqa: F401 - raises M3Error without onnxruntime
    except M3Error as exc:
        return str(exc)
    return None


def _onnxruntime_create(manifest: Manifest, placement: Placement, options: Mapping[str, Any]) -> Any:
    providers = options.get("providers")
    path = manifest.root / placement.graph.file
    if placement.device.kind == "cuda":
        from m3rt.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend

        cuda_options: dict[str, Any] = {}
        for p in providers or ():
            if isinstance(p, (tuple, list)) and p[0] == CUDA_PROVIDER and len(p) > 1:
                cuda_options = {k: v for k, v in dict(p[1]).items() if k != "device_id"}
        return OnnxRuntimeCudaBackend(
            path,
            device_id=placement.device.index,
            pad_id=manifest.special_tokens["pad"],
            provider_options=cuda_options,
            **{k: v for k, v in dict(options.get("backend_options") or {}).items() if k not in CPU_OPTIONS},
        )
    from m3rt.backends.onnxruntime import FLASH_FROM_TOKENS, OnnxRuntimeBackend

    cpu_options = {k: v for k, v in dict(options.get("backend_options") or {}).items() if k in CPU_OPTIONS}
    long_graph = placement.long_document_graph
    if long_graph is not None:
        crossover = FLASH_FROM_TOKENS.get(placement.graph.precision, FLASH_FROM_TOKENS["fp32"])
        cpu_options.setdefault("flash_from_tokens", crossover)
    return OnnxRuntimeBackend(
        path,
        providers=providers,
        intra_op_threads=options.get("intra_op_threads"),
        long_graph_path=manifest.root / long_graph.file if long_graph is not None else None,
        **cpu_options,
    )


def _tensorrt_select(manifest: Manifest, precision: str, device: Device) -> EngineInfo:
    if precision not in manifest.engine_names:
        raise ArtifactError(
            f"{manifest.root} has no {precision} TensorRT engine; build one on the GPU machine with "
            f"m3-export --engine (engines here: {', '.join(sorted(manifest.engine_names)) or 'none'})"
        )
    return manifest.engine(precision)


def _tensorrt_runs(record: Record, device: Device) -> bool:
    return isinstance(record, EngineInfo)


def _tensorrt_unavailable(device: Device) -> str | None:
    from m3rt.backends.tensorrt import import_tensorrt
    from m3rt.kernels.cuda_api import gpu_unavailable_reason

    try:
        import_tensorrt()
    except M3Error as exc:
        return str(exc)
    return gpu_unavailable_reason()


def _tensorrt_create(manifest: Manifest, placement: Placement, options: Mapping[str, Any]) -> Any:
    from m3rt.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(manifest.root / placement.plan.file, placement.plan, device=placement.device.index)


register(
    EngineSpec(
        "onnxruntime", ("cpu", "cuda"), _onnxruntime_select, _onnxruntime_runs, _onnxruntime_unavailable,
        _onnxruntime_create,
    )
)  # fmt: skip
register(EngineSpec("tensorrt", ("cuda",), _tensorrt_select, _tensorrt_runs, _tensorrt_unavailable, _tensorrt_create))


def _openvino_create(manifest: Manifest, placement: Placement, options: Mapping[str, Any]) -> Any:
    return openvino_engine.create(manifest, placement, options)


register(
    EngineSpec(
        "openvino", ("cpu",), openvino_engine.select, openvino_engine.runs, openvino_engine.unavailable,
        _openvino_create,
    )
)  # fmt: skip
