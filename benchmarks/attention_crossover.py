"""Plain or flash attention per padded length: where the flash-attention graph starts to pay.

    python -m m3rt.benchmarks.attention_crossover ARTIFACT [--precision int8] [--tokens 4096] [--baseline]

Loads `M3Model.load(ARTIFACT, precision=...)` (the ONNX Runtime CPU backend with both graphs, sharing
their weights) and times `backend.run` on batches of about `--tokens` padded tokens at each length,
forcing the plain and the flash graph in turn (interleaved, best of `--repeats`; wall and process CPU
seconds, the crossover by CPU time). `--baseline` then
times the plain graph alone in its own session (ONNX Runtime's prepacked weights, which two sessions
sharing weights go without). Prints one JSON line per cell and a summary line with the crossover: the
least length from which the flash graph is at least as fast at every longer length measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np

from m3rt.manifest import OUTPUT_NAMES

ALWAYS_PLAIN = 1 << 30


def _batch(rows: int, length: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, size=(rows, length), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 0, 2  # <s> ... </s>
    return ids, np.ones_like(ids)


def _best(run, ids: np.ndarray, mask: np.ndarray, repeats: int) -> tuple[float, float]:
    """Least wall and least process CPU seconds of `repeats` runs. On a shared machine the CPU time
    (all of this process's threads) is the steadier figure: others' load stretches wall time."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run(ids, mask, OUTPUT_NAMES)
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def crossover(cells: list[dict]) -> int | None:
    """The least length from which flash takes no more CPU time at every longer measured length."""
    found = None
    for cell in sorted(cells, key=lambda c: c["length"], reverse=True):
        if cell["flash_cpu_s"] > cell["plain_cpu_s"]:
            break
        found = cell["length"]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m3rt.benchmarks.attention_crossover", description=__doc__)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--tokens", type=int, default=4096, help="padded tokens per batch")
    parser.add_argument("--lengths", default="128,256,512,1024,2048")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline", action="store_true", help="also the plain graph in its own prepacked session")
    args = parser.parse_args(argv)

    from m3rt import M3Model

    model = M3Model.load(args.artifact, precision=args.precision, verify=False)
    backend = model.backend
    if getattr(backend, "long_graph_path", None) is None:
        parser.error(f"{args.artifact} has no flash-attention graph for {args.precision}")
    vocab = model.manifest.model.vocab_size
    lengths = [int(x) for x in args.lengths.split(",")]
    shapes = [(max(1, args.tokens // length), length) for length in lengths] + [(1, 32)]
    cells = []
    for rows, length in shapes:
        ids, mask = _batch(rows, length, vocab, seed=length)
        repeats = args.repeats if rows > 1 else 10 * args.repeats
        plain = flash = (float("inf"), float("inf"))
        for _ in range(repeats if rows > 1 else 1):
            backend.flash_from_tokens = ALWAYS_PLAIN
            plain = min(plain, _best(backend.run, ids, mask, 1 if rows > 1 else repeats), key=lambda t: t[1])
            backend.flash_from_tokens = 2
            flash = min(flash, _best(backend.run, ids, mask, 1 if rows > 1 else repeats), key=lambda t: t[1])
        cell = {
            "rows": rows,
            "length": length,
            "plain_s": plain[0],
            "flash_s": flash[0],
            "plain_cpu_s": plain[1],
            "flash_cpu_s": flash[1],
            "flash_over_plain_cpu": flash[1] / plain[1],
        }
        cells.append(cell)
        print(json.dumps({"precision": args.precision, **cell}), flush=True)
    summary: dict[str, object] = {"precision": args.precision, "crossover": crossover(cells[:-1])}
    if args.baseline:
        from m3rt.backends.onnxruntime import OnnxRuntimeBackend

        plain_path = backend.graph_path
        del model, backend
        gc.collect()
        alone = OnnxRuntimeBackend(plain_path)
        for cell in cells:
            ids, mask = _batch(cell["rows"], cell["length"], vocab, seed=cell["length"])
            repeats = args.repeats if cell["rows"] > 1 else 10 * args.repeats
            cell["plain_prepacked_s"], cell["plain_prepacked_cpu_s"] = _best(alone.run, ids, mask, repeats)
            cell["shared_over_prepacked_cpu"] = cell["plain_cpu_s"] / cell["plain_prepacked_cpu_s"]
            print(json.dumps({"precision": args.precision, "baseline": True, **cell}), flush=True)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
