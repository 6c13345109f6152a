"""`m3-bench embed ARTIFACT`: `m3rt embed` over a generated corpus against one in-process `encode` of
the same texts; rows/s, tokens/s and peak RSS of each, and the same job on a two-node local Ray cluster.

Every runner is a fresh process (its peak RSS is its own, from `wait4`); the encode runner times
`encode` alone (and, as a second row, with its model load), `m3rt embed` reports its own seconds
(reading, tokenising, encoding, writing and committing every shard, model load included). The Ray
runner's RSS is the peak sum over every process of the cluster and the command, sampled. Rounds
alternate the runners; each row is its best round, so a shared machine's changing load hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ENCODE_SNIPPET = """
import json, sys, time
from m3rt import M3Model
artifact, corpus, outputs, threads = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
loading = time.perf_counter()
model = M3Model.load(artifact, token_budget=16384, intra_op_threads=int(threads) if threads != "-" else None)
load_seconds = time.perf_counter() - loading
tokens = sum(len(x) for x in model.tokenizer.encode(texts, max_length=model.max_length).ids)
started = time.perf_counter()
model.encode(texts, return_dense="dense" in outputs, return_sparse="sparse" in outputs,
             return_colbert_vecs="colbert" in outputs, sparse_format="csr", show_progress=False)
seconds = time.perf_counter() - started
print(json.dumps({"rows": len(texts), "tokens": tokens, "seconds": seconds, "load_seconds": load_seconds}))
"""


def _write_corpus(artifact: Path, path: Path, rows: int, distribution: str, seed: int) -> None:
    from m3rt.benchmarks.texts import TextFactory
    from m3rt.manifest import load_manifest
    from m3rt.tokenizer import M3Tokenizer

    manifest = load_manifest(artifact, verify=False)
    texts = TextFactory(M3Tokenizer(manifest.tokenizer_path), seed=seed).distribution(distribution, rows)
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"doc-{i}", "text": text}, ensure_ascii=False) + "\n")


def _run_child(command: list[str]) -> tuple[str, int]:
    """(stdout, peak RSS in bytes) of a child process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode not in (0, 3):
            raise RuntimeError(f"{command[:4]} failed ({proc.returncode}): {err.read().decode()[-3000:]}")
        return out.read().decode(), usage.ru_maxrss * 1024


def _encode_round(args: argparse.Namespace, corpus: Path) -> dict[str, Any]:
    threads = str(args.threads) if args.threads else "-"
    command = [sys.executable, "-c", ENCODE_SNIPPET, str(args.artifact), str(corpus), ",".join(args.outputs), threads]
    stdout, rss = _run_child(command)
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "peak_rss": rss}


def _embed_command(args: argparse.Namespace, corpus: Path, output: Path, summary: Path) -> list[str]:
    command = [
        sys.executable, "-m", "m3rt.cli", "embed", str(args.artifact), str(corpus), str(output),
        "--id-field", "id", "--outputs", *args.outputs, "--shard-rows", str(args.shard_rows),
        "--no-progress", "--summary-json", str(summary),
    ]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    return command


def _embed_round(args: argparse.Namespace, corpus: Path, work: Path, name: str) -> dict[str, Any]:
    output, summary = work / name, work / f"{name}.json"
    _, rss = _run_child(_embed_command(args, corpus, output, summary))
    data = json.loads(summary.read_text())
    return {"rows": data["rows"], "tokens": data["tokens"], "seconds": data["seconds"], "peak_rss": rss}


class _RssSampler:
    """Peak of the summed RSS of this process's descendants (a local Ray cluster and a command)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = self._psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in me.children(recursive=True):
                try:
                    total += proc.memory_info().rss
                except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _ray_round(args: argparse.Namespace, corpus: Path, work: Path, name: str, address: str) -> dict[str, Any]:
    output, summary = work / name, work / f"{name}.json"
    command = _embed_command(args, corpus, output, summary)
    command += ["--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1"]
    with _RssSampler() as sampler:
        _run_child(command)
    data = json.loads(summary.read_text())
    per_node: dict[str, int] = data["rows_per_node"]
    return {
        "rows": data["rows"],
        "tokens": data["tokens"],
        "seconds": data["seconds"],
        "peak_rss": sampler.peak,
        "nodes": len(per_node),
    }


def _start_cluster(nodes: int):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.cluster_utils import Cluster

    from m3rt.ray_loopback import keep_ray_on_loopback

    keep_ray_on_loopback()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"node_ip_address": "127.0.0.1", "num_cpus": 1, "include_dashboard": False},
    )
    for _ in range(nodes - 1):
        cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1)
    cluster.wait_for_nodes()
    ray.shutdown()
    return cluster


def _best(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    best = max(rounds, key=lambda r: r["rows"] / r["seconds"])
    return {
        **best,
        "rows_per_s": best["rows"] / best["seconds"],
        "tokens_per_s": best["tokens"] / best["seconds"],
        "peak_rss_mib": best["peak_rss"] / 2**20,
        "rounds_rows_per_s": [round(r["rows"] / r["seconds"], 2) for r in rounds],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m3-bench embed", description=__doc__)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--distribution", default="passages", help="queries, short-passages, passages, long")
    parser.add_argument("--outputs", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse", "colbert"])
    parser.add_argument("--shard-rows", type=int, default=500)
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads (default: ONNX Runtime's)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ray-nodes", type=int, default=0, help="also on a local Ray cluster of N one-CPU nodes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="m3rt-embed-bench-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus.jsonl"
        _write_corpus(args.artifact, corpus, args.rows, args.distribution, args.seed)
        cluster = _start_cluster(args.ray_nodes) if args.ray_nodes else None
        rounds: dict[str, list[dict[str, Any]]] = {"encode": [], "embed": [], "ray": []}
        try:
            for k in range(args.rounds):
                rounds["encode"].append(_encode_round(args, corpus))
                rounds["embed"].append(_embed_round(args, corpus, work, f"embed-{k}"))
                if cluster is not None:
                    rounds["ray"].append(_ray_round(args, corpus, work, f"ray-{k}", cluster.address))
        finally:
            if cluster is not None:
                cluster.shutdown()
    # The same encode with its model load counted, as `m3rt embed`'s own seconds count it.
    rounds["encode+load"] = [{**r, "seconds": r["seconds"] + r["load_seconds"]} for r in rounds["encode"]]
    results = {name: _best(r) for name, r in rounds.items() if r}
    baseline = results["encode"]["rows_per_s"]
    with_load = results["encode+load"]["rows_per_s"]
    print(f"{args.rows} rows ({args.distribution}), outputs {' '.join(args.outputs)}, best of {args.rounds}")
    print("| runner | rows/s | tokens/s | vs one encode | vs one encode + load | peak RSS |")
    print("|---|---|---|---|---|---|")
    labels = {
        "encode": "one in-process `encode`",
        "encode+load": "one in-process `encode`, model load counted",
        "embed": "`m3rt embed` (embedded)",
        "ray": f"`m3rt embed --address` ({args.ray_nodes}-node local Ray)",
    }
    for name, r in results.items():
        print(
            f"| {labels[name]} | {r['rows_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['rows_per_s'] / baseline:.2f}x | {r['rows_per_s'] / with_load:.2f}x | {r['peak_rss_mib']:,.0f} MiB |"
        )
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
