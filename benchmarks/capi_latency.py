"""Batch-1 end-to-end latency: the C library's example program (`m3rt_encode --repeat`) against the
Python runtime (`M3Model.encode`), same artifact, same texts, all three outputs, in one run.

    python -m m3rt.benchmarks.capi_latency ARTIFACT [ARTIFACT...] --build-dir BUILD [--repeats 200]

BUILD is a CMake build of runtime/capi (it holds m3rt_encode). Both sides use ONNX Runtime's default
thread count and the onnxruntime wheel's library; the C side loads that library at run time.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import time
from pathlib import Path

from m3rt.export.samples import sample_texts

_LATENCY = re.compile(r"median ([0-9.]+) ms")


def _texts() -> dict[str, str]:
    samples = sample_texts()
    return {
        "short query": "how do multilingual embeddings help cross-lingual retrieval?",
        "passage": max(samples, key=len),
        "long passage": " ".join(samples)[:6000],
    }


def _python_ms(model, text: str, repeats: int) -> float:
    kwargs = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
    for _ in range(3):
        model.encode([text], **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.encode([text], **kwargs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _capi_ms(binary: Path, artifact: Path, text: str, repeats: int, onnxruntime: Path) -> float:
    # The artifact's hashes were verified when the Python side loaded it.
    run = subprocess.run(
        [str(binary), str(artifact), "--repeat", str(repeats), "--onnxruntime", str(onnxruntime), "--no-verify"],
        input=text + "\n", capture_output=True, text=True, check=True,
    )
    return float(_LATENCY.search(run.stderr).group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--build-dir", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=200, help="calls per side and text, over --rounds rounds")
    parser.add_argument("--rounds", type=int, default=4, help="alternations of the two sides (a shared machine drifts)")
    parser.add_argument("--texts", default="short query,passage,long passage", help="which texts, comma-separated")
    args = parser.parse_args(argv)
    import onnxruntime

    onnxruntime_lib = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so.1*"))[-1]
    binary = args.build_dir / "m3rt_encode"
    print("| artifact | text | tokens | Python M3Model.encode p50 | C m3rt_encode p50 | C / Python |")
    print("|---|---|---|---|---|---|")
    from m3rt import M3Model

    per_round = max(1, args.repeats // args.rounds)
    for artifact in args.artifacts:
        model = M3Model.load(artifact)
        chosen = args.texts.split(",")
        for name, text in ((n, t) for n, t in _texts().items() if n in chosen):
            tokens = len(model.tokenizer.encode([text], max_length=8192).ids[0])
            # Alternate the sides; the median of each side's round medians.
            py_rounds, c_rounds = [], []
            for _ in range(args.rounds):
                py_rounds.append(_python_ms(model, text, per_round))
                c_rounds.append(_capi_ms(binary, artifact, text, per_round, onnxruntime_lib))
            py, c = statistics.median(py_rounds), statistics.median(c_rounds)
            print(f"| {artifact.name} | {name} | {tokens} | {py:.3f} ms | {c:.3f} ms | {c / py:.2f} |", flush=True)
        model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
