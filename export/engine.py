"""TensorRT engines from the FP16 / INT8-QDQ graphs (strongly typed: precision lives in the graph).

TensorRT is imported lazily and only here and in the TensorRT backend. Written against the
TensorRT 10.x/11.x Python API; the names used are checked against both versions' bindings by
tests/test_tensorrt_api.py. Nothing here runs without TensorRT and a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from m3rt.manifest import engine_record
from m3rt.profiles import Profile, default_profiles, parse_profiles

ENGINE_SOURCES = {"fp16": "fp16", "int8": "int8-qdq"}  # engine precision -> graph it is built from
DEFAULT_WORKSPACE_GB = 8.0
TIMING_CACHE = Path(os.environ.get("M3RT_TIMING_CACHE", Path.home() / ".cache" / "m3rt" / "tensorrt-timing.cache"))


def tensorrt_unavailable_reason() -> str | None:
    """None when engines can be built here, else why not (for a clear message either way)."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:
        from m3rt.backends.tensorrt import TENSORRT_INSTALL_HINT

        return f"TensorRT is not importable ({exc}); {TENSORRT_INSTALL_HINT}"
    from m3rt.kernels.cuda_api import gpu_unavailable_reason

    return gpu_unavailable_reason()


def build_engines(
    staging: Path,
    manifest: dict[str, Any],
    profiles: str | None = None,
    token_budget: int = 16384,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    timing_cache: Path = TIMING_CACHE,
) -> dict[str, Any]:
    """Build one plan per available variant, check it against ONNX Runtime, describe it."""
    import tensorrt as trt

    from m3rt.kernels.cuda_api import device_description

    max_length = int(manifest["model"]["max_length"])
    planned = parse_profiles(profiles, max_length) if profiles else default_profiles(token_budget, max_length)
    logger = trt.Logger(trt.Logger.WARNING)
    engines: dict[str, Any] = {}
    for precision, graph_name in ENGINE_SOURCES.items():
        graph = manifest["graphs"].get(graph_name)
        if graph is None:
            continue
        plan_path = staging / f"model.{precision}.plan"
        plan_path.write_bytes(_build_plan(trt, logger, staging / graph["file"], planned, workspace_gb, timing_cache))
        info = engine_record(
            plan_path,
            graph["file"],
            trt.__version__,
            device_description(),
            [{"name": p.name, "min": p.shapes[0], "opt": p.shapes[1], "max": p.shapes[2]} for p in planned],
            workspace_bytes=int(workspace_gb * (1 << 30)),
        )
        info["check"] = _check_against_onnxruntime(staging, manifest, info, staging / graph["file"])
        engines[precision] = info
    return engines


def _build_plan(
    trt, logger, onnx_path: Path, profiles: list[Profile], workspace_gb: float, timing_cache: Path
) -> bytes:
    builder = trt.Builder(logger)
    # STRONGLY_TYPED: required for strong typing on 10.x, accepted and ignored by 11.x.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for planned in profiles:
        profile = builder.create_optimization_profile()
        low, opt, high = planned.shapes
        for name in ("input_ids", "attention_mask"):
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    previous = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(previous)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(cache.serialize()))
    return bytes(plan)


def _check_against_onnxruntime(
    staging: Path, manifest: dict[str, Any], info: dict[str, Any], graph: Path
) -> dict[str, float]:
    """A silent miscompile must fail the export: compare the engine with ONNX Runtime on samples."""
    from m3rt.backends.onnxruntime import OnnxRuntimeBackend
    from m3rt.backends.tensorrt import TensorRTBackend
    from m3rt.export.samples import sample_texts
    from m3rt.fidelity import ENGINE_GATE, compare_outputs
    from m3rt.manifest import EngineInfo, Manifest
    from m3rt.model import M3Model
    from m3rt.tokenizer import M3Tokenizer

    view = Manifest(root=staging, data=manifest)
    tokenizer = M3Tokenizer(staging / "tokenizer.json")
    texts = sample_texts()
    kw = dict(max_length=512, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    engine = EngineInfo.parse("check", info)
    engine_out = M3Model(view, TensorRTBackend(staging / engine.file, engine), tokenizer).encode(texts, **kw)
    ort_out = M3Model(view, OnnxRuntimeBackend(graph), tokenizer).encode(texts, **kw)
    figures = compare_outputs(engine_out, ort_out)
    failures = ENGINE_GATE.failures(figures)
    if failures or not np.isfinite(figures["dense_cos_min"]):
        raise RuntimeError(
            f"the TensorRT engine {info['file']} disagrees with ONNX Runtime on {graph.name}: "
            f"{'; '.join(failures) or 'non-finite outputs'} ({figures})"
        )
    return figures
