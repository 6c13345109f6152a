"""Checkpoint -> artifact directory: tokenizer, graphs, manifest (written last).

Each graph of the artifact comes from one `GraphBuilder` of `BUILDERS`: it writes its files into the
staging directory, checks them (against the PyTorch reference, or against the fp32 graph with its
gate) and returns the graph's manifest entry as a `GraphInfo`. Builders that need the PyTorch
reference run first, while it is loaded; the others after it is freed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import onnx
from tqdm.auto import tqdm

import m3rt
from m3rt.errors import BelowGateError, ExportError
from m3rt.export.checkpoint import ensure_tokenizer_json, load_reference, resolve_checkpoint
from m3rt.export.onnx_graph import DEFAULT_OPSET, export_graph
from m3rt.export.samples import calibration_texts, sample_texts
from m3rt.export.validate import check_reference, compare_with_reference
from m3rt.fidelity import DEFAULT_GATES, REFERENCE_GATE, Gate, compare_outputs, gate_for
from m3rt.int8_kernel import Int8Kernel, int8_kernel
from m3rt.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    OUTPUT_NAMES,
    GraphInfo,
    Manifest,
    file_record,
    graph_record,
)
from m3rt.validation import HeldoutComparison

MAX_LENGTH = 8192  # positions 2..8193 of XLM-R's 8194-row table, <s> and </s> included


@dataclass
class ExportOptions:
    model: str
    output: Path
    opset: int = DEFAULT_OPSET
    max_length: int = MAX_LENGTH
    tokenizer: str | None = None
    seed: int = 0
    force: bool = False
    # The fp32 graphs against the PyTorch reference (`m3rt.fidelity.reference_gate`).
    tolerance: Gate = REFERENCE_GATE
    fp16: bool = False
    fp16_outputs: bool = False
    int8: bool = False
    calibration: Path | None = None
    int8_sensitive_layers: tuple[int, ...] | None = None  # None: variants.INT8_SENSITIVE_LAYERS
    int8_forms: tuple[str, ...] = ("cpu", "cpu-u8", "qdq")
    gates: dict[str, Gate] = field(default_factory=lambda: dict(DEFAULT_GATES))
    allow_degraded: bool = False
    engine: bool | None = None  # None: build engines when TensorRT and a GPU are present
    engine_options: dict[str, Any] = field(default_factory=dict)
    fused: bool = False  # model.fp16.fused.onnx for ONNX Runtime CUDA (export/fused.py)
    # The fused fp16 graph's fidelity on ONNX Runtime CPU: two full-model CPU passes over the held-out
    # samples. A GPU host that measures it on the GPU anyway (benchmarks/gpu_check.py) skips them.
    fused_cpu_fidelity: bool = True
    # model.flash.onnx (and model.int8.flash.onnx, ... with --int8): the graph with ONNX Runtime's CPU
    # flash attention (export/flash_attention.py), which the CPU runs long batches on: long texts in
    # bounded memory. Each shares its plain graph's weight file.
    flash_attention: bool = True


# cpu: model.int8.onnx (int8 weights, VNNI/AMX CPUs); cpu-u8: model.int8.u8.onnx (its uint8-weight
# twin, every CPU; served where u8 x s8 kernels saturate); qdq: model.int8.qdq.onnx (TensorRT).
INT8_FORMS = ("cpu", "cpu-u8", "qdq")
# ONNX Runtime session config: run QuantizeLinear/DequantizeLinear as float ops, not fused int8 kernels.
QDQ_SIMULATED = "session.disable_quant_qdq"
# Kept in higher precision in every int8 graph.
INT8_KEPT = ["attention MatMuls", "LayerNorm", "Softmax", "normalisations"]
FP32_VALIDATION = "PyTorch reference (fp32, eager attention)"


class GateError(BelowGateError, ExportError):
    """A precision variant misses its accuracy gate (and --allow-degraded was not given)."""


def _versions() -> dict[str, str]:
    import onnxruntime
    import tokenizers
    import torch
    import transformers

    return {
        "m3rt": m3rt.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tokenizers": tokenizers.__version__,
    }


def _special_tokens(tokenizer_path: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    names = {"cls": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}
    found = {key: tok.token_to_id(token) for key, token in names.items()}
    missing = [names[k] for k in ("cls", "pad", "eos", "unk") if found[k] is None]
    if missing:
        raise ValueError(f"{tokenizer_path} lacks the special tokens {missing}")
    return {k: v for k, v in found.items() if v is not None}


def _make_readable(directory: Path) -> None:
    """mkdtemp and onnx's external-data writer create owner-only modes; an artifact is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


