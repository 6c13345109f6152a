"""`m3rt`: one command with a verb per job.

- `export`: checkpoint -> artifact (the same as `m3-export`);
- `encode`: texts -> the three outputs, summarised (`--granularity`: per token, sentence, passage, document);
- `explain`: why a passage matched a query, highlighted in the terminal or as JSON;
- `inspect`: an artifact's manifest, verified; which int8 graph this CPU serves;
- `compare`: one precision of an artifact against another on the held-out samples (the gates' metrics);
- `bench`: latency, throughput, fidelity and memory of every backend (the same as `m3-bench`);
- `serve`: the HTTP API on Ray Serve (extra `m3rt[serve]`; see m3rt.serve);
- `embed`: a corpus to Parquet shards, resumable, here or on a Ray cluster (extra `m3rt[embed]`; see m3rt.embed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from m3rt.embed.cli import add_embed_parser
from m3rt.errors import BelowGateError, InputError, M3Error, error_answer
from m3rt.serve.cli import add_serve_parser


def _encode(args: argparse.Namespace) -> int:
    from m3rt.model import M3Model

    model = M3Model.load(args.artifact, verify=not args.no_verify)
    if args.granularity:
        from m3rt.explain_view import granular_json, print_granular

        everything = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
        options = {"long_document": args.long_document}
        levels = dict(granularity=args.granularity, granularity_options=options)
        results = model.encode(args.texts, max_length=args.max_length, **levels, **everything)
        print(granular_json(args.texts, results)) if args.json else print_granular(args.texts, results)
        return 0
    out = model.encode(
        args.texts, max_length=args.max_length, return_dense=True, return_sparse=True, return_colbert_vecs=True
    )
    rows = zip(args.texts, out["dense_vecs"], out["lexical_weights"], out["colbert_vecs"])
    for text, dense, lexical, colbert in rows:
        top = sorted(lexical.items(), key=lambda kv: -kv[1])[: args.top]
        tokens = ", ".join(f"{model.tokenizer.decode_id(int(k))!r}:{float(w):.3f}" for k, w in top)
        print(f"text: {text[:70]!r}")
        print(f"  dense   norm {float(np.linalg.norm(dense)):.6f}  dim {dense.shape[0]}")
        print(f"  sparse  {len(lexical)} tokens; top {len(top)}: {tokens}")
        print(f"  colbert shape {tuple(colbert.shape)}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from m3rt.explain_view import explanation_json, print_explanation
    from m3rt.model import M3Model

    model = M3Model.load(args.artifact, verify=not args.no_verify)
    explanation = model.explain(args.query, args.passage)
    print(explanation_json(explanation)) if args.json else print_explanation(explanation, top=args.top)
    return 0


def _inspect_cpu_forms(manifest) -> None:
    """The bf16 form's recorded gate and what precision='auto' picked on this CPU (when measured)."""
    from m3rt.auto_precision import cached_choice

    bf16 = manifest.data.get("cpu_precisions", {}).get("bf16")
    if bf16:
        fid = bf16["fidelity"]
        on = fid.get("measured_on", {})
        print(
            f"bf16     OpenVINO on the fp32 graph: dense cos min {fid['dense_cos_min']:.5f}, ColBERT cos mean "
            f"{fid['colbert_cos_mean']:.5f}, sparse top-10 {fid['sparse_top10_overlap']:.3f}, lexical keys "
            f"{fid['sparse_jaccard']:.3f}{'' if fid['passed'] else ' (BELOW GATE)'}; measured on "
            f"{on.get('cpu', '?')} (OpenVINO {on.get('openvino', '?')})"
        )
    choice = cached_choice(manifest)
    if choice is None:
        print("auto     precision='auto' has not measured this CPU yet (the first load with it measures)")
    else:
        print(f"auto     {choice.describe()}")


