"""The GPU check in one run under a time budget: correctness first, then the measurements, a short table last.

On the GPU host (offline) the whole job is `python3 benchmarks/gpu_host.py --out $OUT`: it installs the
staged onnxruntime-gpu, unpacks the tokenizer and runs this check; by hand (onnxruntime-gpu unpacked
into /tmp/ortsite, see shared/gpu/README.md):

    PYTHONPATH=/tmp/ortsite python3 benchmarks/gpu_check.py --out $OUT --tokenizer /tmp/st/tokenizer.json

(with m3rt installed, or not: then it runs this checkout, laid out as installed, from --work).

Steps, in this order, each under what is left of `--budget-s`:

  environment     GPU, driver, ONNX Runtime version and providers, library versions
  export          synthetic:full checkpoint (BGE-M3's shape, random weights, real XLM-R tokenizer) ->
                  the lean serving artifact (fp32 + fused fp16 graph), in --work, not in --out; it fails
                  when ONNX Runtime's optimizer leaves any attention block unfused
  gpu_tests       `pytest -m gpu` (GPU_TESTS), the full-model module first: fused fp16 against the
                  PyTorch fp32 reference (dense, ColBERT, sparse), device against host post-processing,
                  CUDA graphs against plain runs; then the device kernels against the CPU kernels and
                  the tiny model's CUDA tests. Each test writes the figures it asserted on as it ends,
                  and the log records each outcome as it comes, so a failure or a time-out keeps them.
                  When the export failed, the device kernels' tests still run (they need no artifact).
  scenarios       `m3-bench --scenarios` (m3rt.benchmarks.scenarios): latency, documents, throughput,
                  profile, variants, with what is left of the budget; saved after each scenario

What fits (`--budget-s` 420 by default; the host job, benchmarks/gpu_host.py, keeps all of it to the
host's ~8 minutes and gives this check what is left after the onnxruntime-gpu install, ~20-40 s): on
an H100/H200 host the export takes ~80-120 s (checkpoint ~15 s, plain export and validation ~20 s,
fusion, its PyTorch check and the fp16 conversion ~60 s), the gpu tests ~100-150 s (the full-model
module ~60-90 s of it; `--scenario-reserve-s` 150 is kept back from them), the scenarios ~100-200 s
(each skipped when its need, NEEDS_S in scenarios.py, no longer fits; variants, last, converts the
plain fp16 graph first). gpu_check.json is rewritten after every step and every scenario, so what was
measured survives the host's hard limit too.

`--dry-run` (no GPU) runs the same steps on the tiny model with the scenarios on the CPU and the GPU
tests left out, so the runner itself is tested where there is no GPU (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# pyproject.toml's package-dir mapping: installed name -> folder of this checkout.
PACKAGE_DIRS = {"export": "export", "benchmarks": "benchmarks"}


def _checkout_on_path(work: Path) -> Path:
    """`m3rt` from this checkout without installing it (the GPU host's setuptools may be too old for an
    editable install): the installed layout as symlinks in `work`, for PYTHONPATH, so that the pytest
    subprocess sees it too."""
    root = work / "m3rt-src"
    package = root / "m3rt"
    package.mkdir(parents=True, exist_ok=True)
    links = {entry.name: entry for entry in (REPO / "runtime").iterdir()}
    links.update({name: REPO / folder for name, folder in PACKAGE_DIRS.items()})
    for name, target in links.items():
        link = package / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return root


class StepFailed(RuntimeError):
    """A step's failure that keeps what the step produced before it failed (its figures)."""

    def __init__(self, message: str, partial: dict[str, Any]) -> None:
        super().__init__(message)
        self.partial = partial


