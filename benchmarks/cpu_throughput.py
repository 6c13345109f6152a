"""End-to-end CPU throughput of m3rt (all three outputs), optionally beside FlagEmbedding.

    python benchmarks/cpu_throughput.py ARTIFACT [--checkpoint CKPT] [--corpus FILE]

`--precisions fp32,int8` times each graph of the artifact and reports the later ones' fidelity
against the first. Texts: the corpus file's lines (default: the built-in sample passages of >= 40 tokens, repeated to
`--texts`), encoded in batches of `--batch-size` sorted by length, as FlagEmbedding does. Tokens/s
counts real (unpadded) tokens, tokenisation and post-processing included. Both runs happen in one
process, one after the other: on a noisy machine the ratio is what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from m3rt import M3Model
from m3rt.fidelity import compare_outputs

ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)


def load_texts(model: M3Model, corpus: Path | None, count: int) -> list[str]:
    if corpus:
        texts = [line.strip() for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from m3rt.export.samples import sample_texts

        texts = [t for t in sample_texts() if len(model.tokenizer.encode([t], max_length=8192).ids[0]) >= 40]
    return (texts * (count // len(texts) + 1))[:count]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: session initialisation, allocator growth
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--checkpoint", type=Path, help="source checkpoint: also run FlagEmbedding (fp32, CPU)")
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--texts", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", default="fp32", help="comma-separated graphs of the artifact to time")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    models = {p: M3Model.load(args.artifact, precision=p, verify=False) for p in precisions}
    model = models[precisions[0]]
    texts = load_texts(model, args.corpus, args.texts)
    tokens = int(sum(len(x) for x in model.tokenizer.encode(texts, max_length=8192).ids))
    rows = []
    fidelity = {}
    reference_out = None
    for precision, candidate in models.items():
        seconds = timed(lambda m=candidate: m.encode(texts, batch_size=args.batch_size, **ALL), args.repeats)
        rows.append((f"m3rt, ONNX Runtime CPU, {precision}", seconds))
        out = candidate.encode(texts, batch_size=args.batch_size, **ALL)
        if reference_out is None:
            reference_out = out
        else:
            fidelity[precision] = compare_outputs(out, reference_out)
    if args.checkpoint:
        from FlagEmbedding import BGEM3FlagModel

        reference = BGEM3FlagModel(str(args.checkpoint), use_fp16=False, devices="cpu")
        seconds = timed(
            lambda: reference.encode(texts, batch_size=args.batch_size, max_length=8192, **ALL), args.repeats
        )
        rows.insert(0, ("FlagEmbedding, PyTorch CPU, fp32", seconds))

    base = rows[0][1]
    print(
        f"{len(texts)} texts, {tokens} tokens (avg {tokens / len(texts):.0f}), batch {args.batch_size}, "
        f"best of {args.repeats}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print("| runner | seconds | tokens/s | vs first row |")
    print("|---|---|---|---|")
    for name, secs in rows:
        print(f"| {name} | {secs:.2f} | {tokens / secs:,.0f} | {base / secs:.2f}x |")
    for precision, figures in fidelity.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in figures.items() if k != "texts")
        print(f"{precision} vs {precisions[0]}: {shown}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "texts": len(texts),
                    "tokens": tokens,
                    "batch_size": args.batch_size,
                    "results": [{"runner": n, "seconds": s, "tokens_per_s": tokens / s} for n, s in rows],
                    "fidelity": fidelity,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
