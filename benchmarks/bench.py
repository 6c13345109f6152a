"""`m3-bench ARTIFACT_DIR`: latency and throughput of every backend present, side by side with the
PyTorch reference, with fidelity and peak memory; writes JSON, a markdown table and a PNG plot.

`m3-bench ARTIFACT_DIR --scenarios latency,documents,...` runs the serving scenarios instead
(`m3rt.benchmarks.scenarios`: the served model, on `--device`, beside the PyTorch reference).

These machines are noisy: compare the ratios printed for one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from m3rt.benchmarks.machine import machine_description
from m3rt.benchmarks.runners import m3rt_runners, reference_runner, reference_unavailable
from m3rt.benchmarks.scenarios import SCENARIOS, load_setup, run_scenarios, summary_rows, table
from m3rt.benchmarks.texts import DEFAULT_DISTRIBUTIONS, DISTRIBUTIONS, TextFactory
from m3rt.fidelity import compare_outputs
from m3rt.manifest import load_manifest
from m3rt.scheduler import pad_batch
from m3rt.tokenizer import M3Tokenizer

# FLOPs per token of BGE-M3's encoder at real length S (d = 1024, 24 layers):
# F(S) = 24 * (24 d^2 + 4 S d), d = 1024.
H100_FP16_PEAK = 780e12  # measured dense fp16 matmul (8192^3, torch) on an H100 80GB


def flops_per_token(length: float, hidden: int = 1024, layers: int = 24) -> float:
    return layers * (24 * hidden**2 + 4 * length * hidden)


class PeakRSS:
    """Samples this process's resident set size while a phase runs (host memory peak)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def current() -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self) -> PeakRSS:
        self.peak = self.current()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def _repeat(fn, warmup: int, repeats: int, max_seconds: float) -> list[float]:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    budget_start = time.perf_counter()
    while len(times) < repeats and (len(times) < 1 or time.perf_counter() - budget_start < max_seconds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _percentiles(times: list[float]) -> dict[str, float]:
    ms = np.array(times) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "n": len(times),
    }




