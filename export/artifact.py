"""Checkpoint -> artifact directory: graph, tokenizer, validation, manifest (written last)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import m3rt
from m3rt.export.checkpoint import ensure_tokenizer_json, load_reference, resolve_checkpoint
from m3rt.export.onnx_graph import DEFAULT_OPSET, export_graph
from m3rt.export.samples import sample_texts
from m3rt.export.validate import Tolerance, check_tolerance, compare_with_reference
from m3rt.manifest import FORMAT, FORMAT_VERSION, INPUT_NAMES, MANIFEST_NAME, OUTPUT_NAMES, file_record

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
    steps = tqdm(total=5, desc="m3-export", unit="step")

    def step(name: str):
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

            t = step("tokenizer")
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

            step("manifest")
            hidden = int(config.hidden_size)
            colbert_dim = int(reference.colbert_linear.out_features)
            manifest = {
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
                    "fp32": {
                        "file": "model.onnx",
                        "files": [p.name for p in graph_files],
                        "precision": "fp32",
                        "opset": opts.opset,
                        "exporter": "torch.onnx (TorchScript), eager attention",
                        "inputs": {n: {"dtype": "int64", "shape": ["batch", "sequence"]} for n in INPUT_NAMES},
                        "outputs": {
                            "dense_vecs": {"dtype": "float32", "shape": ["batch", hidden]},
                            "sparse_weights": {"dtype": "float32", "shape": ["batch", "sequence"]},
                            "colbert_vecs": {"dtype": "float32", "shape": ["batch", "sequence - 1", colbert_dim]},
                        },
                        "validation": {
                            "against": "PyTorch reference (fp32, eager attention)",
                            "tolerance": vars(opts.tolerance),
                            **figures,
                        },
                    }
                },
                "output_names": list(OUTPUT_NAMES),
                "timings": timings,
                "versions": _versions(),
            }
            files = sorted(p for p in staging.iterdir() if p.is_file())
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
