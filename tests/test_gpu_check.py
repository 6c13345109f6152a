"""benchmarks/gpu_check.py --dry-run and `m3-bench --scenarios` on the CPU, on the tiny model.

The GPU run itself happens on the GPU host; this keeps the runner and the scenarios from breaking in
between. What the scenarios measure is checked for consistency, not for speed.
"""

from __future__ import annotations

import json

from m3rt.benchmarks import bench, gpu_check


def test_dry_run_runs_every_cpu_step_and_writes_the_report(tiny, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    code = gpu_check.main(["--dry-run", "--out", str(out), "--work", str(work), "--checkpoint", str(tiny[0])])
    printed = capsys.readouterr().out
    assert code == 0, printed
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert list(steps) == ["environment", "export", "gpu_tests", "scenarios"]
    assert steps["gpu_tests"]["status"] == "skipped"
    assert steps["export"]["fused_operators"]["Attention"] == 2
    scenarios = steps["scenarios"]
    for name in ("latency", "documents", "throughput", "profile"):
        assert scenarios[name]["status"] == "ok", (name, scenarios[name])
    assert scenarios["variants"]["status"] == "skipped"  # the fused graph is CUDA-only
    assert scenarios["latency"]["tokens"] == [16]
    profile = scenarios["profile"]
    assert profile["tokens"] <= profile["padded_tokens"] and profile["postprocess_s"] > 0
    assert scenarios["throughput"]["m3rt"]["tokens"] == scenarios["throughput"]["reference"]["tokens"]
    # The short table comes last, and a dry run gives no verdict on GPU targets.
    assert printed.rstrip().splitlines()[-1].startswith("| fused over plain fp16")
    assert "PASS" not in printed and "MISS" not in printed and "DRY RUN" in printed
    assert (out / "gpu_check.md").read_text().startswith("# m3rt GPU check (DRY RUN")


def test_time_guard_skips_what_no_longer_fits(tmp_path):
    args = gpu_check.build_parser().parse_args(["--dry-run", "--out", str(tmp_path), "--budget-s", "0"])
    run = gpu_check.Run(args)
    record = run.step("late", lambda: {"ran": True}, needs_s=1)
    assert record["status"] == "skipped" and "time guard" in record["reason"]
    failing = run.step("broken", lambda: 1 / 0, needs_s=-1e9)
    assert failing["status"] == "failed" and "ZeroDivisionError" in failing["error"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["broken"]["status"] == "failed"


def test_m3_bench_runs_scenarios_on_the_cpu(tiny, tmp_path, capsys):
    out = tmp_path / "bench"
    code = bench.main([str(tiny[1]), "--scenarios", "latency,variants", "--device", "cpu", "-o", str(out)])
    assert code == 0
    report = json.loads((out / "scenarios.json").read_text())
    assert report["device"] == "cpu" and list(report["scenarios"]) == ["latency", "variants"]
    latency = report["scenarios"]["latency"]
    assert latency["status"] == "ok" and latency["m3rt_e2e"]["n"] > 0 and latency["reference_e2e"]["n"] > 0
    assert "| batch-1 16 tok e2e p50" in capsys.readouterr().out


def test_the_gpu_check_runs_every_module_with_gpu_tests():
    from pathlib import Path

    tests = Path(__file__).parent
    with_gpu_tests = {
        f"tests/{p.name}"
        for p in tests.glob("test_*.py")
        if p.name != Path(__file__).name and "pytest.mark.gpu" in p.read_text(encoding="utf-8")
    }
    assert with_gpu_tests == set(gpu_check.GPU_TESTS)