class _Variants:
    """Measures graphs against the fp32 graph on the held-out samples, and holds them to their gates."""

    def __init__(self, staging: Path, manifest: dict[str, Any], opts: ExportOptions) -> None:
        self.opts = opts
        self.comparison = HeldoutComparison(Manifest(root=staging, data=manifest), staging / "model.onnx")
        self.tokenizer = self.comparison.tokenizer
        self._outputs: dict[tuple[Path, tuple], dict[str, Any]] = {}

    def outputs(self, graph: Path, session_config: dict[str, str] | None = None) -> dict[str, Any]:
        """The held-out samples encoded by `graph` (once per graph)."""
        key = (graph, tuple(sorted((session_config or {}).items())))
        if key not in self._outputs:
            self._outputs[key] = self.comparison.encode(graph, session_config)
        return self._outputs[key]

    def measure(
        self,
        name: str,
        graph: Path,
        session_config: dict[str, str] | None = None,
        measured_on: dict[str, Any] | None = None,
        file: str | None = None,
    ) -> dict[str, Any]:
        """`file`: the artifact file the figures stand for, when `graph` is a stand-in for it."""
        figures = compare_outputs(self.outputs(graph, session_config), self.comparison.reference)
        gate = gate_for(name, self.opts.gates)
        return self._held_to(gate, file or graph.name, figures, measured_on)

    def measure_int8_cpu(self, graph: Path, kernel: Int8Kernel, name: str = "int8") -> dict[str, Any]:
        """An int8-weight graph measured in the exact arithmetic it is served with: directly where this
        CPU sums u8 x s8 in int32, else through its uint8-weight twin (the same integer products)."""
        on = {**kernel.as_record(), "exact": True, "graph": graph.name}
        if kernel.u8s8_exact:
            return self.measure(name, graph, measured_on=on)
        on["graph"] = f"{graph.name} as uint8 weights (w + 128, zero point 128): the same products, unsaturated"
        from m3rt.export.variants import write_u8_weight_twin

        with tempfile.TemporaryDirectory(prefix="m3rt-twin-") as tmp:
            twin = Path(tmp) / graph.name
            write_u8_weight_twin(graph, twin)
            return self.measure(name, twin, measured_on=on, file=graph.name)

    def against_base(self, name: str, graph: Path, base: Path) -> dict[str, Any]:
        """An int8 flash-attention graph against the int8 graph it rewrites, held to the int8 gate: the
        activations' dynamic quantisation rounds the (slightly different) attention outputs anew, so
        the two differ by int8 noise, as each does from fp32 (RESULTS.md, "Plain or flash attention")."""
        figures = compare_outputs(self.outputs(graph), self.outputs(base))
        gate = gate_for(name, self.opts.gates)
        failures = gate.failures(figures)
        if failures and not self.opts.allow_degraded:
            raise GateError(f"{graph.name} disagrees with {base.name}, the graph it rewrites: {'; '.join(failures)}")
        return {"against": f"{base.name}, held-out built-in samples", **figures, "gate": gate.as_record()}

    def _held_to(
        self, gate: Gate, file: str, figures: dict[str, Any], measured_on: dict[str, Any] | None
    ) -> dict[str, Any]:
        failures = gate.failures(figures)
        if failures and not self.opts.allow_degraded:
            raise GateError(
                f"{file} misses its accuracy gate: {'; '.join(failures)} (pass --allow-degraded to keep it anyway)"
            )
        return {
            "against": "fp32 graph, held-out built-in samples",
            **figures,
            "gate": gate.as_record(),
            "passed": not failures,
            **({"measured_on": measured_on} if measured_on else {}),
        }


