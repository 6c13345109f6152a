"""`m3-bench ARTIFACT --scenarios ...`: the serving measurements, m3rt's served model beside the
PyTorch reference in the same pipeline, one scenario at a time under a time budget.

  latency     batch-1 16-token query, end to end (text in, all three outputs out): m3rt with and
              without CUDA graphs (when the backend has them), and the reference; model only too
  documents   8192-token documents, all three outputs, m3rt vs the reference
  throughput  mixed-length corpus (queries 10-30, passages 100-300, long 2k-8k tokens) vs the reference
  profile     where one pass over that corpus spends its time, stage by stage (tokenise, pad, backend
              run, post-processing), and on CUDA the kernels per forward by class (torch.profiler)
  variants    plain fp16 vs fused fp16 graph, model only: ONNX Runtime CUDA at 32x512 and 2x8192 (the
              plain fp16 graph converted into the work folder when the artifact has none)

On a GPU the served model is ONNX Runtime CUDA on the artifact's fused fp16 graph and the reference
is PyTorch fp16 + SDPA run the FlagEmbedding way behind m3rt's tokeniser, scheduler and
post-processing (`TorchBackend`; m3rt's vectorised post-processing is faster than FlagEmbedding's
own, so the ratios are conservative). On a CPU (`--device cpu`, how this module is tested) both are
fp32 and no figure is a GPU figure. Correctness is not measured here: that is `pytest -m gpu`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m3rt.benchmarks.texts import TextFactory
from m3rt.manifest import OUTPUT_NAMES

SCENARIOS = ("latency", "documents", "throughput", "profile", "variants")
ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
# The GPU targets these scenarios are read against (benchmarks/RESULTS.md).
TARGETS = {"latency_p50_ms": 1.0, "throughput_ratio": 1.5, "doc8192_tokens_per_s": 280_000.0}
# Seconds a scenario needs at least on the full model; later ones are skipped past the budget.
NEEDS_S = {"latency": 40, "documents": 20, "throughput": 40, "profile": 20, "variants": 60}


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1e3
    return {
        "n": int(ms.size),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "min_ms": float(ms.min()),
    }


@dataclass
class Setup:
    """What every scenario reads: the served model, the reference, texts and settings."""

    artifact: Path
    model: Any  # M3Model
    reference: Any  # M3Model over TorchBackend
    device: str
    batch_size: int
    factory: TextFactory
    work: Path | None = None  # where scenarios may write what they build (variants: a plain fp16 graph)
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"


def load_setup(
    artifact: Path, checkpoint: Path, device: str, batch_size: int, token_budget: int, work: Path | None = None
) -> Setup:
    """The served model (ONNX Runtime CUDA, fused fp16, CUDA graphs; fp32 ONNX Runtime on a CPU) and the
    PyTorch reference in m3rt's pipeline (fp16 + SDPA on a GPU, fp32 on a CPU)."""
    from m3rt.benchmarks.runners import TorchBackend
    from m3rt.model import M3Model
    from m3rt.tokenizer import M3Tokenizer

    if device == "cuda":
        model = M3Model.load(artifact, precision="fp16", device="cuda", verify=False, token_budget=token_budget)
    else:
        model = M3Model.load(artifact, verify=False, token_budget=token_budget)
    backend = TorchBackend(checkpoint, device)
    reference = M3Model(model.manifest, backend, M3Tokenizer(model.manifest.tokenizer_path), token_budget=token_budget)
    return Setup(artifact, model, reference, device, batch_size, TextFactory(model.tokenizer, seed=0), work)


def _graphs_off(model: Any) -> Any:
    """The backend's plain runs (the baseline a CUDA graph is measured against), where it has graphs."""
    graphs_off = getattr(model.backend, "graphs_off", None)
    return graphs_off() if graphs_off is not None else nullcontext()


def _latency(encode: Callable[[str], Any], texts: list[str], max_iters: int, max_s: float) -> dict[str, float]:
    for text in texts[:10]:
        encode(text)
    samples = []
    deadline = time.perf_counter() + max_s
    for k in range(max_iters):
        text = texts[k % len(texts)]
        t = time.perf_counter()
        encode(text)
        samples.append(time.perf_counter() - t)
        if time.perf_counter() > deadline:
            break
    return percentiles(samples)