class Run:
    """The configuration and the results; runs steps under the time budget and saves after each."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.perf_counter()
        self.out, self.work = Path(args.out), Path(args.work)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.dry = bool(args.dry_run)
        self.results: dict[str, Any] = {"steps": {}, "dry_run": self.dry}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def step(self, name: str, fn: Callable[[], dict[str, Any] | None], needs_s: float) -> dict[str, Any]:
        if self.left() < needs_s:
            record: dict[str, Any] = {"status": "skipped", "reason": f"time guard: {self.left():.0f} s left"}
        else:
            print(f"[{time.perf_counter() - self.start:6.1f} s] {name} ...", flush=True)
            t = time.perf_counter()
            try:
                record = {"status": "ok", **(fn() or {})}
            except Exception as exc:  # one failure must not lose the other steps
                record = {
                    "status": "failed",
                    **getattr(exc, "partial", {}),  # what the step had measured before it failed
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                }
            record["seconds"] = round(time.perf_counter() - t, 2)
        self.results["steps"][name] = record
        detail = record.get("reason") or record.get("error") or ""
        print(f"[{time.perf_counter() - self.start:6.1f} s] {name}: {record['status']} {detail[:300]}", flush=True)
        self.save()
        return record

    def save(self) -> None:
        # Replaced whole, never half-written: the host may kill this process at any moment.
        partial = self.out / "gpu_check.json.part"
        partial.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        os.replace(partial, self.out / "gpu_check.json")


def step_environment(run: Run) -> dict[str, Any]:
    if not run.dry:
        import torch  # noqa: F401  - first: it loads the CUDA libraries onnxruntime-gpu links against
    import onnxruntime as ort

    from m3rt.backends.onnxruntime_cuda import cuda_unavailable_reason
    from m3rt.benchmarks.machine import machine_description

    env = machine_description()
    env["onnxruntime_path"] = str(Path(ort.__file__).parent)
    env["onnxruntime_providers"] = ort.get_available_providers()
    env["ort_cuda_unavailable_reason"] = cuda_unavailable_reason()
    if env["ort_cuda_unavailable_reason"] is None:
        from m3rt.kernels.cuda_api import device_description

        env.update(device_description(0))
    if not run.dry:  # seconds here rather than a failed session after the export's minutes
        env["cuda_session_smoke_test"] = cuda_session_smoke_test()
    return env


def cuda_session_smoke_test() -> dict[str, Any]:
    """A one-node graph (y = x + x) in a session that asks for CUDA: which providers it got, its result."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "smoke",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION, 10)
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
        x = np.arange(4, dtype=np.float32)
        (y,) = session.run(None, {"x": x})
        return {"providers": session.get_providers(), "correct": bool(np.array_equal(y, x + x))}
    except Exception as exc:  # noqa: BLE001 - recorded: it is what this test is for
        return {"error": f"{type(exc).__name__}: {exc}"}


