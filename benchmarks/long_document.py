"""One ~8192-token text, all three outputs, one runner per process: time and (with /usr/bin/time -v) peak RSS.

    /usr/bin/time -v python -m m3rt.benchmarks.long_document flash ARTIFACT [--mcls]
    /usr/bin/time -v python -m m3rt.benchmarks.long_document plain ARTIFACT
    /usr/bin/time -v python -m m3rt.benchmarks.long_document flagembedding ARTIFACT --checkpoint CKPT
    /usr/bin/time -v python -m m3rt.benchmarks.long_document openvino-bf16 ARTIFACT

`flash`: `M3Model.load(ARTIFACT)` (long batches run on the flash-attention graph when the artifact
has one); `plain`: the artifact's `model.onnx` alone (unfused attention); `flagembedding`:
FlagEmbedding's BGEM3FlagModel fp32 on the checkpoint the artifact was exported from;
`openvino-fp32` / `openvino-bf16`: `model.onnx` through OpenVINO (`backend="openvino"`). `--out DIR`
saves the outputs for comparing runners. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)


def _text(artifact: Path, tokens: int) -> tuple[str, int]:
    from m3rt.benchmarks.texts import TextFactory
    from m3rt.tokenizer import M3Tokenizer

    tokenizer = M3Tokenizer(artifact / "tokenizer.json")
    text = TextFactory(tokenizer, seed=0).at_least(tokens)
    return text, len(tokenizer.encode([text], max_length=tokens).ids[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m3rt.benchmarks.long_document", description=__doc__)
    parser.add_argument("runner", choices=("flash", "plain", "flagembedding", "openvino-fp32", "openvino-bf16"))
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--checkpoint", type=Path, help="the source checkpoint (flagembedding)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--mcls", action="store_true", help="flash: then also the document level with MCLS")
    parser.add_argument("--out", type=Path, help="save dense, ColBERT and lexical outputs here")
    parser.add_argument(
        "--long-session-arena", action="store_true", help="flash: keep ONNX Runtime's memory arena on its session"
    )
    args = parser.parse_args(argv)

    text, tokens = _text(args.artifact, args.tokens)
    report: dict[str, object] = {"runner": args.runner, "tokens": tokens}
    if args.runner == "flagembedding":
        from FlagEmbedding import BGEM3FlagModel

        if args.checkpoint is None:
            parser.error("flagembedding needs --checkpoint")
        reference = BGEM3FlagModel(str(args.checkpoint), use_fp16=False, devices="cpu")
        start = time.perf_counter()
        result = reference.encode([text], batch_size=1, max_length=args.tokens, **ALL)
        report["seconds"] = time.perf_counter() - start
    else:
        from m3rt import M3Model

        if args.runner.startswith("openvino-"):
            precision = args.runner.split("-", 1)[1]
            model = M3Model.load(args.artifact, verify=False, backend="openvino", precision=precision)
        else:
            options = {"long_session_arena": True} if args.long_session_arena else None
            model = M3Model.load(args.artifact, verify=False, backend_options=options)
        if args.runner == "plain":
            from m3rt.backends.onnxruntime import OnnxRuntimeBackend

            model = M3Model(model.manifest, OnnxRuntimeBackend(args.artifact / "model.onnx"), model.tokenizer)
        start = time.perf_counter()
        result = model.encode([text], max_length=args.tokens, **ALL)
        report["seconds"] = time.perf_counter() - start
        served = getattr(model.backend, "batches", None)
        report["graph"] = next(iter(served)) if served else Path(str(model.backend.graph_path)).name
        if args.mcls:
            options = {"long_document": "mcls"}
            start = time.perf_counter()
            doc = model.encode(text, granularity="document", granularity_options=options, **ALL)["document"]
            report["mcls_seconds"] = time.perf_counter() - start
            report["mcls_cosine_to_cls"] = float(doc["dense_vecs"][0] @ result["dense_vecs"][0])
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        np.save(args.out / f"{args.runner}_dense.npy", np.asarray(result["dense_vecs"], dtype=np.float32))
        np.save(args.out / f"{args.runner}_colbert.npy", np.asarray(result["colbert_vecs"][0], dtype=np.float32))
        lexical = {k: float(v) for k, v in result["lexical_weights"][0].items()}
        (args.out / f"{args.runner}_lexical.json").write_text(json.dumps(lexical))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