@dataclass
class ExportContext:
    """What the builders share: the options, the staging directory, the model's shape, the PyTorch
    reference while it is loaded, the manifest so far and the held-out measurements."""

    opts: ExportOptions
    staging: Path
    specials: dict[str, int]
    config: Any  # the checkpoint's transformers config
    colbert_dim: int
    manifest: dict[str, Any]
    timings: dict[str, float]
    reference: Any = None  # the PyTorch reference (export/reference.py), None once freed
    _variants: _Variants | None = None

    def entry(self, files: list[Path], precision: str, **fields: Any) -> dict[str, Any]:
        hidden = int(self.config.hidden_size)
        return graph_record(
            files, precision, opset=self.opts.opset, hidden=hidden, colbert_dim=self.colbert_dim, **fields
        )

    def info(self, name: str, files: list[Path], precision: str, **fields: Any) -> GraphInfo:
        return GraphInfo.parse(name, self.entry(files, precision, **fields))

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def variants(self) -> _Variants:
        if self._variants is None:
            self._variants = _Variants(self.staging, self.manifest, self.opts)
        return self._variants

    def validate(self, graph: Path, what: str) -> dict[str, Any]:
        """`graph` against the PyTorch reference on the built-in samples, held to `opts.tolerance`."""
        figures = compare_with_reference(
            self.reference, graph, self.staging / "tokenizer.json", sample_texts(), self.specials["pad"]
        )
        check_reference(figures, self.opts.tolerance, what)
        return {"against": FP32_VALIDATION, "gate": self.opts.tolerance.as_record(), **figures}

    @property
    def int8_sensitive_layers(self) -> tuple[int, ...]:
        from m3rt.export.variants import INT8_SENSITIVE_LAYERS

        layers = self.opts.int8_sensitive_layers
        return INT8_SENSITIVE_LAYERS if layers is None else tuple(layers)


@dataclass(frozen=True)
class GraphBuilder:
    """One graph of the artifact: under manifest key `name`, when `wanted(opts)`.

    `build` writes the graph's files into the staging directory, checks them and returns its entry;
    `needs_reference`: it runs while the PyTorch reference is loaded; `measure`, if any, completes the
    entry after the reference is freed (measurements against the fp32 graph load their own weights).
    """

    name: str
    step: str
    wanted: Callable[[ExportOptions], bool]
    build: Callable[[ExportContext], GraphInfo]
    needs_reference: bool = False
    measure: Callable[[ExportContext, GraphInfo], GraphInfo] | None = None


def _build_fp32(ctx: ExportContext) -> GraphInfo:
    files = export_graph(ctx.reference, ctx.staging / "model.onnx", opset=ctx.opts.opset, pad_id=ctx.specials["pad"])
    return ctx.info(
        "fp32",
        files,
        "fp32",
        exporter="torch.onnx (TorchScript), eager attention",
        backends=["onnxruntime-cpu", "onnxruntime-cuda"],
        validation=ctx.validate(ctx.staging / "model.onnx", "model.onnx (fp32)"),
    )


def _write_flash(ctx: ExportContext, base: str) -> tuple[list[Path], dict[str, Any]]:
    """`base`'s graph rewritten with flash attention beside it: (files, entry fields it shares)."""
    from m3rt.export.flash_attention import flash_file_name, write_flash_graph

    source = ctx.staging / ctx.manifest["graphs"][base]["file"]
    files = write_flash_graph(source, ctx.staging / flash_file_name(source.name), ctx.num_heads)
    fields = {
        "exporter": f"{source.name} with each attention block as com.microsoft.MultiHeadAttention (flash path)",
        "backends": ["onnxruntime-cpu"],
        "execution_provider": "CPUExecutionProvider",
        "long_document_twin_of": base,
    }
    return files, fields


def _with_hidden_output(info: GraphInfo, hidden: int) -> GraphInfo:
    from m3rt.export.flash_attention import HIDDEN_OUTPUT

    entry = dict(info.details)
    entry["outputs"] = {**entry["outputs"], HIDDEN_OUTPUT: {"dtype": "float32", "shape": ["batch", "sequence", hidden]}}
    return GraphInfo.parse(info.name, entry)


def _build_fp32_flash(ctx: ExportContext) -> GraphInfo:
    from m3rt.export.flash_attention import GRAPH_KEY

    files, fields = _write_flash(ctx, "fp32")
    validation = ctx.validate(files[0], f"{files[0].name} (fp32, flash attention)")
    info = ctx.info(GRAPH_KEY, files, "fp32", **fields, validation=validation)
    return _with_hidden_output(info, int(ctx.config.hidden_size))


def _build_fused(ctx: ExportContext) -> GraphInfo:
    from m3rt.export.fused import FILE_NAME, GRAPH_KEY, build_fused_fp16

    fused = build_fused_fp16(ctx.reference, ctx.staging, ctx.specials["pad"], ctx.opts.tolerance)
    for warning in fused.warnings:
        tqdm.write(f"m3-export: {FILE_NAME}: {warning}", file=sys.stderr)
    return ctx.info(GRAPH_KEY, fused.files, "fp16", **fused.manifest_fields())


