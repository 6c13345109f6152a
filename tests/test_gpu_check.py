"""benchmarks/gpu_check.py --dry-run and `m3-bench --scenarios` on the CPU, on the tiny model.

The GPU run itself happens on the GPU host; this keeps the runner and the scenarios from breaking in
between. What the scenarios measure is checked for consistency, not for speed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

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
    for name in ("latency", "documents", "throughput", "profile", "variants"):
        assert scenarios[name]["status"] == "ok", (name, scenarios[name])
    # The lean export has no plain fp16 graph: the variants scenario converted one into the work folder.
    variants = scenarios["variants"]
    assert (work / "variants" / "model.fp16.onnx").is_file() and variants["long"] == "2x256"
    for row in (variants["4x64"], variants["2x256"]):
        ratio = row["fused_fp16_tokens_per_s"] / row["plain_fp16_tokens_per_s"]
        assert row["fused_over_plain"] == pytest.approx(ratio) and row["plain_fp16_tokens_per_s"] > 0
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


FAKE_GPU_TESTS = '''
import json, os, time
from pathlib import Path
import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _record(name, figures):
    folder = Path(os.environ["M3RT_GPU_FIGURES"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(figures))


def test_measures_and_passes():
    _record("first", {"dense_cos_min": 0.9995})


def test_measures_and_fails():
    _record("second", {"colbert_cos_mean": 0.5})
    assert False, "below the gate"


def test_hangs():
    time.sleep(__SLEEP__)
'''


@pytest.mark.parametrize("hang_s", [0, 60])
def test_a_failing_or_timed_out_gpu_test_step_keeps_every_figure(tmp_path, hang_s):
    module = tmp_path / "fake_gpu_tests.py"
    module.write_text(FAKE_GPU_TESTS.replace("__SLEEP__", str(hang_s)))
    out = tmp_path / "out"
    run = gpu_check.Run(gpu_check.build_parser().parse_args(["--out", str(out), "--work", str(tmp_path / "w")]))
    run.results.update(artifact="unused", checkpoint="unused")
    run.step("gpu_tests", lambda: gpu_check.step_gpu_tests(run, (str(module),), timeout_s=20), needs_s=0)
    saved = json.loads((out / "gpu_check.json").read_text())["steps"]["gpu_tests"]
    assert saved["status"] == "failed"
    assert saved["figures"] == {"first": {"dense_cos_min": 0.9995}, "second": {"colbert_cos_mean": 0.5}}
    outcomes = {name.split("::")[-1]: outcome for name, outcome in saved["outcomes"].items()}
    assert outcomes["test_measures_and_passes"] == "PASSED" and outcomes["test_measures_and_fails"] == "FAILED"
    if hang_s:
        assert "timed out after 20 s" in saved["error"] and "test_hangs" not in outcomes
        assert saved["returncode"] is None and saved["failures"] == 1
    else:
        assert outcomes["test_hangs"] == "PASSED" and saved["returncode"] == 1 and saved["failures"] == 1
    # The failure's report was written when it happened, not at the end a killed run never reaches.
    (failed,) = saved["failed_tests"]
    assert failed["test"].endswith("test_measures_and_fails") and "below the gate" in failed["report"]


def test_the_full_model_gate_catches_colbert_and_sparse_defects_the_dense_gate_misses(tiny_model, texts):
    """The full-size gate (tests/test_gpu_full_model.py) on real outputs of the tiny model: identical
    outputs pass; ColBERT vectors shifted by one token (an off-by-one in the compaction) or sparse
    weights losing their smaller tokens pass the dense-only gate and fail this one."""
    from test_gpu_full_model import below_limits

    from m3rt.fidelity import DEFAULT_GATES, compare_outputs

    out = tiny_model.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert below_limits(compare_outputs(out, out)) == []
    shifted = {**out, "colbert_vecs": [np.roll(v, 1, axis=0) for v in out["colbert_vecs"]]}
    halves = [dict(sorted(w.items(), key=lambda kv: -kv[1])[: len(w) // 2]) for w in out["lexical_weights"]]
    thinned = {**out, "lexical_weights": halves}
    for broken, metric in ((shifted, "colbert_cos"), (thinned, "sparse_jaccard")):
        figures = compare_outputs(broken, out)
        assert not DEFAULT_GATES["fp16"].failures(figures)  # dense alone sees nothing wrong
        assert any(failure.startswith(metric) for failure in below_limits(figures)), figures