def latency(setup: Setup) -> dict[str, Any]:
    n = 16
    queries = [setup.factory.at_least(n) for _ in range(64)]
    model, reference = setup.model, setup.reference
    lengths = {len(x) for x in model.tokenizer.encode(queries, max_length=n).ids}
    iters, cap = (300, 8.0) if setup.on_gpu else (20, 2.0)
    out: dict[str, Any] = {"tokens": sorted(lengths), "outputs": "dense + sparse + ColBERT"}
    e2e = lambda q: model.encode(q, max_length=n, **ALL)  # noqa: E731
    out["m3rt_e2e"] = _latency(e2e, queries, iters, cap)
    with _graphs_off(model):
        out["m3rt_no_graph_e2e"] = _latency(e2e, queries, iters, cap)
    out["m3rt_e2e_dense_sparse"] = _latency(
        lambda q: model.encode(q, max_length=n, return_dense=True, return_sparse=True), queries, iters, cap
    )
    out["reference_e2e"] = _latency(lambda q: reference.encode(q, max_length=n, **ALL), queries, iters // 3, cap)
    # Model only: one padded [1, 16] batch through the backend, raw outputs (no post-processing).
    ids = model.tokenizer.encode(queries[:1], max_length=n).ids[0][None, :]
    mask = np.ones_like(ids)
    out["m3rt_model"] = _latency(lambda _q: model.backend.run(ids, mask, OUTPUT_NAMES), queries, iters, cap)
    with _graphs_off(model):
        out["m3rt_no_graph_model"] = _latency(
            lambda _q: model.backend.run(ids, mask, OUTPUT_NAMES), queries, iters, cap
        )
    out["tokenize_one"] = _latency(lambda q: model.tokenizer.encode([q], max_length=n), queries, iters, 1.0)
    p50 = out["m3rt_e2e"]["p50_ms"]
    out["target"] = {"p50_ms_max": TARGETS["latency_p50_ms"], "met": p50 <= TARGETS["latency_p50_ms"]}
    out["speedup_vs_reference_p50"] = out["reference_e2e"]["p50_ms"] / p50
    return out


def _corpus(setup: Setup) -> tuple[list[str], dict[str, int]]:
    if "corpus" not in setup.shared:
        counts = {"queries": 2000, "passages": 800, "long": 12} if setup.on_gpu else {"queries": 40, "passages": 12}
        texts: list[str] = []
        for name, count in counts.items():
            texts += setup.factory.distribution(name, count)
        order = np.random.default_rng(1).permutation(len(texts))  # mixed, as a real corpus arrives
        setup.shared["corpus"] = ([texts[i] for i in order], counts)
    return setup.shared["corpus"]


def _throughput(model: Any, texts: list[str], max_length: int, batch_size: int, repeats: int) -> dict[str, Any]:
    tokens = int(sum(len(x) for x in model.tokenizer.encode(texts, max_length=max_length).ids))
    model.encode(texts[: max(1, len(texts) // 8)], batch_size=batch_size, max_length=max_length, **ALL)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model.encode(texts, batch_size=batch_size, max_length=max_length, **ALL)
        best = min(best, time.perf_counter() - t)
    return {"texts": len(texts), "tokens": tokens, "best_s": best, "tokens_per_s": tokens / best}


def throughput(setup: Setup) -> dict[str, Any]:
    texts, counts = _corpus(setup)
    repeats = 3 if setup.on_gpu else 1
    out: dict[str, Any] = {"corpus": counts, "batch_size": setup.batch_size, "token_budget": setup.model.token_budget}
    out["m3rt"] = _throughput(setup.model, texts, 8192, setup.batch_size, repeats)
    out["reference"] = _throughput(setup.reference, texts, 8192, setup.batch_size, repeats)
    ratio = out["m3rt"]["tokens_per_s"] / out["reference"]["tokens_per_s"]
    out["ratio"] = ratio
    out["target"] = {"ratio_min": TARGETS["throughput_ratio"], "met": ratio >= TARGETS["throughput_ratio"]}
    return out


def documents(setup: Setup) -> dict[str, Any]:
    length = min(8192, setup.model.max_length) if setup.on_gpu else min(512, setup.model.max_length)
    docs = [setup.factory.at_least(length) for _ in range(8 if setup.on_gpu else 2)]
    repeats = 3 if setup.on_gpu else 1
    out: dict[str, Any] = {"tokens_per_doc": length, "docs": len(docs), "token_budget": setup.model.token_budget}
    out["m3rt"] = _throughput(setup.model, docs, length, setup.batch_size, repeats)
    out["reference"] = _throughput(setup.reference, docs, length, setup.batch_size, repeats)
    rate = out["m3rt"]["tokens_per_s"]
    out["ratio"] = rate / out["reference"]["tokens_per_s"]
    out["target"] = {
        "tokens_per_s_min": TARGETS["doc8192_tokens_per_s"],
        "met": rate >= TARGETS["doc8192_tokens_per_s"],
    }
    return out


def profile(setup: Setup) -> dict[str, Any]:
    """Stage by stage, not overlapped: where one pass over the corpus spends its time."""
    from m3rt.postprocess import OutputCollector
    from m3rt.scheduler import pad_batch, plan_batches, token_lengths

    texts, _ = _corpus(setup)
    model = setup.model
    out: dict[str, Any] = {}
    t = time.perf_counter()
    ids = model.tokenizer.encode(texts, max_length=8192).ids
    out["tokenize_s"] = time.perf_counter() - t
    plan = plan_batches(token_lengths(ids), setup.batch_size, model.token_budget)
    pad_s = run_s = post_s = 0.0
    collector = OutputCollector(len(texts), model.manifest.hidden_size, OUTPUT_NAMES, model.postprocessor)
    for positions in plan:
        t = time.perf_counter()
        batch = pad_batch(ids, positions, model.pad_id)
        pad_s += time.perf_counter() - t
        t = time.perf_counter()
        values = model.backend.run(batch.input_ids, batch.attention_mask, OUTPUT_NAMES)
        run_s += time.perf_counter() - t
        t = time.perf_counter()
        collector.add(batch, values)
        post_s += time.perf_counter() - t
    dense, sparse, colbert = collector.finish()
    result_bytes = dense.nbytes + sparse.indptr.nbytes + sparse.indices.nbytes + sparse.values.nbytes
    tokens = int(sum(len(x) for x in ids))
    out.update(
        batches=len(plan), tokens=tokens, padded_tokens=int(sum(len(b) * max(len(ids[i]) for i in b) for b in plan)),
        pad_s=pad_s, backend_run_s=run_s, postprocess_s=post_s,
        result_bytes=result_bytes + sum(c.nbytes for c in colbert),
        device_postprocess_on=model.postprocessor.active_devices,
    )  # fmt: skip
    out["staged_total_s"] = out["tokenize_s"] + pad_s + run_s + post_s
    out["backend_tokens_per_s"] = tokens / max(run_s, 1e-9)
    if setup.on_gpu:
        try:  # the staged timings above must survive a profiler failure
            out["kernels"] = _kernel_profile(model)
        except Exception as exc:  # noqa: BLE001
            out["kernels"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _kernel_class(name: str) -> str:
    n = name.lower()
    if "memcpy" in n or "memset" in n:
        return "copies"
    if any(k in n for k in ("fmha", "flash", "attention", "softmax", "mha", "cutlass::fmha", "efficient")):
        return "attention"
    if any(k in n for k in ("gemm", "cublas", "cutlass", "sm90_xmma", "matmul", "nvjet")):
        return "gemm"
    if "layernorm" in n or "layer_norm" in n:
        return "layernorm"
    if "gelu" in n:
        return "gelu"
    if n.startswith("m3rt_"):
        return "m3rt post-processing"
    return "other"


def _kernel_profile(model: Any) -> dict[str, Any]:
    """CUDA kernels and their GPU time per forward, from CUPTI through torch.profiler (it records every
    kernel in the process, ONNX Runtime's included)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    result: dict[str, Any] = {}
    for label, shape in (("1x16", (1, 16)), ("32x512", (32, 512)), ("2x8192", (2, 8192))):
        ids = np.random.default_rng(0).integers(5, 1000, shape).astype(np.int64)
        ids[:, 0], ids[:, -1] = 0, 2
        mask = np.ones_like(ids)
        for _ in range(3):
            model.backend.run(ids, mask, OUTPUT_NAMES)
        reps = 5
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                model.backend.run(ids, mask, OUTPUT_NAMES)
            torch.cuda.synchronize()
        by_class: dict[str, float] = {}
        kernels = 0
        for event in prof.key_averages():
            time_us = getattr(event, "self_device_time_total", None)
            if time_us is None:
                time_us = getattr(event, "self_cuda_time_total", 0.0)
            if not time_us:
                continue
            kernels += int(event.count)
            cls = _kernel_class(event.key)
            by_class[cls] = by_class.get(cls, 0.0) + float(time_us) / 1e3 / reps
        result[label] = {
            "kernels_per_forward": kernels / reps,
            "gpu_ms_per_forward": {k: round(v, 3) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
            "gpu_ms_total": round(sum(by_class.values()), 3),
        }
    return result


class Skipped(Exception):
    """A scenario that cannot run here; the reason is recorded."""


def plain_fp16_graph(setup: Setup, work: Path) -> Path:
    """The artifact's plain fp16 graph, or one converted from its fp32 graph into `work` (the lean export
    the GPU check makes has none: converting costs seconds there, the export's CPU fidelity pass minutes)."""
    manifest = setup.model.manifest
    if manifest.has_graph("fp16"):
        return manifest.graph_path("fp16")
    target = work / "model.fp16.onnx"
    if not target.is_file():
        from m3rt.export.variants import convert_fp16

        work.mkdir(parents=True, exist_ok=True)
        convert_fp16(manifest.graph_path("fp32"), target)
    return target


def variants(setup: Setup) -> dict[str, Any]:
    """Plain fp16 vs fused fp16 graph, model only (the reason the fused graph is the served one): ONNX
    Runtime CUDA at 32x512 and 2x8192 on a GPU; ONNX Runtime CPU (which runs the fused contrib ops
    too) at small shapes on a CPU."""
    manifest = setup.model.manifest
    if not manifest.has_graph("fp16-fused"):
        raise Skipped("the artifact has no fused fp16 graph (m3-export --fused)")
    with tempfile.TemporaryDirectory(prefix="m3rt-variants-") as tmp:
        return _variants(setup, plain_fp16_graph(setup, setup.work or Path(tmp)))


def _variants(setup: Setup, plain_path: Path) -> dict[str, Any]:
    from m3rt.backends.onnxruntime import OnnxRuntimeBackend

    manifest = setup.model.manifest
    out: dict[str, Any] = {"plain_fp16_graph": plain_path.name}
    if setup.on_gpu:
        from m3rt.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend

        shapes, reps = {"32x512": (32, 512), "2x8192": (2, 8192)}, 5
        fused = setup.model.backend
        plain = OnnxRuntimeCudaBackend(plain_path, cuda_graph=False)
        owned = [plain]
    else:
        shapes, reps = {"4x64": (4, 64), "2x256": (2, min(256, setup.model.max_length))}, 2
        plain = OnnxRuntimeBackend(plain_path)
        fused = OnnxRuntimeBackend(manifest.graph_path("fp16-fused"))
        owned = [plain, fused]
    try:
        for label, (b, s) in shapes.items():
            ids = np.random.default_rng(0).integers(5, 1000, (b, s)).astype(np.int64)
            ids[:, 0], ids[:, -1] = 0, 2
            mask = np.ones_like(ids)
            row = {}
            for name, backend in (("plain_fp16", plain), ("fused_fp16", fused)):
                for _ in range(2):
                    backend.run(ids, mask, OUTPUT_NAMES)
                times = []
                for _ in range(reps):
                    t = time.perf_counter()
                    backend.run(ids, mask, OUTPUT_NAMES)
                    times.append(time.perf_counter() - t)
                row[f"{name}_tokens_per_s"] = b * s / min(times)
            row["fused_over_plain"] = row["fused_fp16_tokens_per_s"] / row["plain_fp16_tokens_per_s"]
            out[label] = row
        out["long"] = label  # the summary's row
    finally:
        for backend in owned:
            close = getattr(backend, "close", None)
            if close is not None:
                close()
    return out


RUNNERS: dict[str, Callable[[Setup], dict[str, Any]]] = {
    "latency": latency,
    "documents": documents,
    "throughput": throughput,
    "profile": profile,
    "variants": variants,
}


def run_scenarios(
    setup: Setup,
    names: list[str],
    budget_s: float,
    log: Callable[[str], None] = print,
    on_result: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Each named scenario in order, isolated (a failure is recorded, the rest run) and timed; one
    that no longer fits in `budget_s` is skipped with a note. `on_result(name, record)` sees each
    record as soon as it exists (to save it before the next scenario starts)."""
    import traceback

    start = time.perf_counter()
    results: dict[str, Any] = {}
    for name in names:
        left = budget_s - (time.perf_counter() - start)
        scale = 1.0 if setup.on_gpu else 0.0  # CPU runs are the tiny model's: no minimum applies
        if left < NEEDS_S[name] * scale:
            results[name] = {"status": "skipped", "reason": f"time guard: {left:.0f} s left, needs ~{NEEDS_S[name]} s"}
            if on_result is not None:
                on_result(name, results[name])
            continue
        log(f"scenario {name} ...")
        t = time.perf_counter()
        try:
            record = {"status": "ok", **RUNNERS[name](setup)}
        except Skipped as exc:
            record = {"status": "skipped", "reason": str(exc)}
        except Exception as exc:  # one failure must not lose the other scenarios
            record = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        record["seconds"] = round(time.perf_counter() - t, 2)
        results[name] = record
        if on_result is not None:
            on_result(name, record)
        log(f"scenario {name}: {record['status']}")
    return results


def summary_rows(results: dict[str, Any], on_gpu: bool) -> list[tuple[str, str, str, str]]:
    """(measurement, measured, target, verdict) rows; no verdict on GPU targets for CPU figures."""

    def get(name: str, *keys: str) -> Any:
        value: Any = results.get(name, {})
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def verdict(name: str, met: bool | None) -> str:
        status = results.get(name, {}).get("status", "not run")
        if status != "ok":
            return status.upper()
        if not on_gpu:
            return "cpu"
        return "-" if met is None else ("PASS" if met else "MISS")

    def fmt(value: Any, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    return [
        (
            "batch-1 16 tok e2e p50",
            f"{fmt(get('latency', 'm3rt_e2e', 'p50_ms'))} ms"
            f" (no graph {fmt(get('latency', 'm3rt_no_graph_e2e', 'p50_ms'))},"
            f" ref {fmt(get('latency', 'reference_e2e', 'p50_ms'))})",
            f"<= {TARGETS['latency_p50_ms']} ms",
            verdict("latency", get("latency", "target", "met")),
        ),
        (
            "mixed corpus, 3 outputs, vs reference",
            f"{fmt(get('throughput', 'ratio'))}x ({fmt(get('throughput', 'm3rt', 'tokens_per_s'), ',.0f')} tok/s)",
            f">= {TARGETS['throughput_ratio']}x",
            verdict("throughput", get("throughput", "target", "met")),
        ),
        (
            "8192-token docs, 3 outputs",
            f"{fmt(get('documents', 'm3rt', 'tokens_per_s'), ',.0f')} tok/s ({fmt(get('documents', 'ratio'))}x ref)",
            f">= {TARGETS['doc8192_tokens_per_s']:,.0f} tok/s",
            verdict("documents", get("documents", "target", "met")),
        ),
        (
            f"fused over plain fp16, {get('variants', 'long') or '-'}",
            f"{fmt(get('variants', get('variants', 'long') or '-', 'fused_over_plain'))}x",
            "(reported)",
            verdict("variants", None),
        ),
    ]


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
