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

from tqdm.auto import tqdm

import m3rt
from m3rt.backends.onnxruntime import OnnxRuntimeBackend
from m3rt.export.checkpoint import ensure_tokenizer_json, load_reference, resolve_checkpoint
from m3rt.export.onnx_graph import DEFAULT_OPSET, export_graph
from m3rt.export.samples import calibration_texts, sample_texts
from m3rt.export.validate import Tolerance, check_tolerance, compare_with_reference
from m3rt.fidelity import DEFAULT_GATES, Gate, compare_outputs
from m3rt.manifest import FORMAT, FORMAT_VERSION, INPUT_NAMES, MANIFEST_NAME, OUTPUT_NAMES, Manifest, file_record
from m3rt.model import M3Model
from m3rt.tokenizer import M3Tokenizer

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
    int8_forms: tuple[str, ...] = ("cpu", "qdq")
    gates: dict[str, Gate] = field(default_factory=lambda: dict(DEFAULT_GATES))
    allow_degraded: bool = False
    engine: bool | None = None  # None: build engines when TensorRT and a GPU are present
    engine_options: dict[str, Any] = field(default_factory=dict)
    fused: bool = False  # model.fp16.fused.onnx for ONNX Runtime CUDA (export/fused.py)


class GateError(Exception):
    """A precision variant misses its accuracy gate (and --allow-degraded was not given)."""


def _versions() -> dict[str, str]:
    import onnx
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


def _graph_entry(
    files: list[Path],
    precision: str,
    opset: int,
    hidden: int,
    colbert_dim: int,
    outputs_dtype: str = "float32",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "file": files[0].name,
        "files": [p.name for p in files],
        "precision": precision,
        "opset": opset,
        "inputs": {n: {"dtype": "int64", "shape": ["batch", "sequence"]} for n in INPUT_NAMES},
        "outputs": {
            "dense_vecs": {"dtype": outputs_dtype, "shape": ["batch", hidden]},
            "sparse_weights": {"dtype": outputs_dtype, "shape": ["batch", "sequence"]},
            "colbert_vecs": {"dtype": outputs_dtype, "shape": ["batch", "sequence - 1", colbert_dim]},
        },
        **extra,
    }


class _Variants:
    """Builds precision variants next to the fp32 graph and measures each against it."""

    def __init__(self, staging: Path, manifest: dict[str, Any], opts: ExportOptions) -> None:
        self.opts = opts
        self.tokenizer = M3Tokenizer(staging / "tokenizer.json")
        self._view = Manifest(root=staging, data=manifest)
        self.heldout = sample_texts()
        self.reference = self._encode(staging / "model.onnx")

    def _encode(self, graph: Path) -> dict[str, Any]:
        model = M3Model(self._view, OnnxRuntimeBackend(graph), self.tokenizer)
        return model.encode(
            self.heldout, batch_size=8, max_length=512, return_dense=True, return_sparse=True, return_colbert_vecs=True
        )

    def measure(self, name: str, graph: Path) -> dict[str, Any]:
        figures = compare_outputs(self._encode(graph), self.reference)
        gate = self.opts.gates.get(name.split("-")[0], Gate())
        failures = gate.failures(figures)
        if failures and not self.opts.allow_degraded:
            raise GateError(
                f"{graph.name} misses its accuracy gate: {'; '.join(failures)} "
                "(pass --allow-degraded to keep it anyway)"
            )
        return {
            "against": "fp32 graph, held-out built-in samples",
            **figures,
            "gate": vars(gate),
            "passed": not failures,
        }


def export_artifact(opts: ExportOptions) -> dict[str, Any]:
    """Write the artifact into `opts.output` atomically: into a staging dir, renamed at the end."""
    out = Path(opts.output)
    if out.exists() and any(out.iterdir()) and not opts.force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
    if not 2 <= opts.max_length <= MAX_LENGTH:
        raise ValueError(f"--max-length must be between 2 and {MAX_LENGTH}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    timings: dict[str, float] = {}
    steps = tqdm(total=5 + opts.fp16 + opts.int8 + opts.fused, desc="m3-export", unit="step")

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
            del reference  # frees the PyTorch weights before the variants load theirs

        hidden = int(config.hidden_size)
        entry = partial(_graph_entry, opset=opts.opset, hidden=hidden, colbert_dim=colbert_dim)
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
                if "cpu" in opts.int8_forms:
                    files = variants.quantize_int8_cpu(staging / "model.onnx", staging / "model.int8.onnx", sensitive)
                    graphs["int8"] = entry(
                        files,
                        "int8",
                        backends=["onnxruntime-cpu"],
                        form="per-channel symmetric int8 weights, dynamic int8 activations (MatMulInteger)",
                        kept_higher_precision=[
                            *kept,
                            f"Q/K/V/FFN-in MatMuls of encoder layers {list(sensitive)} as two-term int8 (~16-bit)",
                        ],
                        fidelity=measured.measure("int8", staging / "model.int8.onnx"),
                    )
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
                        fidelity=measured.measure("int8-qdq", staging / "model.int8.qdq.onnx"),
                    )
                timings["int8_s"] = time.perf_counter() - t
                steps.update()

        if fused is not None:
            from m3rt.export.fused import FILE_NAME, GRAPH_KEY

            for warning in fused.warnings:
                tqdm.write(f"m3-export: {FILE_NAME}: {warning}", file=sys.stderr)
            fidelity = _Variants(staging, manifest, opts).measure(GRAPH_KEY, staging / FILE_NAME)
            fidelity["measured_on"] = "ONNX Runtime CPU; the CUDA kernels' figures: benchmarks/gpu_check.py"
            manifest["graphs"][GRAPH_KEY] = entry(fused.files, "fp16", **fused.manifest_fields(), fidelity=fidelity)

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