def _inspect(args: argparse.Namespace) -> int:
    from m3rt.manifest import load_manifest

    manifest = load_manifest(args.artifact, verify=not args.no_verify)
    data = manifest.data
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    model = manifest.model
    print(f"artifact {manifest.root}  (format {data['format_version']}, created {data['created']})")
    print(f"source   {manifest.source.get('model')} [{manifest.source.get('kind')}]")
    print(
        f"model    {model.num_hidden_layers} layers x {model.hidden_size}, vocab {model.vocab_size}, "
        f"max length {model.max_length}"
    )
    print(f"specials {manifest.special_tokens}")
    for graph in map(manifest.graph, manifest.graph_names):
        quality = []
        if graph.validation:
            worst = min(h["min_cosine"] for h in graph.validation["heads"].values())
            # The fused graph's validation is of its fp32 form (before the fp16 conversion).
            what = f" ({graph.validation['graph']})" if "graph" in graph.validation else ""
            quality.append(f"validated against PyTorch{what}, min cosine {worst:.8f}")
        if graph.fidelity:
            fid = graph.fidelity
            quality.append(
                f"vs fp32: dense cos min {fid['dense_cos_min']:.5f}, ColBERT cos mean "
                f"{fid['colbert_cos_mean']:.5f}, sparse top-10 {fid['sparse_top10_overlap']:.3f}"
                f"{'' if fid['passed'] else ' (BELOW GATE)'}"
            )
        if graph.measured_on:
            on = graph.measured_on
            quality.append(f"measured on {on.get('cpu', '?')} ({on.get('kernel') or on.get('arithmetic')})")
        print(f"graph    {graph.name}: {graph.file} for {', '.join(graph.backends)}; {'; '.join(quality)}")
    if manifest.has_graph("int8") or manifest.has_graph("int8-u8"):
        from m3rt.placement import resolve

        placement = resolve(manifest, "int8", "cpu")
        kernel = placement.int8_kernel
        served = placement.graph.file
        print(f"int8     this CPU ({kernel.cpu}): {kernel.describe()}; precision='int8' serves {served}")
    _inspect_cpu_forms(manifest)
    for engine in map(manifest.engine, manifest.engine_names):
        print(
            f"engine   {engine.name}: {engine.file} TensorRT {engine.tensorrt_version} on {engine.gpu} "
            f"(compute {engine.compute_capability}), {len(engine.profiles)} profiles"
        )
    for name, rec in manifest.files.items():
        print(f"file     {name:20s} {rec['size']:>14,d} B  sha256 {rec['sha256'][:16]}...")
    print("verified: all files match the manifest" if not args.no_verify else "not verified (--no-verify)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from m3rt.manifest import load_manifest
    from m3rt.placement import resolve
    from m3rt.validation import HeldoutComparison, gate_of

    manifest = load_manifest(args.artifact, verify=not args.no_verify)

    def graph(precision: str) -> str:
        return resolve(manifest, precision, "cpu").graph.name

    got, want = graph(args.precision), graph(args.against)
    texts = None
    if args.texts is not None:
        try:
            lines = args.texts.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read --texts {args.texts}: {exc}") from exc
        texts = [line for line in lines if line.strip()]
        if not texts:
            raise InputError(f"{args.texts} has no text lines")
    comparison = HeldoutComparison(manifest, manifest.graph_path(want), texts)
    figures = comparison.figures(manifest.graph_path(got))
    gate = gate_of(manifest.graph(got))
    failures = gate.failures(figures)
    if args.json:
        print(json.dumps({"graph": got, "against": want, **figures, "gate": gate.as_record(), "passed": not failures}))
    else:
        print(f"{manifest.graph(got).file} vs {manifest.graph(want).file} on {figures['texts']} texts:")
        for name, value in figures.items():
            if name != "texts":
                print(f"  {name:28s} {value:.6f}")
        print(f"gate {gate.as_record()}: {'passed' if not failures else 'FAILED: ' + '; '.join(failures)}")
    return 0 if not failures else error_answer(BelowGateError()).exit_code


def _delegate(verb: str, argv: list[str]) -> int:
    if verb == "export":
        from m3rt.export.cli import main as export_main

        return export_main(argv)
    from m3rt.benchmarks.bench import main as bench_main

    return bench_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3rt", description="BGE-M3 inference on an m3rt artifact")
    sub = parser.add_subparsers(dest="command", required=True)
    for verb, what in (("export", "checkpoint -> artifact (m3-export)"), ("bench", "benchmark backends (m3-bench)")):
        # Listed for --help; `main` hands their arguments to m3-export / m3-bench untouched.
        sub.add_parser(verb, help=what, add_help=False)
    enc = sub.add_parser("encode", help="encode texts and summarise the three outputs")
    enc.add_argument("artifact", type=Path)
    enc.add_argument("texts", nargs="+")
    enc.add_argument("--max-length", type=int, default=8192)
    enc.add_argument("--top", type=int, default=8, help="how many top sparse tokens to show")
    enc.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact")
    levels = ("token", "sentence", "passage", "document")
    enc.add_argument("--granularity", nargs="+", choices=levels, help="pieces per level, with character offsets")
    enc.add_argument("--json", action="store_true", help="with --granularity: every output as JSON")
    enc.add_argument(
        "--long-document", choices=("windows", "mcls", "truncate"), default="windows", help="beyond --max-length"
    )
    enc.set_defaults(func=_encode)
    exp = sub.add_parser("explain", help="why a passage matched a query: shared tokens, ColBERT matches, scores")
    exp.add_argument("artifact", type=Path)
    exp.add_argument("query")
    exp.add_argument("passage")
    exp.add_argument("--json", action="store_true")
    exp.add_argument("--top", type=int, default=10, help="how many lexical matches to show")
    exp.add_argument("--no-verify", action="store_true")
    exp.set_defaults(func=_explain)
    ins = sub.add_parser("inspect", help="show and verify an artifact's manifest")
    ins.add_argument("artifact", type=Path)
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--no-verify", action="store_true")
    ins.set_defaults(func=_inspect)
    cmp = sub.add_parser("compare", help="one precision against another on the held-out samples, with the gate")
    cmp.add_argument("artifact", type=Path)
    cmp.add_argument("--precision", default="int8", help="graph to measure (default int8: the one this CPU serves)")
    cmp.add_argument("--against", default="fp32", help="reference graph (default fp32)")
    cmp.add_argument("--texts", type=Path, help="text file, one text per line (default: the built-in held-out samples)")
    cmp.add_argument("--json", action="store_true")
    cmp.add_argument("--no-verify", action="store_true")
    cmp.set_defaults(func=_compare)
    add_serve_parser(sub)  # m3rt.serve.cli: no Ray import until the verb runs
    add_embed_parser(sub)  # m3rt.embed.cli: pyarrow and Ray only once the verb runs
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("export", "bench"):
        return _delegate(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except M3Error as exc:
        print(f"m3rt: error: {exc}", file=sys.stderr)
        return error_answer(exc).exit_code


if __name__ == "__main__":
    sys.exit(main())
