"""`m3-bench serve ARTIFACT`: `m3rt serve` against in-process `encode`, the same requests from the
same number of concurrent clients; throughput and per-request latency (p50 / p99).

Three rows: in-process `encode` called by N client threads (like for like: no batching across
requests), one in-process `encode` of every text (the offline batch ceiling), and the server (HTTP,
JSON, Ray Serve's batching across requests). The server is a `m3rt serve` subprocess on 127.0.0.1,
running while the in-process rows are measured (idle then); the rounds alternate the three runners
and each row is its best round, so that a shared machine's changing load hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from m3rt.benchmarks.texts import DISTRIBUTIONS, TextFactory
from m3rt.tokenizer import M3Tokenizer


def _requests(args: argparse.Namespace) -> list[list[str]]:
    from m3rt.manifest import load_manifest

    manifest = load_manifest(args.artifact, verify=False)
    factory = TextFactory(M3Tokenizer(manifest.tokenizer_path), seed=args.seed)
    texts = factory.distribution(args.distribution, args.requests * args.texts_per_request)
    k = args.texts_per_request
    return [texts[i : i + k] for i in range(0, len(texts), k)]


def _drive(call: Callable[[list[str]], Any], requests: list[list[str]], clients: int) -> dict[str, float]:
    """Every request through `call` from `clients` threads; wall-clock throughput and latencies."""
    latencies = np.zeros(len(requests))

    def one(index: int) -> None:
        started = time.perf_counter()
        call(requests[index])
        latencies[index] = time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(len(requests))))
    wall = time.perf_counter() - started
    texts = sum(len(r) for r in requests)
    return {
        "seconds": wall,
        "texts_per_s": texts / wall,
        "requests_per_s": len(requests) / wall,
        "p50_ms": float(np.percentile(latencies, 50) * 1000),
        "p99_ms": float(np.percentile(latencies, 99) * 1000),
    }


def _outputs(args: argparse.Namespace) -> dict[str, bool]:
    return {"return_dense": True, "return_sparse": True, "return_colbert_vecs": args.colbert}


def _best(rows: list[dict[str, float]]) -> dict[str, float]:
    return max(rows, key=lambda row: row["texts_per_s"])


@contextmanager
def _server(args: argparse.Namespace) -> Iterator[tuple[Callable[[list[str]], None], str]]:
    """A `m3rt serve` subprocess, ready: (a thread-safe client call, its URL). Stopped with SIGINT."""
    import requests as http

    from m3rt.serve.process import serving

    options = [
        "--no-verify", "--precision", args.precision, "--num-cpus", str(os.cpu_count() or 1),
        "--batch-wait-ms", str(args.batch_wait_ms), "--max-ongoing", str(max(64, 2 * args.clients)),
    ]  # fmt: skip
    if args.threads:
        options += ["--threads", str(args.threads)]
    if args.no_access_log:
        options.append("--no-access-log")
    local = threading.local()
    body = {"return_dense": True, "return_sparse": True, "return_colbert": args.colbert, "encoding_format": "base64"}
    with serving(args.artifact, args.out / "server.log", options, ready_s=300) as (_, url):

        def call(texts: list[str]) -> None:
            session = getattr(local, "session", None) or http.Session()
            local.session = session
            response = session.post(f"{url}/v1/encode", json={"input": texts, **body}, timeout=600)
            if response.status_code != 200:
                raise RuntimeError(f"server answered {response.status_code}: {response.text[:300]}")
            response.json()

        yield call, url


def _measure(args: argparse.Namespace, requests: list[list[str]]) -> tuple[dict, dict, dict]:
    """Best of `args.rounds` rounds of each runner, the rounds interleaved so that a change in the
    machine's load affects every runner alike."""
    import requests as http

    from m3rt.model import M3Model

    outputs = _outputs(args)
    everything = [t for r in requests for t in r]
    with _server(args) as (call, url):
        model = M3Model.load(args.artifact, precision=args.precision, verify=False, intra_op_threads=args.threads)
        try:
            # Once alone first: numpy imports submodules lazily, and a first use from many threads at
            # once can recurse (numpy.ma via np.unique in 2.x).
            model.encode(requests[0], **outputs)
            local = lambda texts: model.encode(texts, **outputs)  # noqa: E731
            _drive(local, requests[: args.clients], args.clients)  # warm-up
            _drive(call, requests[: args.clients], args.clients)
            clients, one_call, server = [], [], []
            for _ in range(args.rounds):
                clients.append(_drive(local, requests, args.clients))
                started = time.perf_counter()
                model.encode(everything, **outputs)
                wall = time.perf_counter() - started
                one_call.append({"seconds": wall, "texts_per_s": len(everything) / wall})
                before = http.get(f"{url}/metrics", timeout=10).text
                row = _drive(call, requests, args.clients)
                row.update(_batching(before, http.get(f"{url}/metrics", timeout=10).text))
                server.append(row)
        finally:
            model.close()
    return _best(clients), _best(one_call), _best(server)


