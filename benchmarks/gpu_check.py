"""The GPU check of issue 5, in one run: correctness first, then the measurements, a short table last.

On the H100 host (offline; onnxruntime-gpu unpacked into /tmp/ortsite, see shared/gpu/README.md):

    python3 -m pip install --no-deps --no-build-isolation --no-index -e .
    PYTHONPATH=/tmp/ortsite python3 benchmarks/gpu_check.py --out $OUT \\
        --tokenizer ../shared/fixtures/xlm-roberta-tokenizer.json

(The script also runs from a plain checkout without the install: it maps the `m3rt` package names to
the source folders itself.) Steps, each timed and isolated (one failure is recorded, the rest run):

  environment   GPU, driver, ONNX Runtime version and providers, library versions
  export        synthetic:full checkpoint (BGE-M3's shape, random weights, real XLM-R tokenizer) ->
                fp32 + fp16 + fused fp16 graphs (m3-export --fp16 --fused), in --work, not in --out
  kernels       the device kernels against the CPU kernels (check_kernels_against_cpu, bit-exact)
  fidelity      ONNX Runtime CUDA, fused fp16, against the PyTorch fp32 reference on the GPU (the
                built-in held-out samples plus 2k/8k-token texts), against the fp16 gates; device
                post-processing against host post-processing of the same outputs (exact); CUDA graph
                buckets against the plain path
  latency       batch-1 16-token query, end to end (text in, all three outputs out): m3rt with and
                without CUDA graphs, and the PyTorch fp16 + SDPA reference
  throughput    mixed-length corpus (queries 10-30, passages 100-300, long 2k-8k tokens), all three
                outputs, m3rt vs the reference; 8192-token documents
  profile       where m3rt's time goes on the corpus (tokenisation, padding, host->device copy, model,
                post-processing incl. device kernels and device->host copies), CUDA kernels per
                forward and GPU time by kernel class (attention, GEMM, ...) from torch.profiler
  variants      plain fp16 vs fused fp16 graph, model only, at 32x512 and 2x8192
  gpu tests     pytest -m gpu tests/test_cuda_backend.py (tiny model)

The reference is PyTorch fp16 + SDPA run the FlagEmbedding way (FlagEmbedding is not installed on the
host): the same model behind m3rt's tokeniser, scheduler and post-processing (`TorchBackend`). m3rt's
vectorised post-processing is faster than FlagEmbedding's own, so the ratios are conservative.

A global time guard (--budget-s) skips what no longer fits, with a note. `--dry-run` runs every step
that can run without a GPU on the tiny model on ONNX Runtime CPU (the CUDA backend's IOBinding code
in its host-memory mode), so the script itself is tested where there is no GPU.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"m3rt": "runtime", "m3rt.export": "export", "m3rt.kernels": "kernels", "m3rt.benchmarks": "benchmarks"}


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """`m3rt` from this checkout when it is not installed (pyproject's package-dir mapping)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        folder = PACKAGE_DIRS.get(fullname)
        if folder is None:
            return None
        init = REPO / folder / "__init__.py"
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


if importlib.util.find_spec("m3rt") is None:
    sys.meta_path.insert(0, _SourceTreeFinder())

import numpy as np  # noqa: E402

ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
OUTPUTS = ("dense_vecs", "sparse_weights", "colbert_vecs")
TARGETS = {"latency_p50_ms": 1.5, "throughput_ratio": 1.5, "doc8192_tokens_per_s": 280_000.0}
ANCHORS = (
    "measured on an H100 80GB: PyTorch fp16 SDPA batch-1 16 tokens 18.0 ms; fused ORT 3.9 ms; "
    "fused 3-output 2x8192 273k tok/s"
)


def _now() -> float:
    return time.perf_counter()


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1e3
    return {
        "n": int(ms.size),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "min_ms": float(ms.min()),
    }


class Run:
    """Holds the configuration, the shared objects and the results; runs steps under the time guard."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = _now()
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.dry = bool(args.dry_run)
        self.results: dict[str, Any] = {"steps": {}, "notes": [], "dry_run": self.dry}
        self.shared: dict[str, Any] = {}

    def left(self) -> float:
        return self.args.budget_s - (_now() - self.start)

    def step(self, name: str, fn: Callable[[], dict[str, Any] | None], needs_s: float) -> dict[str, Any]:
        record: dict[str, Any] = {}
        if self.left() < needs_s:
            record = {"status": "skipped", "reason": f"time guard: {self.left():.0f} s left, needs ~{needs_s:.0f} s"}
        else:
            print(f"[{_now() - self.start:6.1f} s] {name} ...", flush=True)
            t = _now()
            try:
                record = {"status": "ok", **(fn() or {})}
            except _Skip as exc:
                record = {"status": "skipped", "reason": str(exc)}
            except Exception as exc:  # one failure must not lose the other steps
                record = {
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                }
            record["seconds"] = round(_now() - t, 2)
        self.results["steps"][name] = record
        status = record["status"] + (
            f": {record.get('reason') or record.get('error')}" if record["status"] != "ok" else ""
        )
        print(f"[{_now() - self.start:6.1f} s] {name}: {status[:300]}", flush=True)
        self.save()
        return record

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=_jsonable) + "\n")


class _Skip(Exception):
    pass


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ---------------------------------------------------------------------------------------------- steps


def step_environment(run: Run) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    if not run.dry:
        import torch  # before onnxruntime: it loads the CUDA 13 libraries onnxruntime-gpu links against

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["torch_cuda_available"] = torch.cuda.is_available()
    import onnxruntime as ort

    env["onnxruntime"] = ort.__version__
    env["onnxruntime_path"] = str(Path(ort.__file__).parent)
    env["onnxruntime_providers"] = ort.get_available_providers()
    for name in ("transformers", "tokenizers", "onnx"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001
            env[name] = f"unavailable ({exc})"
    try:
        import cuda.bindings

        env["cuda_bindings"] = getattr(cuda.bindings, "__version__", "?")
        from m3rt.cuda import check, device_description, gpu_unavailable_reason, runtime_api

        reason = gpu_unavailable_reason()
        env["gpu_unavailable_reason"] = reason
        if reason is None:
            env.update(device_description(0))
            cudart = runtime_api()
            env["cuda_driver_version"] = int(check(cudart.cudaDriverGetVersion()))
            env["cuda_runtime_version"] = int(check(cudart.cudaRuntimeGetVersion()))
            free, total = check(cudart.cudaMemGetInfo())
            env["gpu_memory_gib"] = {"free": round(free / 2**30, 1), "total": round(total / 2**30, 1)}
    except Exception as exc:  # noqa: BLE001
        env["cuda_bindings"] = f"unavailable ({exc})"
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except Exception as exc:  # noqa: BLE001
        env["nvidia_smi"] = f"unavailable ({exc})"
    from m3rt.backends.onnxruntime_cuda import cuda_unavailable_reason

    env["ort_cuda_unavailable_reason"] = cuda_unavailable_reason()
    run.results["environment"] = env
    return env


def _tokenizer_path(run: Run) -> Path | None:
    if run.args.tokenizer:
        return Path(run.args.tokenizer)
    for candidate in (
        REPO.parent / "shared/fixtures/xlm-roberta-tokenizer.json",
        os.environ.get("M3RT_TOKENIZER_JSON"),
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def step_export(run: Run) -> dict[str, Any]:
    from m3rt.export.artifact import ExportOptions, export_artifact
    from m3rt.export.synthetic import write_synthetic_checkpoint
    from m3rt.manifest import load_manifest

    size = "tiny" if run.dry else "full"
    tokenizer = _tokenizer_path(run)
    if tokenizer is None and not run.dry:
        raise RuntimeError("the real XLM-R tokenizer is needed at full size: pass --tokenizer PATH")
    ckpt = Path(run.args.checkpoint) if run.args.checkpoint else run.work / f"ckpt-{size}"
    artifact = run.work / f"artifact-{size}"
    run.shared.update(checkpoint=ckpt, artifact=artifact)
    manifest_file = artifact / "m3rt.json"
    timings: dict[str, float] = {}
    reused = manifest_file.is_file() and (ckpt / "config.json").is_file() and not run.args.rebuild
    if reused:
        data = json.loads(manifest_file.read_text())
        reused = "fp16-fused" in data["graphs"]
    if not reused:
        t = _now()
        if not run.args.checkpoint:
            write_synthetic_checkpoint(ckpt, size=size, seed=0, tokenizer=tokenizer)
        timings["checkpoint_s"] = round(_now() - t, 1)
        t = _now()
        # Lean: the fused graph and its fp32 check against PyTorch; nothing measured for the CPU (its
        # fidelity is measured on the GPU in the fidelity step), no plain fp16 graph.
        export_artifact(
            ExportOptions(
                model=str(ckpt), output=artifact, force=True, fused=True, fused_cpu_fidelity=False, engine=False
            )
        )
        timings["export_s"] = round(_now() - t, 1)
    manifest = load_manifest(artifact, verify=False)
    run.shared["manifest"] = manifest
    fused = manifest.graph("fp16-fused")
    return {
        "reused_previous_export": reused,
        "timings": timings,
        "export_timings": manifest.timings,
        "checkpoint": str(ckpt),
        "tokenizer": (ckpt / "TOKENIZER_SOURCE").read_text().strip() if (ckpt / "TOKENIZER_SOURCE").is_file() else None,
        "model": {k: getattr(manifest.model, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "fused_operators": fused.details["optimizer"]["fused_operators"],
        "fused_warnings": fused.details.get("warnings"),
        "fused_fp32_vs_pytorch": (fused.validation or {}).get("heads"),
        "files_gb": {n: round(r["size"] / 1e9, 3) for n, r in manifest.files.items()},
    }


def _need_gpu(run: Run) -> None:
    if run.dry:
        raise _Skip("dry run: no GPU")


def step_kernels(run: Run) -> dict[str, Any]:
    _need_gpu(run)
    from m3rt.kernels.device import DeviceKernels, check_kernels_against_cpu

    with DeviceKernels() as kernels:
        results = check_kernels_against_cpu(kernels, np.random.default_rng(0))
        arch = kernels.arch
    failed = [(c, d) for c, ok, d in results if not ok]
    return {"arch": arch, "cases": len(results), "passed": len(results) - len(failed), "failures": failed}


def _m3rt_model(run: Run, cuda_graph: bool, **backend_options: Any) -> Any:
    """The served model: ONNX Runtime CUDA on the fused fp16 graph (dry run: the same IOBinding code
    on ONNX Runtime CPU, host memory)."""
    from m3rt.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend
    from m3rt.model import M3Model
    from m3rt.tokenizer import M3Tokenizer

    manifest = run.shared["manifest"]
    if not run.dry:
        return M3Model.load(
            manifest.root, precision="fp16", device="cuda", verify=False, token_budget=run.args.token_budget,
            backend_options={"cuda_graph": cuda_graph, **backend_options},
        )  # fmt: skip
    backend = OnnxRuntimeCudaBackend(
        manifest.graph_path("fp16-fused"), device_type="cpu", cuda_graph=cuda_graph,
        pad_id=manifest.special_tokens["pad"], **backend_options,
    )  # fmt: skip
    return M3Model(manifest, backend, M3Tokenizer(manifest.tokenizer_path), token_budget=run.args.token_budget)


def _reference_model(run: Run, fp16: bool) -> Any:
    from m3rt.benchmarks.runners import TorchBackend
    from m3rt.model import M3Model
    from m3rt.tokenizer import M3Tokenizer

    manifest = run.shared["manifest"]
    device = "cpu" if run.dry else "cuda"
    backend = TorchBackend(run.shared["checkpoint"], device, fp16=fp16 and not run.dry)
    return M3Model(manifest, backend, M3Tokenizer(manifest.tokenizer_path), token_budget=run.args.token_budget)


def _free_torch(*models: Any) -> None:
    for model in models:
        if model is not None and hasattr(model.backend, "_module"):
            model.backend._module = None
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def step_load(run: Run) -> dict[str, Any]:
    t = _now()
    run.shared["m3rt"] = _m3rt_model(run, cuda_graph=True)
    loaded = {"m3rt_load_s": round(_now() - t, 1)}
    backend = run.shared["m3rt"].backend
    t = _now()
    backend.warmup()
    loaded["graph_warmup_s"] = round(_now() - t, 2)
    t = _now()
    run.shared["reference"] = _reference_model(run, fp16=True)
    loaded["reference_load_s"] = round(_now() - t, 1)
    return {
        **loaded,
        "graph": backend.graph_path.name,
        "providers": backend.providers,
        "cuda_graphs": backend.cuda_graph,
        "graph_buckets": sorted(backend.graph_buckets),
        "device_postprocess": backend.device_postprocess,
        "backend_notes": backend.notes,
        "reference": "PyTorch fp16 + SDPA in m3rt's pipeline" if not run.dry else "PyTorch fp32 CPU (dry run)",
    }


def _factory(run: Run) -> Any:
    if "factory" not in run.shared:
        from m3rt.benchmarks.texts import TextFactory

        run.shared["factory"] = TextFactory(run.shared["m3rt"].tokenizer, seed=0)
    return run.shared["factory"]


def step_fidelity(run: Run) -> dict[str, Any]:
    from m3rt.export.samples import sample_texts
    from m3rt.fidelity import DEFAULT_GATES, compare_outputs
    from m3rt.scheduler import pad_batch

    model = run.shared["m3rt"]
    factory = _factory(run)
    long = [factory.at_least(2048), factory.at_least(8190)] if not run.dry else [factory.at_least(600)]
    texts = sample_texts() + long
    out: dict[str, Any] = {"texts": len(texts), "longest_tokens": 8192 if not run.dry else 602}
    reference32 = _reference_model(run, fp16=False)
    try:
        want = reference32.encode(texts, batch_size=8, max_length=8192, **ALL)
    finally:
        _free_torch(reference32)
    got = model.encode(texts, batch_size=8, max_length=8192, **ALL)
    figures = compare_outputs(got, want)
    gate = DEFAULT_GATES["fp16"]
    out["m3rt_fused_fp16_vs_pytorch_fp32"] = {**figures, "gate": vars(gate), "passed": not gate.failures(figures)}
    reference16 = run.shared["reference"]
    out["pytorch_fp16_vs_pytorch_fp32"] = compare_outputs(
        reference16.encode(texts, batch_size=8, max_length=8192, **ALL), want
    )

    # Device post-processing (CUDA kernels) against the host kernels on the very same outputs.
    ids = model.tokenizer.encode(texts[:16], max_length=512).ids
    batch = pad_batch(ids, np.arange(len(ids)), model.pad_id)
    values = model.backend.run(batch.input_ids, batch.attention_mask, OUTPUTS)
    from m3rt.device_array import DeviceArray

    host = {k: v.to_host() if isinstance(v, DeviceArray) else v for k, v in values.items()}
    out["device_vs_host_postprocess_exact"] = _postprocessed_identically(model, batch, values, host)
    out["device_arrays_returned"] = sorted(k for k, v in values.items() if isinstance(v, DeviceArray))

    # CUDA-graph buckets (padded) against the plain path, batch-1 queries of several lengths.
    queries = [factory.at_least(n) for n in (5, 16, 30, 60)]
    lengths = (5, 16, 30, 60)
    graph_out = [model.encode(q, max_length=n, **ALL) for q, n in zip(queries, lengths)]
    with model.backend.graphs_off():
        plain_out = [model.encode(q, max_length=n, **ALL) for q, n in zip(queries, lengths)]
    pack = lambda outs: {  # noqa: E731
        "dense_vecs": np.stack([o["dense_vecs"] for o in outs]),
        "colbert_vecs": [o["colbert_vecs"] for o in outs],
        "lexical_weights": [o["lexical_weights"] for o in outs],
    }
    out["graph_vs_plain_batch1"] = compare_outputs(pack(graph_out), pack(plain_out))
    out["graph_bucket_runs"] = model.backend.graph_buckets

    # A plain batch's device outputs held (as they wait for post-processing) across four bucket
    # replays: bit for bit what a snapshot taken before says, raw and post-processed.
    held = model.backend.run(batch.input_ids, batch.attention_mask, OUTPUTS)
    snapshot = {k: np.array(v) for k, v in held.items()}
    for q, n in zip(queries, lengths):
        model.encode(q, max_length=n, **ALL)
    raw_intact = all(np.array_equal(np.array(v), snapshot[k]) for k, v in held.items())
    out["held_outputs_intact_across_replays"] = raw_intact and _postprocessed_identically(
        model, batch, held, snapshot
    )
    return out


def _postprocessed_identically(model: Any, batch: Any, first: dict, second: dict) -> bool:
    """Whether two sets of one batch's raw outputs post-process to the same results, bit for bit."""
    from m3rt.postprocess import OutputCollector

    finished = []
    for values in (first, second):
        collector = OutputCollector(len(batch.indices), model.manifest.hidden_size, OUTPUTS, model.unused_ids)
        collector.add(batch, values)
        finished.append(collector.finish())
    (d1, s1, c1), (d2, s2, c2) = finished
    return bool(
        np.array_equal(d1, d2)
        and np.array_equal(s1.indptr, s2.indptr)
        and np.array_equal(s1.indices, s2.indices)
        and np.array_equal(s1.values.view(np.uint32), s2.values.view(np.uint32))
        and all(np.array_equal(a, b) for a, b in zip(c1, c2))
    )


def _latency(encode: Callable[[str], Any], texts: list[str], max_iters: int, max_s: float) -> dict[str, float]:
    for text in texts[:10]:
        encode(text)
    samples = []
    deadline = _now() + max_s
    for k in range(max_iters):
        text = texts[k % len(texts)]
        t = _now()
        encode(text)
        samples.append(_now() - t)
        if _now() > deadline:
            break
    return _percentiles(samples)


def step_latency(run: Run) -> dict[str, Any]:
    factory = _factory(run)
    n = 16
    queries = [factory.at_least(n) for _ in range(64)]
    model, reference = run.shared["m3rt"], run.shared["reference"]
    lengths = {len(x) for x in model.tokenizer.encode(queries, max_length=n).ids}
    iters, cap = (300, 8.0) if not run.dry else (20, 2.0)
    out: dict[str, Any] = {"tokens": sorted(lengths), "outputs": "dense + sparse + ColBERT"}
    out["m3rt_cuda_graph_e2e"] = _latency(lambda q: model.encode(q, max_length=n, **ALL), queries, iters, cap)
    with model.backend.graphs_off():  # the same session's plain runs (gpu_graph_id=-1): the baseline
        out["m3rt_no_graph_e2e"] = _latency(lambda q: model.encode(q, max_length=n, **ALL), queries, iters, cap)
    out["m3rt_cuda_graph_e2e_dense_sparse"] = _latency(
        lambda q: model.encode(q, max_length=n, return_dense=True, return_sparse=True), queries, iters, cap
    )
    out["reference_e2e"] = _latency(lambda q: reference.encode(q, max_length=n, **ALL), queries, iters // 3, cap)
    # Model only: one padded [1, 16] batch through the backend (graph replay + input copy + output copies).
    ids = model.tokenizer.encode(queries[:1], max_length=n).ids[0][None, :]
    mask = np.ones_like(ids)
    out["m3rt_cuda_graph_model"] = _latency(lambda _q: model.backend.run(ids, mask, OUTPUTS), queries, iters, cap)
    with model.backend.graphs_off():
        out["m3rt_no_graph_model"] = _latency(lambda _q: model.backend.run(ids, mask, OUTPUTS), queries, iters, cap)
    # Tokenisation alone (one query): part of the end-to-end figure.
    out["tokenize_one"] = _latency(lambda q: model.tokenizer.encode([q], max_length=n), queries, iters, 1.0)
    p50 = out["m3rt_cuda_graph_e2e"]["p50_ms"]
    out["target"] = {"p50_ms_max": TARGETS["latency_p50_ms"], "met": p50 <= TARGETS["latency_p50_ms"]}
    out["speedup_vs_reference_p50"] = out["reference_e2e"]["p50_ms"] / p50
    return out


def _corpus(run: Run) -> tuple[list[str], dict[str, int]]:
    if "corpus" not in run.shared:
        factory = _factory(run)
        counts = {"queries": 2000, "passages": 800, "long": 12} if not run.dry else {"queries": 40, "passages": 12}
        texts: list[str] = []
        for name, count in counts.items():
            texts += factory.distribution(name, count)
        order = np.random.default_rng(1).permutation(len(texts))  # mixed, as a real corpus arrives
        run.shared["corpus"] = ([texts[i] for i in order], counts)
    return run.shared["corpus"]


def _throughput(model: Any, texts: list[str], max_length: int, batch_size: int, repeats: int) -> dict[str, Any]:
    tokens = int(sum(len(x) for x in model.tokenizer.encode(texts, max_length=max_length).ids))
    model.encode(texts[: max(1, len(texts) // 8)], batch_size=batch_size, max_length=max_length, **ALL)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = _now()
        model.encode(texts, batch_size=batch_size, max_length=max_length, **ALL)
        best = min(best, _now() - t)
    return {
        "texts": len(texts),
        "tokens": tokens,
        "best_s": best,
        "tokens_per_s": tokens / best,
        "texts_per_s": len(texts) / best,
    }


def step_throughput(run: Run) -> dict[str, Any]:
    texts, counts = _corpus(run)
    model, reference = run.shared["m3rt"], run.shared["reference"]
    repeats = 3 if not run.dry else 1
    bs = run.args.batch_size
    out: dict[str, Any] = {"corpus": counts, "batch_size": bs, "token_budget": run.args.token_budget}
    out["m3rt"] = _throughput(model, texts, 8192, bs, repeats)
    out["reference"] = _throughput(reference, texts, 8192, bs, repeats)
    ratio = out["m3rt"]["tokens_per_s"] / out["reference"]["tokens_per_s"]
    out["ratio"] = ratio
    out["target"] = {"ratio_min": TARGETS["throughput_ratio"], "met": ratio >= TARGETS["throughput_ratio"]}
    return out


def step_documents(run: Run) -> dict[str, Any]:
    factory = _factory(run)
    length = 8192 if not run.dry else 512
    docs = [factory.at_least(length) for _ in range(8 if not run.dry else 2)]
    model, reference = run.shared["m3rt"], run.shared["reference"]
    repeats = 3 if not run.dry else 1
    out: dict[str, Any] = {"tokens_per_doc": length, "docs": len(docs), "token_budget": run.args.token_budget}
    out["m3rt"] = _throughput(model, docs, length, run.args.batch_size, repeats)
    out["reference"] = _throughput(reference, docs, length, run.args.batch_size, repeats)
    rate = out["m3rt"]["tokens_per_s"]
    out["ratio"] = rate / out["reference"]["tokens_per_s"]
    out["target"] = {
        "tokens_per_s_min": TARGETS["doc8192_tokens_per_s"],
        "met": rate >= TARGETS["doc8192_tokens_per_s"],
    }
    return out


def step_profile(run: Run) -> dict[str, Any]:
    """Stage by stage, not overlapped: where one pass over the corpus spends its time."""
    from m3rt.postprocess import OutputCollector
    from m3rt.scheduler import pad_batch, plan_batches, token_lengths

    texts, _ = _corpus(run)
    model = run.shared["m3rt"]
    backend = model.backend
    out: dict[str, Any] = {}
    t = _now()
    ids = model.tokenizer.encode(texts, max_length=8192).ids
    out["tokenize_s"] = _now() - t
    plan = plan_batches(token_lengths(ids), run.args.batch_size, model.token_budget)
    upload = backend._memory.upload
    h2d = {"s": 0.0, "bytes": 0}

    def timed_upload(dst: int, host: np.ndarray) -> None:
        t0 = _now()
        upload(dst, host)
        h2d["s"] += _now() - t0
        h2d["bytes"] += host.nbytes

    backend._memory.upload = timed_upload  # instance attribute, removed below
    pad_s = run_s = post_s = 0.0
    d2h_bytes = 0
    collector = OutputCollector(len(texts), model.manifest.hidden_size, OUTPUTS, model.unused_ids)
    try:
        for positions in plan:
            t = _now()
            batch = pad_batch(ids, positions, model.pad_id)
            pad_s += _now() - t
            t = _now()
            values = backend.run(batch.input_ids, batch.attention_mask, OUTPUTS)
            run_s += _now() - t
            t = _now()
            collector.add(batch, values)
            post_s += _now() - t
        dense, sparse, colbert = collector.finish()
        d2h_bytes = dense.nbytes + sparse.indptr.nbytes + sparse.indices.nbytes + sparse.values.nbytes
        d2h_bytes += sum(c.nbytes for c in colbert)
    finally:
        del backend._memory.upload
    tokens = int(sum(len(x) for x in ids))
    padded = int(sum(len(b) * max(len(ids[i]) for i in b) for b in plan))
    out.update(
        batches=len(plan), tokens=tokens, padded_tokens=padded, pad_s=pad_s, h2d_s=h2d["s"], h2d_bytes=h2d["bytes"],
        model_s=run_s - h2d["s"], postprocess_s=post_s, d2h_result_bytes=d2h_bytes,
    )  # fmt: skip
    out["staged_total_s"] = out["tokenize_s"] + pad_s + run_s + post_s
    out["model_only_tokens_per_s"] = tokens / max(out["model_s"], 1e-9)
    if not run.dry:
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
    from torch.profiler import ProfilerActivity, profile

    result: dict[str, Any] = {}
    for label, shape in (("1x16", (1, 16)), ("32x512", (32, 512)), ("2x8192", (2, 8192))):
        ids = np.random.default_rng(0).integers(5, 1000, shape).astype(np.int64)
        ids[:, 0], ids[:, -1] = 0, 2
        mask = np.ones_like(ids)
        for _ in range(3):
            model.backend.run(ids, mask, OUTPUTS)
        reps = 5
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                model.backend.run(ids, mask, OUTPUTS)
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


def step_variants(run: Run) -> dict[str, Any]:
    """Plain fp16 vs fused fp16 graph, model only (the reason the fused graph is the served one)."""
    _need_gpu(run)
    from m3rt.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend

    manifest = run.shared["manifest"]
    if not manifest.has_graph("fp16"):
        raise _Skip("the lean export has no plain fp16 graph (m3-export --fp16 --fused adds it)")
    out: dict[str, Any] = {}
    fused = run.shared["m3rt"].backend
    plain = OnnxRuntimeCudaBackend(manifest.graph_path("fp16"), cuda_graph=False)
    try:
        for label, (b, s) in (("32x512", (32, 512)), ("2x8192", (2, 8192))):
            ids = np.random.default_rng(0).integers(5, 1000, (b, s)).astype(np.int64)
            mask = np.ones_like(ids)
            row = {}
            for name, backend in (("plain_fp16", plain), ("fused_fp16", fused)):
                for _ in range(2):
                    backend.run(ids, mask, OUTPUTS)
                times = []
                for _ in range(5):
                    t = _now()
                    backend.run(ids, mask, OUTPUTS)
                    times.append(_now() - t)
                row[f"{name}_tokens_per_s"] = b * s / min(times)
            row["fused_over_plain"] = row["fused_fp16_tokens_per_s"] / row["plain_fp16_tokens_per_s"]
            out[label] = row
    finally:
        plain.close()
    return out


PYTEST_ARGS = ["-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_cuda_backend.py"]


def step_gpu_tests(run: Run) -> dict[str, Any]:
    _need_gpu(run)
    timeout = max(30.0, min(180.0, run.left() - 10))
    # Through this script (--pytest): m3rt resolves from this checkout even where it is not installed.
    cmd = [sys.executable, str(Path(__file__).resolve()), "--pytest", *PYTEST_ARGS]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return {"returncode": proc.returncode, "tail": (proc.stdout + proc.stderr)[-3000:]}


# ---------------------------------------------------------------------------------------------- report


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(check, measured, target, verdict) rows for the short table."""
    steps = results["steps"]

    def get(step: str, *keys: str) -> Any:
        value: Any = steps.get(step, {})
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def verdict(step: str, ok: bool | None) -> str:
        status = steps.get(step, {}).get("status", "not run")
        if status != "ok":
            return status.upper()
        if results.get("dry_run"):
            return "dry run"  # CPU figures of the tiny model: no verdict on GPU targets
        return "PASS" if ok else "MISS"

    rows = []
    k = steps.get("kernels", {})
    rows.append(
        (
            "device kernels = CPU kernels",
            f"{k.get('passed', '-')}/{k.get('cases', '-')} exact",
            "all",
            verdict("kernels", k.get("passed") == k.get("cases")),
        )
    )
    fid = get("fidelity", "m3rt_fused_fp16_vs_pytorch_fp32") or {}
    rows.append(
        (
            "fused fp16 vs fp32 ref: dense cos min",
            _fmt(fid.get("dense_cos_min"), ".5f"),
            ">= 0.999",
            verdict("fidelity", fid.get("passed")),
        )
    )
    held = get("fidelity", "held_outputs_intact_across_replays")
    rows.append(
        (
            "held outputs intact across graph replays",
            _fmt(held, ""),
            "bit for bit",
            verdict("fidelity", bool(held)),
        )
    )
    rows.append(
        (
            "  ColBERT cos mean / sparse top-10",
            f"{_fmt(fid.get('colbert_cos_mean'), '.5f')} / {_fmt(fid.get('sparse_top10_overlap'), '.3f')}",
            "(reported)",
            verdict("fidelity", True),
        )
    )
    rows.append(
        (
            "device vs host post-processing",
            str(get("fidelity", "device_vs_host_postprocess_exact")),
            "exact",
            verdict("fidelity", get("fidelity", "device_vs_host_postprocess_exact")),
        )
    )
    lat = steps.get("latency", {})
    p50 = get("latency", "m3rt_cuda_graph_e2e", "p50_ms")
    rows.append(
        (
            "batch-1 16 tok e2e p50 (graph)",
            f"{_fmt(p50)} ms (p90 {_fmt(get('latency', 'm3rt_cuda_graph_e2e', 'p90_ms'))})",
            "<= 1.5 ms",
            verdict("latency", (lat.get("target") or {}).get("met")),
        )
    )
    rows.append(
        (
            "  same, no CUDA graph / reference",
            f"{_fmt(get('latency', 'm3rt_no_graph_e2e', 'p50_ms'))} / "
            f"{_fmt(get('latency', 'reference_e2e', 'p50_ms'))} ms",
            "(ref 18 ms)",
            verdict("latency", True),
        )
    )
    thr = steps.get("throughput", {})
    rows.append(
        (
            "mixed corpus, 3 outputs, vs reference",
            f"{_fmt(thr.get('ratio'))}x ({_fmt(get('throughput', 'm3rt', 'tokens_per_s'), ',.0f')} tok/s)",
            ">= 1.5x",
            verdict("throughput", (thr.get("target") or {}).get("met")),
        )
    )
    doc = steps.get("documents", {})
    rows.append(
        (
            "8192-token docs, 3 outputs",
            f"{_fmt(get('documents', 'm3rt', 'tokens_per_s'), ',.0f')} tok/s ({_fmt(doc.get('ratio'))}x ref)",
            ">= 280k tok/s",
            verdict("documents", (doc.get("target") or {}).get("met")),
        )
    )
    return rows


def write_report(run: Run) -> str:
    results = run.results
    rows = summary_rows(results)
    widths = [max(len(r[i]) for r in rows + [("check", "measured", "target", "verdict")]) for i in range(4)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    table = "\n".join(
        [line(("check", "measured", "target", "verdict")), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        + [line(r) for r in rows]
    )
    env = results.get("environment", {})
    md = [
        "# m3rt GPU check"
        + (" (DRY RUN: tiny model, ONNX Runtime CPU; no figure here is a GPU figure)" if run.dry else ""),
        "",
        f"GPU: {env.get('gpu', '-')} (compute {env.get('compute_capability', '-')}); "
        f"nvidia-smi: {env.get('nvidia_smi', '-')}",
        f"onnxruntime {env.get('onnxruntime')} ({env.get('onnxruntime_path')}), "
        f"providers {env.get('onnxruntime_providers')}; torch {env.get('torch', '-')}; "
        f"transformers {env.get('transformers')}; total {time.perf_counter() - run.start:.0f} s",
        f"Anchors: {ANCHORS}",
        "",
        table,
        "",
        "## Steps",
        "",
    ]
    for name, record in results["steps"].items():
        md.append(f"### {name}: {record['status']} ({record.get('seconds', 0)} s)")
        md.append("")
        body = {k: v for k, v in record.items() if k not in ("status", "seconds", "traceback")}
        md.append("```json\n" + json.dumps(body, indent=2, default=_jsonable)[:20000] + "\n```")
        if "traceback" in record:
            md.append("```\n" + record["traceback"][-4000:] + "\n```")
        md.append("")
    (run.out / "gpu_check.md").write_text("\n".join(md) + "\n")
    run.save()
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="results folder (small files only)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/m3rt-gpu-check"), help="checkpoint and artifact (GBs)")
    parser.add_argument(
        "--tokenizer", help="XLM-R tokenizer.json (default: ../shared/fixtures/xlm-roberta-tokenizer.json)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=330.0, help="wall-clock budget; later steps are skipped past it"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--token-budget", type=int, default=16384, help="padded tokens per batch (m3rt and reference)")
    parser.add_argument("--rebuild", action="store_true", help="re-export even when --work holds a finished export")
    parser.add_argument("--checkpoint", type=Path, help="use this BGE-M3-layout checkpoint instead of writing one")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu at the end")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: tiny model on ONNX Runtime CPU")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--pytest"]:
        import pytest

        os.chdir(REPO)
        return int(pytest.main(argv[1:]))
    args = build_parser().parse_args(argv)
    run = Run(args)
    # Device time is scarce: what needs no artifact first, then the most important figure first.
    run.step("environment", lambda: step_environment(run), 0)
    run.step("kernels", lambda: step_kernels(run), 15)
    export = run.step("export", lambda: step_export(run), 0)
    if export["status"] == "ok":
        loaded = run.step("load", lambda: step_load(run), 40)
        if loaded["status"] == "ok":
            run.step("fidelity", lambda: step_fidelity(run), 30)
            run.step("latency", lambda: step_latency(run), 40)
            run.step("documents", lambda: step_documents(run), 20)
            run.step("throughput", lambda: step_throughput(run), 40)
            run.step("profile", lambda: step_profile(run), 20)
            run.step("variants", lambda: step_variants(run), 25)
    if not args.skip_tests:
        run.step("gpu_tests", lambda: step_gpu_tests(run), 60)
    table = write_report(run)
    print()
    print(f"details: {run.out / 'gpu_check.md'}, {run.out / 'gpu_check.json'}")
    if run.dry:
        print("DRY RUN: tiny model on ONNX Runtime CPU; the figures below are not GPU figures")
    print(table)
    failed = [n for n, r in run.results["steps"].items() if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