def _tokenizer_path(run: Run) -> Path | None:
    for candidate in (run.args.tokenizer, REPO.parent / "shared/fixtures/xlm-roberta-tokenizer.json"):
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
    checkpoint = Path(run.args.checkpoint) if run.args.checkpoint else run.work / f"ckpt-{size}"
    artifact = run.work / f"artifact-{size}"
    run.results.update(checkpoint=str(checkpoint), artifact=str(artifact))
    reused = (artifact / "m3rt.json").is_file() and (checkpoint / "config.json").is_file() and not run.args.rebuild
    if reused:
        reused = load_manifest(artifact, verify=False).has_graph("fp16-fused")
    if not reused:
        if not run.args.checkpoint:
            write_synthetic_checkpoint(checkpoint, size=size, seed=0, tokenizer=tokenizer)
        # Lean: the fused graph with its fp32 check against PyTorch; its fp16 fidelity is measured on
        # the GPU by the gpu tests, not on the CPU here.
        export_artifact(
            ExportOptions(model=str(checkpoint), output=artifact, force=True, fused=True, fused_cpu_fidelity=False)
        )
    manifest = load_manifest(artifact, verify=False)
    fused = manifest.graph("fp16-fused")
    return {
        "reused_previous_export": reused,
        "export_timings": manifest.timings,
        "model": {k: getattr(manifest.model, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "fused_operators": fused.details["optimizer"]["fused_operators"],
        "fused_fp32_vs_pytorch": (fused.validation or {}).get("heads"),
    }


# The test modules with `gpu` tests, in the order they run: the full-model module first (the headline
# figures), then the kernels and the tiny model's CUDA tests. Collecting only these keeps the host's
# missing test-only packages (FlagEmbedding) from failing the collection.
GPU_TESTS = ("tests/test_gpu_full_model.py", "tests/test_cuda_kernels.py", "tests/test_cuda_backend.py")
KERNEL_TESTS = ("tests/test_cuda_kernels.py",)
_OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def test_outcomes(log: str) -> dict[str, str]:
    """Each test's outcome from `pytest -v`'s lines, as far as the log goes."""
    return {m.group(1): m.group(2) for m in map(_OUTCOME.match, log.splitlines()) if m}


def step_gpu_tests(run: Run, modules: tuple[str, ...] = GPU_TESTS, timeout_s: float | None = None) -> dict[str, Any]:
    figures = run.out / "gpu_test_figures"
    env = {
        **os.environ,
        "M3RT_GPU_ARTIFACT": run.results.get("artifact", ""),
        "M3RT_GPU_CHECKPOINT": run.results.get("checkpoint", ""),
        "M3RT_GPU_FIGURES": str(figures),
        "M3RT_TEST_FAILURES": str(run.out / "gpu_test_failures.jsonl"),
        "PYTHONUNBUFFERED": "1",
    }
    report, log = run.out / "gpu_tests.xml", run.out / "gpu_tests.log"
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={report}"]
    cmd += ["-p", "m3rt.benchmarks.gpu_pytest_plugin"]  # torch first; each failure's report as it happens
    # This run's figures and failures only, whatever an earlier run left in --out.
    shutil.rmtree(figures, ignore_errors=True)
    Path(env["M3RT_TEST_FAILURES"]).unlink(missing_ok=True)
    timeout = max(30.0, run.left() - run.args.scenario_reserve_s) if timeout_s is None else timeout_s
    # The log goes to a file as it is written: a test run killed at its time-out keeps what it said.
    with log.open("w") as sink:
        try:
            code: int | None = subprocess.run(
                [*cmd, *modules], cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
            problem = None if code in (0, 5) else f"pytest -m gpu failed ({code})"  # 5: nothing collected
        except subprocess.TimeoutExpired:
            code, problem = None, f"pytest -m gpu timed out after {timeout:.0f} s"
    text = log.read_text(errors="replace")
    out: dict[str, Any] = {"returncode": code, "tail": text[-4000:], "outcomes": test_outcomes(text), "figures": {}}
    for file in sorted(figures.glob("*.json")) if figures.is_dir() else ():
        out["figures"][file.stem] = json.loads(file.read_text())
    failures = Path(env["M3RT_TEST_FAILURES"])
    if failures.is_file():
        out["failed_tests"] = [json.loads(line) for line in failures.read_text().splitlines() if line.strip()]
    out.update(_junit_counts(report) if code is not None else _counts(out["outcomes"]))
    if problem:
        raise StepFailed(f"{problem}: {text[-1500:]}", out)
    return out


def _counts(outcomes: dict[str, str]) -> dict[str, int]:
    values = list(outcomes.values())
    return {
        "tests": len(values),
        "failures": values.count("FAILED"),
        "errors": values.count("ERROR"),
        "skipped": values.count("SKIPPED"),
    }


def _junit_counts(report: Path) -> dict[str, int]:
    if not report.is_file():
        return {}
    import xml.etree.ElementTree as ET

    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} if suite is not None else {}


def step_scenarios(run: Run) -> dict[str, Any]:
    from m3rt.benchmarks.scenarios import SCENARIOS, load_setup, run_scenarios

    device = "cpu" if run.dry else "cuda"
    setup = load_setup(
        Path(run.results["artifact"]), Path(run.results["checkpoint"]), device, 256, 16384, work=run.work / "variants"
    )
    done: dict[str, Any] = {}

    def keep(name: str, record: dict[str, Any]) -> None:  # saved as it comes: a killed run keeps it
        done[name] = record
        run.results["steps"]["scenarios"] = {"status": "running", **done}
        run.save()

    try:
        return run_scenarios(setup, list(SCENARIOS), run.left(), on_result=keep)
    except Exception as exc:
        raise StepFailed(f"{type(exc).__name__}: {exc}", done) from exc
    finally:
        setup.model.close()


def summary(run: Run) -> str:
    from m3rt.benchmarks.scenarios import summary_rows, table

    steps = run.results["steps"]
    tests = steps.get("gpu_tests", {})
    fid = tests.get("figures", {}).get("fused_fp16_vs_pytorch_fp32", {})

    def figure(key: str) -> str:
        return f"{fid[key]:.5f}" if key in fid else "-"

    status = tests.get("status", "not run")
    smoke = steps.get("environment", {}).get("cuda_session_smoke_test")
    rows = []
    if smoke is not None:
        cuda = smoke.get("providers", [""])[0] == "CUDAExecutionProvider" and smoke.get("correct")
        got = ", ".join(smoke.get("providers", [])) or smoke.get("error", "-")[:60]
        rows.append(("ONNX Runtime session on CUDA", got, "CUDAExecutionProvider", "PASS" if cuda else "FAIL"))
    rows += [
        (
            "pytest -m gpu",
            f"{tests.get('tests', '-')} run, {tests.get('failures', '-')} failed, {tests.get('skipped', '-')} skipped",
            "none failed",
            "PASS" if status == "ok" else status.upper(),
        ),
        ("fused fp16 vs PyTorch fp32: dense cos min", figure("dense_cos_min"), ">= 0.999", "(asserted by the tests)"),
        (
            "fused fp16 vs PyTorch fp32: ColBERT cos mean / min",
            f"{figure('colbert_cos_mean')} / {figure('colbert_cos_min')}",
            ">= 0.999 / >= 0.99",
            "(asserted by the tests)",
        ),
        ("fused fp16 vs PyTorch fp32: sparse top-10 overlap", figure("sparse_top10_overlap"), ">= 0.9", "(asserted)"),
    ]
    rows += summary_rows(steps.get("scenarios", {}), on_gpu=not run.dry)
    return table(rows, ("check", "measured", "target", "verdict"))


def write_report(run: Run, killed: bool = False) -> str:
    """gpu_check.md: the short table, and what kind of run it comes from."""
    text = summary(run)
    title = "# m3rt GPU check"
    if run.dry:
        title += " (DRY RUN: tiny model on the CPU; no figure here is a GPU figure)"
    if killed:
        title += " (killed before its end: what gpu_check.json had saved by then)"
    (run.out / "gpu_check.md").write_text(f"{title}\n\n{text}\n\nDetails: gpu_check.json\n")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="results folder (small files only)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/m3rt-gpu-check"), help="checkpoint and artifact (GBs)")
    parser.add_argument(
        "--tokenizer", help="XLM-R tokenizer.json (default: ../shared/fixtures/xlm-roberta-tokenizer.json)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="wall-clock budget; what no longer fits is skipped"
    )
    parser.add_argument("--scenario-reserve-s", type=float, default=150.0, help="kept for the scenarios by the tests")
    parser.add_argument("--rebuild", action="store_true", help="re-export even when --work holds a finished export")
    parser.add_argument("--checkpoint", type=Path, help="use this BGE-M3-layout checkpoint instead of writing one")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: tiny model, scenarios on the CPU, no gpu tests")
    parser.add_argument("--report-only", action="store_true", help="only write gpu_check.md from gpu_check.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("m3rt") is None:
        root = _checkout_on_path(Path(args.work))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv])
    run = Run(args)
    if args.report_only:  # the table of a run that was killed before it wrote one
        run.results = json.loads((run.out / "gpu_check.json").read_text())
        run.dry = bool(run.results.get("dry_run"))
        print(write_report(run, killed=True))
        return 0
    run.step("environment", lambda: step_environment(run), 0)
    export = run.step("export", lambda: step_export(run), 0)
    if run.dry:
        run.results["steps"]["gpu_tests"] = {"status": "skipped", "reason": "dry run: no GPU"}
    elif export["status"] == "ok":
        run.step("gpu_tests", lambda: step_gpu_tests(run), 30)
    else:  # the device kernels need no artifact: their tests still tell something about this GPU
        run.step("gpu_tests", lambda: step_gpu_tests(run, KERNEL_TESTS), 30)
    if export["status"] == "ok":
        run.step("scenarios", lambda: step_scenarios(run), 20 if not run.dry else 0)
    text = write_report(run)
    run.save()
    print()
    if run.dry:
        print("DRY RUN: tiny model on the CPU; the figures below are not GPU figures")
    print(text)
    steps = run.results["steps"]
    failed = [name for name, record in steps.items() if record["status"] == "failed"]
    failed += [
        name
        for name, record in steps.get("scenarios", {}).items()
        if isinstance(record, dict) and record.get("status") == "failed"
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