def _measure_fused(ctx: ExportContext, info: GraphInfo) -> GraphInfo:
    if not ctx.opts.fused_cpu_fidelity:
        return info
    fidelity = ctx.variants.measure(
        info.name,
        ctx.staging / info.file,
        measured_on={
            "cpu": int8_kernel().cpu,
            "arithmetic": "ONNX Runtime CPU (the CUDA kernels' own deviation: benchmarks/gpu_check.py)",
        },
    )
    return GraphInfo.parse(info.name, {**info.details, "fidelity": fidelity})


def _build_fp16(ctx: ExportContext) -> GraphInfo:
    from m3rt.export import variants

    fp16_outputs = ctx.opts.fp16_outputs
    files = variants.convert_fp16(
        ctx.staging / "model.onnx", ctx.staging / "model.fp16.onnx", fp16_outputs=fp16_outputs
    )
    return ctx.info(
        "fp16",
        files,
        "fp16",
        outputs_dtype="float16" if fp16_outputs else "float32",
        kept_fp32=list(variants.FP16_KEEP_FP32),
        backends=["tensorrt", "onnxruntime-cuda"],
        fidelity=ctx.variants.measure("fp16", files[0]),
    )


def _int8_cpu_fields(ctx: ExportContext) -> dict[str, Any]:
    layers = list(ctx.int8_sensitive_layers)
    return {
        "backends": ["onnxruntime-cpu"],
        "kept_higher_precision": [
            *INT8_KEPT,
            f"Q/K/V/FFN-in MatMuls of encoder layers {layers} as two-term int8 (~16-bit)",
        ],
    }


def _int8_s8(ctx: ExportContext, work: Path) -> Path:
    """model.int8.onnx in the staging directory when it is built, else into `work`."""
    from m3rt.export import variants

    s8 = ctx.staging / "model.int8.onnx"
    if s8.exists():
        return s8
    s8 = work / "model.int8.onnx"
    variants.quantize_int8_cpu(ctx.staging / "model.onnx", s8, ctx.int8_sensitive_layers)
    return s8


S8_FIELDS = {
    "form": "per-channel symmetric int8 weights, dynamic uint8 activations (MatMulInteger)",
    "weight_type": "int8",
    "exact_on": "CPUs with VNNI or AMX (u8 x s8 products summed in int32)",
}
U8_FIELDS = {
    "form": "model.int8.onnx with uint8 weights (w + 128, zero point 128): the same products",
    "weight_type": "uint8",
    "exact_on": "every CPU (u8 x u8 products widened to 16 bits: no saturation)",
}


def _u8_measured_on(kernel: Int8Kernel, graph: Path) -> dict[str, Any]:
    return {**kernel.as_record(), "kernel": f"u8u8 int32, {kernel.isa}", "exact": True, "graph": graph.name}


def _build_int8(ctx: ExportContext) -> GraphInfo:
    from m3rt.export import variants

    s8 = ctx.staging / "model.int8.onnx"
    # Flash twins read the weights from the graph's own data file, so it gets one whatever its size.
    files = variants.quantize_int8_cpu(
        ctx.staging / "model.onnx", s8, ctx.int8_sensitive_layers, external=ctx.opts.flash_attention
    )
    fidelity = ctx.variants.measure_int8_cpu(s8, int8_kernel())
    return ctx.info("int8", files, "int8", **_int8_cpu_fields(ctx), **S8_FIELDS, fidelity=fidelity)


def _build_int8_u8(ctx: ExportContext) -> GraphInfo:
    from m3rt.export import variants

    u8 = ctx.staging / "model.int8.u8.onnx"
    with tempfile.TemporaryDirectory(prefix="m3rt-int8-", dir=ctx.staging.parent) as work:
        files = variants.write_u8_weight_twin(_int8_s8(ctx, Path(work)), u8, external=ctx.opts.flash_attention)
    fidelity = ctx.variants.measure("int8-u8", u8, measured_on=_u8_measured_on(int8_kernel(), u8))
    return ctx.info("int8-u8", files, "int8", **_int8_cpu_fields(ctx), **U8_FIELDS, fidelity=fidelity)


