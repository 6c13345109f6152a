"""benchmarks/gpu_check.py --dry-run: every step that can run without a GPU, on the tiny model.

The GPU run itself happens on the H100 host; this keeps the script from breaking in between.
"""

from __future__ import annotations

import json

from m3rt.benchmarks import gpu_check


def test_dry_run_runs_every_cpu_step_and_writes_the_report(tiny, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    code = gpu_check.main(["--dry-run", "--out", str(out), "--work", str(work), "--checkpoint", str(tiny[0])])
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads((out / "gpu_check.json").read_text())
    steps = results["steps"]
    for name in ("environment", "export", "load", "fidelity", "latency", "throughput", "documents", "profile"):
        assert steps[name]["status"] == "ok", (name, steps[name])
    assert list(steps)[:3] == ["environment", "kernels", "export"]  # no artifact needed first
    for name in ("kernels", "variants", "gpu_tests"):
        assert steps[name]["status"] == "skipped"
    assert steps["export"]["fused_operators"]["Attention"] == 2
    assert steps["fidelity"]["device_vs_host_postprocess_exact"] is True
    assert steps["fidelity"]["held_outputs_intact_across_replays"] is True
    assert "fused_fp16_vs_fp32_on_ort_cpu" not in steps["export"]  # lean: nothing measured for the CPU
    assert steps["fidelity"]["m3rt_fused_fp16_vs_pytorch_fp32"]["passed"]
    assert steps["latency"]["tokens"] == [16]
    assert steps["profile"]["h2d_bytes"] > 0 and steps["profile"]["postprocess_s"] > 0
    # The short table comes last, and a dry run gives no verdict on GPU targets.
    assert printed.rstrip().splitlines()[-1].startswith("| 8192-token docs")
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
