"""`m3-export`: BGE-M3 checkpoint -> validated ONNX artifact directory."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from m3rt.errors import M3Error, error_answer
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
        "or synthetic:tiny / synthetic:small / synthetic:full (random weights, real layout)",
    )
    parser.add_argument("--output", "-o", required=True, type=Path, help="artifact directory to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--max-length", type=int, default=8192, help="longest input in tokens, <s> and </s> included")
    parser.add_argument("--tokenizer", help="tokenizer.json for synthetic checkpoints (XLM-R vocabulary)")
    parser.add_argument("--seed", type=int, default=0, help="seed of synthetic weights")
    parser.add_argument("--min-cosine", type=float, default=0.99999, help="validation: least cosine per head")
    parser.add_argument("--max-abs-diff", type=float, default=1e-3, help="validation: largest abs difference")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    precision = parser.add_argument_group("precision variants")
    precision.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx")
    precision.add_argument(
        "--bf16",
        action="store_true",
        help="also measure OpenVINO bf16 (INFERENCE_PRECISION_HINT on model.onnx) against fp32 on this CPU and "
        "record its gate in the manifest (needs m3rt[openvino] and a CPU with avx512_bf16 or AMX)",
    )
    precision.add_argument("--fp16-outputs", action="store_true", help="fp16 graph returns float16 outputs")
    precision.add_argument(
        "--fused",
        action="store_true",
        help="also write model.fp16.fused.onnx: ONNX Runtime's transformer-optimizer-fused graph in fp16, "
        "for ONNX Runtime CUDA (M3Model.load(..., precision='fp16', device='cuda') picks it)",
    )
    precision.add_argument(
        "--flash-attention",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write model.flash.onnx (and, with --int8, model.int8.flash.onnx ...): the graph with ONNX Runtime's "
        "CPU flash attention, sharing its plain graph's weights; the CPU runs long batches on it, so long texts "
        "stay in bounded memory (default: on; --no-flash-attention leaves it out)",
    )
    precision.add_argument(
        "--int8",
        action="store_true",
        help="also write model.int8.onnx (ONNX Runtime CPU) and model.int8.qdq.onnx (TensorRT)",
    )
    precision.add_argument(
        "--calibration",
        type=Path,
        help="int8 calibration text, one text per line (default: the built-in multilingual sample)",
    )
    precision.add_argument(
        "--int8-sensitive-layers",
        type=lambda v: tuple(int(x) for x in v.split(",") if x.strip()),
        help="encoder layers given higher precision in the int8 graphs: two-term int8 in model.int8.onnx, "
        "fp32 in model.int8.qdq.onnx (default 0,1; '' quantises all plainly)",
    )
    precision.add_argument(
        "--int8-forms",
        type=lambda v: tuple(x.strip() for x in v.split(",") if x.strip()),
        default=("cpu", "cpu-u8", "qdq"),
        help="which int8 graphs to build: cpu (model.int8.onnx, int8 weights, for VNNI/AMX CPUs), cpu-u8 "
        "(model.int8.u8.onnx, the same products with uint8 weights, for AVX2 and AVX-512 without VNNI; the "
        "runtime picks per CPU), qdq (model.int8.qdq.onnx, TensorRT); default all three",
    )
    precision.add_argument("--allow-degraded", action="store_true", help="keep variants that miss their gates")
    precision.add_argument("--gate-fp16-dense", type=float, default=0.999, help="fp16: least dense cosine")
    precision.add_argument("--gate-int8-dense", type=float, default=0.99, help="int8: least dense cosine")
    precision.add_argument("--gate-int8-colbert", type=float, default=0.98, help="int8: least mean ColBERT cosine")
    precision.add_argument("--gate-int8-sparse", type=float, default=0.9, help="int8: least sparse top-10 overlap")
    engines = parser.add_argument_group("TensorRT engines")
    engines.add_argument(
        "--engine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="build TensorRT plans from the fp16/int8 graphs (default: when TensorRT and a GPU are present)",
    )
    engines.add_argument(
        "--profiles",
        help="optimisation profiles, BATCHxSEQ,... e.g. 256x64,32x512,2x8192 "
        "(default: short/medium/long from --token-budget)",
    )
    engines.add_argument("--token-budget", type=int, default=16384, help="padded tokens per batch for profiles")
    engines.add_argument("--workspace-gb", type=float, default=8.0, help="TensorRT workspace limit")
    engines.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file, reused across builds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from m3rt.export.artifact import ExportOptions, export_artifact
        from m3rt.fidelity import Gate, reference_gate
    except ImportError as exc:
        print(
            f"m3-export needs the export extra and an ONNX Runtime: pip install 'm3rt[cpu,export]' ({exc})",
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
        tolerance=reference_gate(min_cosine=args.min_cosine, max_abs_diff=args.max_abs_diff),
        fp16=args.fp16 or args.fp16_outputs,
        fp16_outputs=args.fp16_outputs,
        int8=args.int8,
        calibration=args.calibration,
        int8_sensitive_layers=args.int8_sensitive_layers,
        int8_forms=args.int8_forms,
        allow_degraded=args.allow_degraded,
        engine=args.engine,
        fused=args.fused,
        flash_attention=args.flash_attention,
        gates={
            "fp16": Gate(dense_cos_min=args.gate_fp16_dense),
            "int8": Gate(
                dense_cos_min=args.gate_int8_dense,
                colbert_cos_mean=args.gate_int8_colbert,
                sparse_top10_overlap=args.gate_int8_sparse,
            ),
        },
        engine_options={
            k: v
            for k, v in {
                "profiles": args.profiles,
                "token_budget": args.token_budget,
                "workspace_gb": args.workspace_gb,
                "timing_cache": args.timing_cache,
            }.items()
            if v is not None
        },
    )
    start = time.perf_counter()
    try:
        manifest = export_artifact(opts)
    except M3Error as exc:  # CheckpointError, ValidationError, GateError, ...: ExportErrors
        print(f"m3-export: error: {exc}", file=sys.stderr)
        return error_answer(exc).exit_code
    except (
        FileExistsError,
        FileNotFoundError,
        ValueError,
        RuntimeError,
    ) as exc:
        print(f"m3-export: error: {exc}", file=sys.stderr)
        return 1
    if args.bf16:
        from m3rt.bf16_gate import record_bf16_gate

        try:
            manifest.setdefault("cpu_precisions", {})["bf16"] = record_bf16_gate(
                args.output, allow_degraded=args.allow_degraded
            )
        except M3Error as exc:
            print(f"m3-export: error: {args.output} is written, but bf16 is not recorded: {exc}", file=sys.stderr)
            return error_answer(exc).exit_code
    validation = manifest["graphs"]["fp32"]["validation"]
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")
    print(f"validated on {validation['texts']} texts (up to {validation['max_tokens']} tokens) against PyTorch:")
    for head, fig in validation["heads"].items():
        print(f"  {head:15s} max abs diff {fig['max_abs_diff']:.2e}   min cosine {fig['min_cosine']:.8f}")
    for graph in [*manifest["graphs"].values(), *manifest.get("cpu_precisions", {}).values()]:
        if "fidelity" in graph:
            fid = graph["fidelity"]
            name = graph.get("file") or "OpenVINO bf16"
            print(
                f"{name} vs fp32 on {fid['texts']} held-out texts: dense cos min {fid['dense_cos_min']:.5f} "
                f"mean {fid['dense_cos_mean']:.5f}; ColBERT cos min {fid['colbert_cos_min']:.5f} mean "
                f"{fid['colbert_cos_mean']:.5f}; sparse top-10 {fid['sparse_top10_overlap']:.3f}, Jaccard "
                f"{fid['sparse_jaccard']:.3f}, max weight err {fid['sparse_weight_max_abs_err']:.4f}"
                f"{'' if fid['passed'] else '  [BELOW GATE, kept: --allow-degraded]'}"
            )
            on = fid.get("measured_on")
            if isinstance(on, dict):
                how = on.get("kernel") or on.get("arithmetic") or f"OpenVINO {on.get('openvino')}"
                print(f"  measured on {on.get('cpu', '?')}: {how}", end="")
                print(f"; {on['graph']}" if on.get("graph") else "")
    for engine in manifest.get("engines", {}).values():
        print(
            f"{engine['file']}: TensorRT {engine['tensorrt_version']} on {engine['gpu']}, "
            f"{len(engine['profiles'])} profiles, checked against ONNX Runtime"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