def _int8_flash_builder(base: str) -> Callable[[ExportContext], GraphInfo]:
    def build(ctx: ExportContext) -> GraphInfo:
        files, fields = _write_flash(ctx, base)
        kernel = int8_kernel()
        name = f"{base}-flash"
        if base == "int8":
            fidelity = ctx.variants.measure_int8_cpu(files[0], kernel, name=name)
        else:
            fidelity = ctx.variants.measure(name, files[0], measured_on=_u8_measured_on(kernel, files[0]))
        shape = S8_FIELDS if base == "int8" else U8_FIELDS
        base_graph = ctx.staging / ctx.manifest["graphs"][base]["file"]
        info = ctx.info(
            name,
            files,
            "int8",
            **{**_int8_cpu_fields(ctx), **shape, **fields},
            # Not "validation", which is against PyTorch: the rewrite against the graph it rewrites.
            against_plain_graph=ctx.variants.against_base(name, files[0], base_graph),
            fidelity=fidelity,
        )
        return _with_hidden_output(info, int(ctx.config.hidden_size))

    return build


def _build_int8_qdq(ctx: ExportContext) -> GraphInfo:
    from m3rt.export import variants

    calibration, calibration_source = _calibration(ctx.opts.calibration)
    qdq = ctx.staging / "model.int8.qdq.onnx"
    files = variants.quantize_int8_qdq(
        ctx.staging / "model.onnx",
        qdq,
        ctx.variants.tokenizer,
        calibration,
        ctx.specials["pad"],
        ctx.int8_sensitive_layers,
    )
    return ctx.info(
        "int8-qdq",
        files,
        "int8",
        backends=["tensorrt"],
        form="explicit symmetric QuantizeLinear/DequantizeLinear, per-channel weights",
        kept_higher_precision=[
            *INT8_KEPT,
            f"weight MatMuls of encoder layers {list(ctx.int8_sensitive_layers)} in fp32",
        ],
        calibration={"source": calibration_source, "texts": len(calibration), **variants.QDQ_CALIBRATION},
        # TensorRT sums int8 products in int32; ONNX Runtime's own int8 kernels would add this CPU's
        # saturation (or not), so the Q/DQ arithmetic is simulated in fp32.
        fidelity=ctx.variants.measure(
            "int8-qdq",
            qdq,
            session_config={QDQ_SIMULATED: "1"},
            measured_on={
                "cpu": int8_kernel().cpu,
                "exact": True,
                "arithmetic": "Q/DQ simulated in fp32 (ONNX Runtime session.disable_quant_qdq)",
            },
        ),
    )


def _int8_form(form: str) -> Callable[[ExportOptions], bool]:
    return lambda opts: opts.int8 and form in opts.int8_forms


def _int8_flash(form: str) -> Callable[[ExportOptions], bool]:
    return lambda opts: opts.int8 and opts.flash_attention and form in opts.int8_forms


# In manifest order; those needing the PyTorch reference run first, whatever their place here.
BUILDERS: tuple[GraphBuilder, ...] = (
    GraphBuilder("fp32", "onnx export", lambda opts: True, _build_fp32, needs_reference=True),
    GraphBuilder("fp32-flash", "flash attention", lambda opts: opts.flash_attention, _build_fp32_flash, True),
    GraphBuilder("fp16", "fp16", lambda opts: opts.fp16, _build_fp16),
    GraphBuilder("int8", "int8", _int8_form("cpu"), _build_int8),
    GraphBuilder("int8-u8", "int8 (uint8 weights)", _int8_form("cpu-u8"), _build_int8_u8),
    GraphBuilder("int8-flash", "int8 flash attention", _int8_flash("cpu"), _int8_flash_builder("int8")),
    GraphBuilder("int8-u8-flash", "int8-u8 flash attention", _int8_flash("cpu-u8"), _int8_flash_builder("int8-u8")),
    GraphBuilder("int8-qdq", "int8 Q/DQ", _int8_form("qdq"), _build_int8_qdq),
    GraphBuilder("fp16-fused", "fused fp16", lambda opts: opts.fused, _build_fused, True, _measure_fused),
)


def _check_options(opts: ExportOptions) -> Path:
    unknown = set(opts.int8_forms) - set(INT8_FORMS)
    if unknown:
        raise ValueError(f"unknown int8 form(s) {', '.join(sorted(unknown))}; choose from {', '.join(INT8_FORMS)}")
    out = Path(opts.output)
    if out.exists() and any(out.iterdir()) and not opts.force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
    if not 2 <= opts.max_length <= MAX_LENGTH:
        raise ValueError(f"--max-length must be between 2 and {MAX_LENGTH}")
    return out


