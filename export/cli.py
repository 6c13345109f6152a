"""`m3-export`: BGE-M3 checkpoint -> validated ONNX artifact directory."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from m3rt.export.onnx_graph import DEFAULT_OPSET


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m3-export",
        description="Export a BGE-M3 checkpoint to one ONNX graph (dense, sparse and ColBERT heads), "
        "validated against PyTorch, with a manifest (m3rt.json).",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="local checkpoint dir, hub id (e.g. BAAI/bge-m3, from the HF cache when offline), "
        "or synthetic:tiny / synthetic:full (random weights, real layout)",
    )
    parser.add_argument("--output", required=True, type=Path, help="artifact directory to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--max-length", type=int, default=8192, help="longest input in tokens, <s> and </s> included")
    parser.add_argument("--tokenizer", help="tokenizer.json for synthetic checkpoints (XLM-R vocabulary)")
    parser.add_argument("--seed", type=int, default=0, help="seed of synthetic weights")
    parser.add_argument("--min-cosine", type=float, default=0.99999, help="validation: least cosine per head")
    parser.add_argument("--max-abs-diff", type=float, default=1e-3, help="validation: largest abs difference")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from m3rt.export.artifact import ExportOptions, export_artifact
        from m3rt.export.checkpoint import CheckpointError
        from m3rt.export.validate import Tolerance, ValidationError
    except ImportError as exc:
        print(
            f"m3-export needs the export extra (torch, transformers, onnx): pip install 'm3rt[export]' ({exc})",
            file=sys.stderr,
        )
        return 2
    opts = ExportOptions(
        model=args.model,
        output=args.output,
        opset=args.opset,
        max_length=args.max_length,
        tokenizer=args.tokenizer,
        seed=args.seed,
        force=args.force,
        tolerance=Tolerance(min_cosine=args.min_cosine, max_abs_diff=args.max_abs_diff),
    )
    start = time.perf_counter()
    try:
        manifest = export_artifact(opts)
    except (CheckpointError, ValidationError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"m3-export: error: {exc}", file=sys.stderr)
        return 1
    validation = manifest["graphs"]["fp32"]["validation"]
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")
    print(f"validated on {validation['texts']} texts (up to {validation['max_tokens']} tokens) against PyTorch:")
    for head, fig in validation["heads"].items():
        print(f"  {head:15s} max abs diff {fig['max_abs_diff']:.2e}   min cosine {fig['min_cosine']:.8f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
