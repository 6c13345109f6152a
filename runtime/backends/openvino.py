"""OpenVINO on the CPU: the artifact's fp32 ONNX graph, run in fp32 or with bf16 inference precision.

OpenVINO reads `model.onnx` itself; `precision="bf16"` sets `INFERENCE_PRECISION_HINT=bf16`, which
runs the matrix products in bf16 (fp32 accumulation) on CPUs with native bf16 instructions
(`avx512_bf16`, AMX). Elsewhere OpenVINO would only emulate it, slower than fp32, so it is refused.

The bf16 form has no graph file of its own, so its gate lives in the manifest's `cpu_precisions`
section (written by `m3rt.export.bf16_gate`). When it was measured on another CPU, another OpenVINO
or not at all, the loader measures it here first against ONNX Runtime's fp32 graph, as int8 graphs
are, and refuses it below its gate.

Also here: the engine registry's functions for this engine (`m3rt.placement` registers them).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m3rt.core import Capabilities
from m3rt.errors import ArtifactError, BackendError, BackendOutOfMemory, M3Error
from m3rt.int8_kernel import proc_cpu_flags
from m3rt.manifest import INPUT_NAMES, OUTPUT_NAMES, GraphInfo, Manifest

PRECISIONS = ("fp32", "bf16")
# CPU flags (Linux names) of native bf16 arithmetic.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_OOM_MARKERS = ("bad_alloc", "out of memory", "failed to allocate", "cannot allocate")


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise M3Error("OpenVINO is not installed: pip install 'm3rt[openvino]'") from exc
    return openvino


def bf16_flags() -> frozenset[str]:
    """This CPU's native-bf16 flags (from /proc/cpuinfo; empty where it cannot be read)."""
    return proc_cpu_flags() & frozenset(BF16_FLAGS)


def bf16_unsupported_reason() -> str | None:
    """Why this CPU cannot run OpenVINO bf16 natively, or None when it can."""
    flags = bf16_flags()
    if not flags:
        return (
            "this CPU has no native bf16 arithmetic (neither avx512_bf16 nor AMX); OpenVINO would emulate "
            "it, slower than fp32. Use precision='fp32', or 'int8' with the onnxruntime backend"
        )
    capabilities = import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in capabilities:
        return f"OpenVINO does not offer bf16 on this CPU (its CPU capabilities: {', '.join(capabilities)})"
    return None


def _is_out_of_memory(text: str) -> bool:
    text = text.lower()
    return any(marker in text for marker in _OOM_MARKERS)


class OpenVinoBackend:
    """An OpenVINO compiled model of one ONNX graph on the CPU.

    Thread-safe (`capabilities`): a compiled model may be shared by threads, each with its own infer
    request (kept per thread). `cache_dir`: where OpenVINO keeps the compiled model between loads
    (its `CACHE_DIR`), None for none. `notes`: what the loader wants said about this backend.
    """

    name = "openvino"
    capabilities = Capabilities(thread_safe=True)

    def __init__(
        self,
        graph_path: Path,
        precision: str = "fp32",
        intra_op_threads: int | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ArtifactError(f"the openvino backend runs precision 'fp32' or 'bf16', not {precision!r}")
        if precision == "bf16":
            reason = bf16_unsupported_reason()
            if reason:
                raise ArtifactError(f"precision='bf16' with OpenVINO: {reason}")
        ov = import_openvino()
        self.graph_path = Path(graph_path)
        self.precision = precision
        self.notes: list[str] = []
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            # One request at a time uses every core (the runtime core batches for throughput).
            "PERFORMANCE_HINT": "LATENCY",
        }
        if intra_op_threads:
            config["INFERENCE_NUM_THREADS"] = int(intra_op_threads)
        if cache_dir is not None:
            config["CACHE_DIR"] = str(cache_dir)
        core = ov.Core()
        try:
            self._compiled = core.compile_model(str(graph_path), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with its own text
            raise ArtifactError(f"OpenVINO cannot load {graph_path}: {exc}") from exc
        names_in = tuple(next(iter(sorted(p.get_names()))) for p in self._compiled.inputs)
        names_out = {name for p in self._compiled.outputs for name in p.get_names()}
        if set(names_in) != set(INPUT_NAMES) or not set(OUTPUT_NAMES) <= names_out:
            raise ArtifactError(
                f"{graph_path} has inputs {names_in} and outputs {sorted(names_out)}; "
                f"expected {INPUT_NAMES} and {OUTPUT_NAMES}"
            )
        self._local = threading.local()

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        return request

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        request = self._request()
        feeds = {"input_ids": np.ascontiguousarray(input_ids), "attention_mask": np.ascontiguousarray(attention_mask)}
        try:
            request.infer(feeds)
            # copy: the request reuses its output memory on the next call.
            return {name: np.array(request.get_tensor(name).data, dtype=np.float32) for name in outputs}
        except Exception as exc:
            shape = tuple(input_ids.shape)
            if _is_out_of_memory(str(exc)):
                raise BackendOutOfMemory(f"OpenVINO out of memory on a batch of shape {shape}: {exc}") from exc
            raise BackendError(f"OpenVINO failed on a batch of shape {shape}: {exc}") from exc


# ---------------------------------------------------------------------- the engine registry's functions


def select(manifest: Manifest, precision: str, device: Any) -> GraphInfo:
    """Both precisions run the fp32 graph (bf16 is OpenVINO's inference precision, not a file)."""
    if precision not in PRECISIONS:
        raise ArtifactError(
            f"the openvino backend runs precision 'fp32' or 'bf16', not {precision!r} "
            "(int8: backend='onnxruntime'; or precision='auto')"
        )
    return manifest.graph("fp32")


def runs(record: Any, device: Any) -> bool:
    return isinstance(record, GraphInfo) and record.execution_provider in (None, "CPUExecutionProvider")


def unavailable(device: Any) -> str | None:
    try:
        import_openvino()
    except M3Error as exc:
        return str(exc)
    return None


def compiled_cache_dir(manifest: Manifest, options: Mapping[str, Any]) -> Path | None:
    """Where OpenVINO caches the compiled model: `backend_options={"cache_dir": ...}` (None: no cache),
    else a folder beside the artifact's graphs when it is writable, else none."""
    backend_options = dict(options.get("backend_options") or {})
    if "cache_dir" in backend_options:
        value = backend_options["cache_dir"]
        return None if value is None else Path(value)
    folder = manifest.root / ".openvino-cache"
    try:
        folder.mkdir(exist_ok=True)
    except OSError:  # a read-only artifact, or something else in the way
        return None
    return folder if os.access(folder, os.W_OK | os.X_OK) else None


def create(manifest: Manifest, placement: Any, options: Mapping[str, Any]) -> OpenVinoBackend:
    backend = OpenVinoBackend(
        manifest.root / placement.graph.file,
        placement.precision,
        intra_op_threads=options.get("intra_op_threads"),
        cache_dir=compiled_cache_dir(manifest, options),
    )
    return backend
