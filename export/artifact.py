"""Checkpoint -> artifact directory: graph, tokenizer, validation, manifest (written last)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
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
from m3rt.export.validate import Tolerance, check_tolerance, compare_with_reference
from m3rt.fidelity import DEFAULT_GATES, Gate
from m3rt.int8_kernel import Int8Kernel, int8_kernel
from m3rt.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, OUTPUT_NAMES, Manifest, file_record, graph_record
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
    tolerance: Tolerance = Tolerance()
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
    # model.flash.onnx: the fp32 graph with ONNX Runtime's CPU flash attention (export/flash_attention.py);
    # long texts in bounded memory. It shares model.onnx's weight file.
    flash_attention: bool = False


# cpu: model.int8.onnx (int8 weights, VNNI/AMX CPUs); cpu-u8: model.int8.u8.onnx (its uint8-weight
# twin, every CPU; served where u8 x s8 kernels saturate); qdq: model.int8.qdq.onnx (TensorRT).
INT8_FORMS = ("cpu", "cpu-u8", "qdq")
# ONNX Runtime session config: run QuantizeLinear/DequantizeLinear as float ops, not fused int8 kernels.
QDQ_SIMULATED = "session.disable_quant_qdq"


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
    """Builds precision variants next to the fp32 graph and measures each against it."""

    def __init__(self, staging: Path, manifest: dict[str, Any], opts: ExportOptions) -> None:
        self.opts = opts
        self.comparison = HeldoutComparison(Manifest(root=staging, data=manifest), staging / "model.onnx")
        self.tokenizer = self.comparison.tokenizer

    def measure(
        self,
        name: str,
        graph: Path,
        session_config: dict[str, str] | None = None,
        measured_on: dict[str, Any] | None = None,
        file: str | None = None,
    ) -> dict[str, Any]:
        """`file`: the artifact file the figures stand for, when `graph` is a stand-in for it."""
        figures = self.comparison.figures(graph, session_config)
        return self._gate(name, file or graph.name, figures, measured_on)

    def measure_int8_cpu(self, graph: Path, kernel: Int8Kernel, u8_twin: Path | None) -> dict[str, Any]:
        """`model.int8.onnx` measured in the exact arithmetic it is served with: directly where this CPU
        sums u8 x s8 in int32, else through its uint8-weight twin (the same integer products)."""
        on = {**kernel.as_record(), "exact": True, "graph": graph.name}
        if kernel.u8s8_exact:
            return self.measure("int8", graph, measured_on=on)
        on["graph"] = f"{graph.name} as uint8 weights (w + 128, zero point 128): the same products, unsaturated"
        if u8_twin is not None:
            return self.measure("int8", u8_twin, measured_on=on, file=graph.name)
        from m3rt.export.variants import write_u8_weight_twin

        with tempfile.TemporaryDirectory(prefix="m3rt-twin-") as tmp:
            twin = Path(tmp) / graph.name
            write_u8_weight_twin(graph, twin)
            return self.measure("int8", twin, measured_on=on, file=graph.name)

    def _gate(
        self, name: str, file: str, figures: dict[str, Any], measured_on: dict[str, Any] | None
    ) -> dict[str, Any]:
        gate = self.opts.gates.get(name.split("-")[0], Gate())
        failures = gate.failures(figures)
        if failures and not self.opts.allow_degraded:
            raise GateError(
                f"{file} misses its accuracy gate: {'; '.join(failures)} (pass --allow-degraded to keep it anyway)"
            )
        return {
            "against": "fp32 graph, held-out built-in samples",
            **figures,
            "gate": vars(gate),
            "passed": not failures,
            **({"measured_on": measured_on} if measured_on else {}),
        }


def export_artifact(opts: ExportOptions) -> dict[str, Any]:
    """Write the artifact into `opts.output` atomically: into a staging dir, renamed at the end."""
    unknown = set(opts.int8_forms) - set(INT8_FORMS)
    if unknown:
        raise ValueError(f"unknown int8 form(s) {', '.join(sorted(unknown))}; choose from {', '.join(INT8_FORMS)}")
    out = Path(opts.output)
    if out.exists() and any(out.iterdir()) and not opts.force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
    if not 2 <= opts.max_length <= MAX_LENGTH:
        raise ValueError(f"--max-length must be between 2 and {MAX_LENGTH}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    timings: dict[str, float] = {}
    steps = tqdm(total=5 + opts.fp16 + opts.int8 + opts.fused + opts.flash_attention, desc="m3-export", unit="step")

    def step(name: str) -> float:
        steps.set_postfix_str(name)
        return time.perf_counter()

    try:
        with tempfile.TemporaryDirectory(prefix="m3rt-ckpt-") as work:
            t = step("checkpoint")
            ckpt = resolve_checkpoint(opts.model, Path(work), tokenizer=opts.tokenizer, seed=opts.seed)
            reference = load_reference(ckpt.path)
            config = reference.encoder.config
            timings["load_checkpoint_s"] = time.perf_counter() - t
            steps.update()

            step("tokenizer")
            ensure_tokenizer_json(ckpt.path, staging / "tokenizer.json")
            specials = _special_tokens(staging / "tokenizer.json")
            steps.update()

            t = step("onnx export")
            graph_files = export_graph(reference, staging / "model.onnx", opset=opts.opset, pad_id=specials["pad"])
            timings["onnx_export_s"] = time.perf_counter() - t
            steps.update()

            t = step("validation")
            figures = compare_with_reference(
                reference, staging / "model.onnx", staging / "tokenizer.json", sample_texts(), specials["pad"]
            )
            timings["validation_s"] = time.perf_counter() - t
            steps.update()
            check_tolerance(figures, opts.tolerance, "model.onnx (fp32)")
            colbert_dim = int(reference.colbert_linear.out_features)
            fused = None
            if opts.fused:  # while the PyTorch reference is loaded: the fused fp32 graph is checked against it
                from m3rt.export.fused import build_fused_fp16

                t = step("fused fp16")
                fused = build_fused_fp16(reference, staging, specials["pad"], opts.tolerance)
                timings["fused_fp16_s"] = time.perf_counter() - t
                steps.update()
            flash = None
            if opts.flash_attention:
                from m3rt.export.flash_attention import FILE_NAME as FLASH_FILE
                from m3rt.export.flash_attention import write_flash_graph

                t = step("flash attention")
                flash_files = write_flash_graph(
                    staging / "model.onnx", staging / FLASH_FILE, int(config.num_attention_heads)
                )
                flash_figures = compare_with_reference(
                    reference, staging / FLASH_FILE, staging / "tokenizer.json", sample_texts(), specials["pad"]
                )
                check_tolerance(flash_figures, opts.tolerance, f"{FLASH_FILE} (fp32, flash attention)")
                flash = (flash_files, flash_figures)
                timings["flash_attention_s"] = time.perf_counter() - t
                steps.update()
            del reference  # frees the PyTorch weights before the variants load theirs

        hidden = int(config.hidden_size)
        entry = partial(graph_record, opset=opts.opset, hidden=hidden, colbert_dim=colbert_dim)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": ckpt.source,
            "model": {
                "architecture": "bge-m3",
                "hidden_size": hidden,
                "num_hidden_layers": int(config.num_hidden_layers),
                "num_attention_heads": int(config.num_attention_heads),
                "vocab_size": int(config.vocab_size),
                "colbert_dim": colbert_dim,
                "max_length": opts.max_length,
            },
            "special_tokens": specials,
            "tokenizer": {"file": "tokenizer.json"},
            "graphs": {
                "fp32": entry(
                    graph_files,
                    "fp32",
                    exporter="torch.onnx (TorchScript), eager attention",
                    backends=["onnxruntime-cpu", "onnxruntime-cuda"],
                    validation={
                        "against": "PyTorch reference (fp32, eager attention)",
                        "tolerance": vars(opts.tolerance),
                        **figures,
                    },
                ),
            },
            "output_names": list(OUTPUT_NAMES),
        }

        if flash is not None:
            from m3rt.export.flash_attention import GRAPH_KEY as FLASH_KEY
            from m3rt.export.flash_attention import HIDDEN_OUTPUT

            manifest["graphs"][FLASH_KEY] = flash_entry = entry(
                flash[0],
                "fp32",
                exporter="model.onnx with each attention block as com.microsoft.MultiHeadAttention (flash path)",
                backends=["onnxruntime-cpu"],
                execution_provider="CPUExecutionProvider",
                validation={
                    "against": "PyTorch reference (fp32, eager attention)",
                    "tolerance": vars(opts.tolerance),
                    **flash[1],
                },
            )
            shape = ["batch", "sequence", hidden]
            flash_entry["outputs"][HIDDEN_OUTPUT] = {"dtype": "float32", "shape": shape}

        if opts.fp16 or opts.int8:
            from m3rt.export import variants

            measured = _Variants(staging, manifest, opts)
            graphs = manifest["graphs"]
            if opts.fp16:
                t = step("fp16")
                files = variants.convert_fp16(
                    staging / "model.onnx", staging / "model.fp16.onnx", fp16_outputs=opts.fp16_outputs
                )
                graphs["fp16"] = entry(
                    files,
                    "fp16",
                    outputs_dtype="float16" if opts.fp16_outputs else "float32",
                    kept_fp32=list(variants.FP16_KEEP_FP32),
                    backends=["tensorrt", "onnxruntime-cuda"],
                    fidelity=measured.measure("fp16", staging / "model.fp16.onnx"),
                )
                timings["fp16_s"] = time.perf_counter() - t
                steps.update()
            if opts.int8:
                t = step("int8")
                sensitive = (
                    variants.INT8_SENSITIVE_LAYERS if opts.int8_sensitive_layers is None else opts.int8_sensitive_layers
                )
                kept = ["attention MatMuls", "LayerNorm", "Softmax", "normalisations"]
                kernel = int8_kernel()
                kept_cpu = [
                    *kept,
                    f"Q/K/V/FFN-in MatMuls of encoder layers {list(sensitive)} as two-term int8 (~16-bit)",
                ]
                cpu_forms = {"cpu", "cpu-u8"} & set(opts.int8_forms)
                if cpu_forms:
                    s8 = staging / "model.int8.onnx"
                    s8_files = variants.quantize_int8_cpu(staging / "model.onnx", s8, sensitive)
                    u8 = staging / "model.int8.u8.onnx"
                    u8_files = variants.write_u8_weight_twin(s8, u8) if "cpu-u8" in cpu_forms else None
                    cpu_entry = partial(
                        entry, precision="int8", backends=["onnxruntime-cpu"], kept_higher_precision=kept_cpu
                    )
                    if "cpu" in cpu_forms:
                        graphs["int8"] = cpu_entry(
                            s8_files,
                            form="per-channel symmetric int8 weights, dynamic uint8 activations (MatMulInteger)",
                            weight_type="int8",
                            exact_on="CPUs with VNNI or AMX (u8 x s8 products summed in int32)",
                            fidelity=measured.measure_int8_cpu(s8, kernel, u8 if u8_files else None),
                        )
                    if u8_files:
                        graphs["int8-u8"] = cpu_entry(
                            u8_files,
                            form="model.int8.onnx with uint8 weights (w + 128, zero point 128): the same products",
                            weight_type="uint8",
                            exact_on="every CPU (u8 x u8 products widened to 16 bits: no saturation)",
                            fidelity=measured.measure(
                                "int8-u8",
                                u8,
                                measured_on={
                                    **kernel.as_record(),
                                    "kernel": f"u8u8 int32, {kernel.isa}",
                                    "exact": True,
                                    "graph": u8.name,
                                },
                            ),
                        )
                    if "cpu" not in cpu_forms:
                        for path in s8_files:
                            path.unlink()
                if "qdq" in opts.int8_forms:
                    calibration, calibration_source = _calibration(opts.calibration)
                    files = variants.quantize_int8_qdq(
                        staging / "model.onnx",
                        staging / "model.int8.qdq.onnx",
                        measured.tokenizer,
                        calibration,
                        specials["pad"],
                        sensitive,
                    )
                    graphs["int8-qdq"] = entry(
                        files,
                        "int8",
                        backends=["tensorrt"],
                        form="explicit symmetric QuantizeLinear/DequantizeLinear, per-channel weights",
                        kept_higher_precision=kept + [f"weight MatMuls of encoder layers {list(sensitive)} in fp32"],
                        calibration={
                            "source": calibration_source,
                            "texts": len(calibration),
                            **variants.QDQ_CALIBRATION,
                        },
                        # TensorRT sums int8 products in int32; ONNX Runtime's own int8 kernels would add
                        # this CPU's saturation (or not), so the Q/DQ arithmetic is simulated in fp32.
                        fidelity=measured.measure(
                            "int8-qdq",
                            staging / "model.int8.qdq.onnx",
                            session_config={QDQ_SIMULATED: "1"},
                            measured_on={
                                "cpu": kernel.cpu,
                                "exact": True,
                                "arithmetic": "Q/DQ simulated in fp32 (ONNX Runtime session.disable_quant_qdq)",
                            },
                        ),
                    )
                timings["int8_s"] = time.perf_counter() - t
                steps.update()

        if fused is not None:
            from m3rt.export.fused import FILE_NAME, GRAPH_KEY

            for warning in fused.warnings:
                tqdm.write(f"m3-export: {FILE_NAME}: {warning}", file=sys.stderr)
            measured = {}
            if opts.fused_cpu_fidelity:
                measured["fidelity"] = _Variants(staging, manifest, opts).measure(
                    GRAPH_KEY,
                    staging / FILE_NAME,
                    measured_on={
                        "cpu": int8_kernel().cpu,
                        "arithmetic": "ONNX Runtime CPU (the CUDA kernels' own deviation: benchmarks/gpu_check.py)",
                    },
                )
            manifest["graphs"][GRAPH_KEY] = entry(fused.files, "fp16", **fused.manifest_fields(), **measured)

        if _want_engines(opts):
            from m3rt.export.engine import build_engines

            t = step("tensorrt")
            manifest["engines"] = build_engines(staging, manifest, **opts.engine_options)
            timings["tensorrt_s"] = time.perf_counter() - t

        step("manifest")
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