def _manifest_head(opts: ExportOptions, source: dict[str, Any], config: Any, colbert_dim: int, specials: dict) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "model": {
            "architecture": "bge-m3",
            "hidden_size": int(config.hidden_size),
            "num_hidden_layers": int(config.num_hidden_layers),
            "num_attention_heads": int(config.num_attention_heads),
            "vocab_size": int(config.vocab_size),
            "colbert_dim": colbert_dim,
            "max_length": opts.max_length,
        },
        "special_tokens": specials,
        "tokenizer": {"file": "tokenizer.json"},
        "graphs": {},
        "output_names": list(OUTPUT_NAMES),
    }


def export_artifact(opts: ExportOptions, builders: tuple[GraphBuilder, ...] = BUILDERS) -> dict[str, Any]:
    """Write the artifact into `opts.output` atomically: into a staging dir, renamed at the end."""
    out = _check_options(opts)
    wanted = [b for b in builders if b.wanted(opts)]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    timings: dict[str, float] = {}
    steps = tqdm(total=3 + len(wanted), desc="m3-export", unit="step")

    def timed(name: str, step: str, run: Callable[[], Any]) -> Any:
        steps.set_postfix_str(step)
        start = time.perf_counter()
        result = run()
        key = f"{name.replace('-', '_')}_s"
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
        return result

    try:
        built: dict[str, GraphInfo] = {}
        with tempfile.TemporaryDirectory(prefix="m3rt-ckpt-") as work:
            steps.set_postfix_str("checkpoint")
            start = time.perf_counter()
            ckpt = resolve_checkpoint(opts.model, Path(work), tokenizer=opts.tokenizer, seed=opts.seed)
            reference = load_reference(ckpt.path)
            timings["load_checkpoint_s"] = time.perf_counter() - start
            steps.update()
            steps.set_postfix_str("tokenizer")
            ensure_tokenizer_json(ckpt.path, staging / "tokenizer.json")
            specials = _special_tokens(staging / "tokenizer.json")
            steps.update()
            colbert_dim = int(reference.colbert_linear.out_features)
            config = reference.encoder.config
            manifest = _manifest_head(opts, ckpt.source, config, colbert_dim, specials)
            ctx = ExportContext(opts, staging, specials, config, colbert_dim, manifest, timings, reference)
            for builder in wanted:
                if builder.needs_reference:
                    built[builder.name] = info = timed(builder.name, builder.step, partial(builder.build, ctx))
                    if builder.measure is None:
                        manifest["graphs"][builder.name] = info.details
                    steps.update()
            ctx.reference = reference = None  # frees the PyTorch weights before the variants load theirs

        for builder in wanted:
            if builder.needs_reference and builder.measure is None:
                continue
            if builder.needs_reference:
                info = timed(builder.name, builder.step, partial(builder.measure, ctx, built[builder.name]))
            else:
                info = timed(builder.name, builder.step, partial(builder.build, ctx))
                steps.update()
            manifest["graphs"][builder.name] = info.details

        if _want_engines(opts):
            from m3rt.export.engine import build_engines

            build = partial(build_engines, staging, manifest, **opts.engine_options)
            manifest["engines"] = timed("tensorrt", "tensorrt", build)

        steps.set_postfix_str("manifest")
        manifest["timings"] = timings
        manifest["versions"] = _versions()
        files = sorted(p for p in staging.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
        manifest["files"] = {p.name: file_record(p) for p in files}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        steps.update()
        _make_readable(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        steps.close()
    return manifest


def _calibration(path: Path | None) -> tuple[list[str], str]:
    if path is None:
        return calibration_texts(), "built-in (export/data/calibration.txt)"
    texts = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"calibration file {path} has no text lines")
    return texts, f"{Path(path).name} (sha256 {file_record(Path(path))['sha256'][:16]})"


def _want_engines(opts: ExportOptions) -> bool:
    """Explicit --engine / --no-engine wins; by default engines are built where they can be."""
    from m3rt.export.engine import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if opts.engine is False:
        return False
    if reason is None:
        return True
    if opts.engine:
        raise RuntimeError(f"--engine was requested but {reason}")
    if opts.fp16 or opts.int8:
        tqdm.write(f"m3-export: no TensorRT engines built: {reason}", file=sys.stderr)
    return False