def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    manifest = load_manifest(args.artifact, verify=False)
    tokenizer = M3Tokenizer(manifest.tokenizer_path)
    factory = TextFactory(tokenizer, seed=args.seed)
    runners, notes = m3rt_runners(args.artifact, args.batch_size, args.token_budget)
    checkpoint = checkpoint_for(args.artifact, args.checkpoint)
    if args.no_reference:
        notes.append("PyTorch reference: skipped (--no-reference)")
    else:
        device = "cuda" if any(" cuda " in name for name, _ in runners) else "cpu"
        if note := reference_unavailable(checkpoint):
            notes.append(note)
        else:
            runners.insert(
                0, ("reference", partial(reference_runner, checkpoint, args.artifact, args.batch_size, device))
            )

    lengths = [min(n, manifest.max_length) for n in args.lengths]
    workloads = {name: factory.distribution(name, args.texts) for name in args.distributions}
    if args.corpus:
        lines = [x for x in Path(args.corpus).read_text(encoding="utf-8").splitlines() if x.strip()]
        workloads = {Path(args.corpus).name: lines}
    fidelity_texts = factory.distribution("passages", min(args.texts, 32))
    hidden = manifest.hidden_size
    layers = manifest.model.num_hidden_layers

    results: list[dict[str, Any]] = []
    total = len(runners) * (2 * len(lengths) + len(workloads) + 1)
    with tqdm(total=total, desc="m3-bench", unit="cell") as progress:
        for _, build in runners:
            runner = build()
            entry: dict[str, Any] = {
                "runner": runner.name,
                "device": runner.device,
                "precision": runner.precision,
                "reference": runner.is_reference,
                "latency": {},
                "throughput": {},
            }
            with PeakRSS() as rss:
                for length in lengths:
                    progress.set_postfix_str(f"{runner.name}: latency {length}")
                    text = factory.at_least(length)
                    e2e = _repeat(
                        lambda t=text, n=length, r=runner: r.encode([t], n), args.warmup, args.repeats, args.max_seconds
                    )
                    progress.update()
                    ids = tokenizer.encode([text], max_length=length).ids
                    batch = pad_batch(ids, np.arange(1), pad_id=manifest.special_tokens["pad"])
                    model_only = _repeat(
                        lambda b=batch, r=runner: r.forward(b.input_ids, b.attention_mask),
                        args.warmup,
                        args.repeats,
                        args.max_seconds,
                    )
                    progress.update()
                    entry["latency"][str(length)] = {
                        "end_to_end": _percentiles(e2e),
                        "model_only": _percentiles(model_only),
                    }
                for name, texts in workloads.items():
                    progress.set_postfix_str(f"{runner.name}: throughput {name}")
                    token_lengths = np.array([len(x) for x in tokenizer.encode(texts, manifest.max_length).ids])
                    runner.encode(texts[: max(1, len(texts) // 8)], manifest.max_length)  # warm-up
                    seconds = min(
                        _repeat(
                            lambda t=texts, r=runner: r.encode(t, manifest.max_length),
                            0,
                            args.throughput_runs,
                            args.max_seconds,
                        )
                    )
                    real = int(token_lengths.sum())
                    padded = runner.padded_tokens(token_lengths)
                    cell = {
                        "texts": len(texts),
                        "tokens": real,
                        "seconds": seconds,
                        "texts_per_s": len(texts) / seconds,
                        "tokens_per_s": real / seconds,
                        "padding_ratio": padded / real - 1.0,
                    }
                    if runner.device == "cuda":
                        useful = float(sum(n * flops_per_token(n, hidden, layers) for n in token_lengths))
                        cell["mfu"] = useful / seconds / H100_FP16_PEAK
                    entry["throughput"][name] = cell
                    progress.update()
                progress.set_postfix_str(f"{runner.name}: fidelity")
                entry["_outputs"] = runner.encode(fidelity_texts, 512)
                progress.update()
            entry["peak_rss_bytes"] = rss.peak
            entry["peak_device_bytes"] = runner.device_peak_bytes()
            results.append(entry)
            del runner  # its session and buffers: the next runner's peak RSS is its own
            gc.collect()

    baseline = next((r for r in results if r["precision"] == "fp32" and not r["reference"]), results[0])
    for entry in results:
        if entry is not baseline:
            entry["fidelity_vs_fp32"] = compare_outputs(entry["_outputs"], baseline["_outputs"])
    for entry in results:
        entry.pop("_outputs")
    anchor = next((r for r in results if r["reference"]), baseline)
    for entry in results:
        entry["ratios_vs"] = anchor["runner"]
        entry["latency_speedup"] = {
            n: anchor["latency"][n]["end_to_end"]["p50_ms"] / entry["latency"][n]["end_to_end"]["p50_ms"]
            for n in entry["latency"]
        }
        entry["throughput_speedup"] = {
            n: entry["throughput"][n]["tokens_per_s"] / anchor["throughput"][n]["tokens_per_s"]
            for n in entry["throughput"]
        }
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["m3-bench", *sys.argv[1:]]),
        "artifact": str(args.artifact),
        "model": vars(manifest.model),
        "machine": machine_description(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "notes": notes,
        "results": results,
    }


def markdown(report: dict[str, Any]) -> str:
    int8 = report["machine"].get("int8_kernel")
    lines = [
        f"m3-bench {report['created']} on {report['machine']['cpu']} ({report['machine']['cores']} cores)"
        + (f", GPU {report['machine']['gpu']}" if report["machine"]["gpu"] else "")
        + (f"; int8 kernel {int8['kernel']}" if int8 else ""),
        "",
    ]
    results = report["results"]
    lengths = list(results[0]["latency"])
    lines += ["Latency, batch 1, p50 ms (end to end / model only); ratio = speedup vs " + results[0]["ratios_vs"], ""]
    lines += ["| runner | " + " | ".join(f"{n} tok" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for r in results:
        cells = [
            f"{r['latency'][n]['end_to_end']['p50_ms']:.1f} / {r['latency'][n]['model_only']['p50_ms']:.1f} "
            f"({r['latency_speedup'][n]:.2f}x)"
            for n in lengths
        ]
        lines.append(f"| {r['runner']} | " + " | ".join(cells) + " |")
    workloads = list(results[0]["throughput"])
    lines += ["", "Throughput, all three outputs, tokens/s (ratio; padding)", ""]
    lines += [
        "| runner | " + " | ".join(workloads) + " | peak RSS | fidelity vs fp32 (dense min / ColBERT mean / top-10) |",
        "|---" * (len(workloads) + 3) + "|",
    ]
    for r in results:
        cells = [
            f"{r['throughput'][w]['tokens_per_s']:,.0f} ({r['throughput_speedup'][w]:.2f}x; "
            f"{100 * r['throughput'][w]['padding_ratio']:.0f}%)"
            for w in workloads
        ]
        fid = r.get("fidelity_vs_fp32")
        fid_text = (
            f"{fid['dense_cos_min']:.4f} / {fid['colbert_cos_mean']:.4f} / {fid['sparse_top10_overlap']:.3f}"
            if fid
            else "baseline"
        )
        lines.append(
            f"| {r['runner']} | " + " | ".join(cells) + f" | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {fid_text} |"
        )
    if report["notes"]:
        lines += [""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        lengths = [int(n) for n in r["latency"]]
        left.plot(
            lengths, [r["latency"][str(n)]["end_to_end"]["p50_ms"] for n in lengths], marker="o", label=r["runner"]
        )
    left.set(
        xscale="log",
        yscale="log",
        xlabel="tokens (batch 1)",
        ylabel="p50 latency, ms (end to end)",
        title="Latency vs length",
    )
    left.legend(fontsize=8)
    workloads = list(results[0]["throughput"])
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        xs = np.arange(len(workloads)) + i * width
        right.bar(xs, [r["throughput"][w]["tokens_per_s"] for w in workloads], width, label=r["runner"])
    right.set_xticks(np.arange(len(workloads)) + 0.4 - width / 2, workloads)
    right.set(ylabel="tokens/s (all three outputs)", title="Throughput")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m3-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ints = lambda v: [int(x) for x in v.split(",") if x.strip()]  # noqa: E731
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--lengths", type=ints, default=[16, 64, 256, 1024, 8192], help="batch-1 latency lengths")
    parser.add_argument(
        "--distributions",
        type=lambda v: v.split(","),
        default=DEFAULT_DISTRIBUTIONS,
        help=f"generated workloads among {', '.join(DISTRIBUTIONS)}",
    )
    parser.add_argument("--corpus", type=Path, help="a file of lines to use instead of generated workloads")
    parser.add_argument("--texts", type=int, default=64, help="texts per generated workload")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--token-budget", type=int, default=8192, help="padded tokens per m3rt batch (the runtime default)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="latency samples per cell (at most)")
    parser.add_argument("--throughput-runs", type=int, default=2, help="best of this many runs")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="time cap per cell")
    parser.add_argument("--checkpoint", type=Path, help="source checkpoint for the PyTorch reference")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", "--out", "-o", dest="out", type=Path, default=Path("bench-results"))
    parser.add_argument(
        "--scenarios",
        type=lambda v: list(SCENARIOS) if v == "all" else v.split(","),
        help=f"run these serving scenarios instead ('all' or some of {', '.join(SCENARIOS)})",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda", help="where --scenarios serve")
    parser.add_argument("--budget-s", type=float, default=600.0, help="--scenarios: skip what no longer fits")
    return parser


def checkpoint_for(artifact: Path, given: Path | None) -> Path | None:
    """The reference's source checkpoint: the one given, else the local one the artifact was exported from."""
    if given is not None:
        return given
    manifest = load_manifest(artifact, verify=False)
    return Path(manifest.source["model"]) if manifest.source.get("kind") == "local" else None


def run_scenario_bench(args: argparse.Namespace) -> dict[str, Any]:
    """The serving scenarios on `args.device`, with the machine and settings they ran under."""
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"m3-bench: unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    checkpoint = checkpoint_for(args.artifact, args.checkpoint)
    if note := reference_unavailable(checkpoint):
        raise SystemExit(f"m3-bench --scenarios needs the reference: {note}")
    setup = load_setup(args.artifact, checkpoint, args.device, args.batch_size, args.token_budget)
    try:
        results = run_scenarios(setup, args.scenarios, args.budget_s)
    finally:
        setup.model.close()
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["m3-bench", *sys.argv[1:]]),
        "artifact": str(args.artifact),
        "device": args.device,
        "machine": machine_description(),
        "served": {
            "graph": setup.model.backend.graph_path.name,
            # The CPU backend's flash-attention graph for batches from `flash_from_tokens` padded tokens on.
            "long_graph": getattr(getattr(setup.model.backend, "long_graph_path", None), "name", None),
            "flash_from_tokens": getattr(setup.model.backend, "flash_from_tokens", None),
            "notes": getattr(setup.model.backend, "notes", []),
        },
        "scenarios": results,
        "summary": table(
            summary_rows(results, args.device == "cuda"), ("measurement", "measured", "target", "verdict")
        ),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # the HTTP server against in-process encode (m3rt[serve])
        from m3rt.benchmarks.serve_bench import main as serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["embed"]:  # `m3rt embed` against one in-process encode (m3rt[embed])
        from m3rt.benchmarks.embed_bench import main as embed_main

        return embed_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.scenarios:
        report = run_scenario_bench(args)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scenarios.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        print(report["summary"])
        print(f"wrote {args.out / 'scenarios.json'}")
        return 0
    report = run_benchmark(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = markdown(report)
    (args.out / "results.md").write_text(table, encoding="utf-8")
    written = ["results.json", "results.md"]
    try:
        plot(report, args.out / "results.png")
        written.append("results.png")
    except ImportError:
        print("m3-bench: no plot (matplotlib is not installed: pip install 'm3rt[bench]')", file=sys.stderr)
    print(table)
    print(f"wrote {', '.join(str(args.out / name) for name in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
