"""The GPU check in one run under a time budget: correctness first, then the measurements, a short table last.

On the GPU host (offline; onnxruntime-gpu unpacked into /tmp/ortsite, see shared/gpu/README.md):

    PYTHONPATH=/tmp/ortsite python3 benchmarks/gpu_check.py --out $OUT \\
        --tokenizer ../shared/fixtures/xlm-roberta-tokenizer.json

(with m3rt installed, or not: then it runs this checkout, laid out as installed, from --work).

It only runs what lives elsewhere:

  environment   GPU, driver, ONNX Runtime version and providers, library versions
  export        synthetic:full checkpoint (BGE-M3's shape, random weights, real XLM-R tokenizer) ->
                the lean serving artifact (fp32 + fused fp16 graph), in --work, not in --out
  gpu_tests     `pytest -m gpu` (GPU_TESTS) pointed at that artifact: the device kernels against the CPU
                kernels, ONNX Runtime CUDA against the PyTorch fp32 reference and against the CPU, device
                against host post-processing, CUDA graphs against plain runs (tests/test_gpu_*.py,
                test_cuda_*.py); the figures they assert on come back for the table
  scenarios     `m3-bench --scenarios` (m3rt.benchmarks.scenarios): latency, documents, throughput,
                profile, variants, with what is left of the budget

`--dry-run` (no GPU) runs the same steps on the tiny model with the scenarios on the CPU and the GPU
tests left out, so the runner itself is tested where there is no GPU (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
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
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")


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
    return env


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


# The test modules with `gpu` tests (collecting only these keeps the host's missing test-only packages,
# e.g. FlagEmbedding, from failing the collection).
GPU_TESTS = ("tests/test_cuda_kernels.py", "tests/test_cuda_backend.py", "tests/test_gpu_full_model.py")


def step_gpu_tests(run: Run) -> dict[str, Any]:
    figures = run.out / "gpu_test_figures"
    env = {
        **os.environ,
        "M3RT_GPU_ARTIFACT": run.results["artifact"],
        "M3RT_GPU_CHECKPOINT": run.results["checkpoint"],
        "M3RT_GPU_FIGURES": str(figures),
    }
    report = run.out / "gpu_tests.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
        *GPU_TESTS,
    ]
    timeout = max(30.0, run.left() - run.args.scenario_reserve_s)
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as exc:
        code, tail = None, f"timed out after {timeout:.0f} s: {str(exc.stdout or '')[-3000:]}"
    out: dict[str, Any] = {"returncode": code, "tail": tail, "figures": {}}
    for file in sorted(figures.glob("*.json")) if figures.is_dir() else ():
        out["figures"][file.stem] = json.loads(file.read_text())
    out.update(_junit_counts(report))
    if code not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest -m gpu failed ({code}): {tail[-1500:]}")
    return out


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
    setup = load_setup(Path(run.results["artifact"]), Path(run.results["checkpoint"]), device, 256, 16384)
    try:
        return run_scenarios(setup, list(SCENARIOS), run.left())
    finally:
        setup.model.close()


def summary(run: Run) -> str:
    from m3rt.benchmarks.scenarios import summary_rows, table

    steps = run.results["steps"]
    tests = steps.get("gpu_tests", {})
    fid = tests.get("figures", {}).get("fused_fp16_vs_pytorch_fp32", {})
    rows = [
        (
            "pytest -m gpu",
            f"{tests.get('tests', '-')} run, {tests.get('failures', '-')} failed, {tests.get('skipped', '-')} skipped",
            "none failed",
            tests.get("status", "not run").upper() if tests.get("status") != "ok" else "PASS",
        ),
        (
            "fused fp16 vs PyTorch fp32: dense cos min",
            f"{fid['dense_cos_min']:.5f}" if "dense_cos_min" in fid else "-",
            ">= 0.999",
            "(asserted by the tests)",
        ),
    ]
    rows += summary_rows(steps.get("scenarios", {}), on_gpu=not run.dry)
    return table(rows, ("check", "measured", "target", "verdict"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="results folder (small files only)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/m3rt-gpu-check"), help="checkpoint and artifact (GBs)")
    parser.add_argument(
        "--tokenizer", help="XLM-R tokenizer.json (default: ../shared/fixtures/xlm-roberta-tokenizer.json)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=330.0, help="wall-clock budget; what no longer fits is skipped"
    )
    parser.add_argument("--scenario-reserve-s", type=float, default=150.0, help="kept for the scenarios by the tests")
    parser.add_argument("--rebuild", action="store_true", help="re-export even when --work holds a finished export")
    parser.add_argument("--checkpoint", type=Path, help="use this BGE-M3-layout checkpoint instead of writing one")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: tiny model, scenarios on the CPU, no gpu tests")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("m3rt") is None:
        root = _checkout_on_path(Path(args.work))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv])
    run = Run(args)
    run.step("environment", lambda: step_environment(run), 0)
    export = run.step("export", lambda: step_export(run), 0)
    if export["status"] == "ok":
        if run.dry:
            run.results["steps"]["gpu_tests"] = {"status": "skipped", "reason": "dry run: no GPU"}
        else:
            run.step("gpu_tests", lambda: step_gpu_tests(run), 30)
        run.step("scenarios", lambda: step_scenarios(run), 20 if not run.dry else 0)
    text = summary(run)
    (run.out / "gpu_check.md").write_text(
        "# m3rt GPU check" + (" (DRY RUN: tiny model on the CPU; no figure here is a GPU figure)" if run.dry else "")
        + "\n\n" + text + "\n\nDetails: gpu_check.json\n"
    )  # fmt: skip
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