def _batching(before: str, after: str) -> dict[str, float]:
    """Batches and requests per batch between two /metrics scrapes: the counters are cumulative
    (warm-up and earlier rounds included), and a row's figures must be those of its own round."""
    batches = _metric(after, "m3rt_batch_requests_count") - _metric(before, "m3rt_batch_requests_count")
    requests = _metric(after, "m3rt_batch_requests_sum") - _metric(before, "m3rt_batch_requests_sum")
    return {"batches": batches, "requests_per_batch": requests / max(batches, 1)}


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from m3rt.benchmarks.machine import machine_description

    args.out.mkdir(parents=True, exist_ok=True)
    requests = _requests(args)
    clients, batch, server = _measure(args, requests)
    import ray

    return {
        "machine": machine_description(),
        "ray": ray.__version__,
        "artifact": str(args.artifact),
        "precision": args.precision,
        "distribution": args.distribution,
        "requests": len(requests),
        "texts_per_request": args.texts_per_request,
        "clients": args.clients,
        "rounds": args.rounds,
        "access_log": not args.no_access_log,
        "colbert": args.colbert,
        "in_process_clients": clients,
        "in_process_one_call": batch,
        "server": server,
        "server_vs_in_process_clients": server["texts_per_s"] / clients["texts_per_s"],
        "server_vs_one_call": server["texts_per_s"] / batch["texts_per_s"],
    }


def markdown(report: dict[str, Any]) -> str:
    clients = report["clients"]
    rows = [
        (f"in-process `encode`, {clients} client threads", report["in_process_clients"]),
        ("in-process `encode`, one call of every text", report["in_process_one_call"]),
        (f"`m3rt serve` (HTTP, 1 replica), {clients} clients", report["server"]),
    ]
    base = report["in_process_clients"]["texts_per_s"]
    lines = [
        f"| runner ({report['requests']} requests x {report['texts_per_request']} {report['distribution']} texts, "
        f"{report['precision']}) | texts/s (vs {clients} threads) | p50 / p99 ms |",
        "|---|---|---|",
    ]
    for name, row in rows:
        latency = f"{row['p50_ms']:.1f} / {row['p99_ms']:.1f}" if "p50_ms" in row else "-"
        lines.append(f"| {name} | {row['texts_per_s']:.1f} ({row['texts_per_s'] / base:.2f}x) | {latency} |")
    server = report["server"]
    lines.append("")
    lines.append(f"server batches: {server['batches']:.0f}, {server['requests_per_batch']:.2f} requests per batch")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m3-bench serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--distribution", default="queries", choices=sorted(DISTRIBUTIONS))
    parser.add_argument("--colbert", action="store_true", help="ask for ColBERT vectors too (dense + sparse always)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (both sides)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--no-access-log", action="store_true", help="the server logs no line per request")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each runner")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", "--out", "-o", dest="out", type=Path, default=Path("bench-serve"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run(args)
    (args.out / "serve.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = markdown(report)
    (args.out / "serve.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"wrote {args.out / 'serve.json'}, {args.out / 'serve.md'}")
    return 0
