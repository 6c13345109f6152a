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
    # The headline figures first: a run cut short by its budget loses the tiny model's tests, not them.
    assert gpu_check.GPU_TESTS[0] == "tests/test_gpu_full_model.py"
    assert set(gpu_check.KERNEL_TESTS) < set(gpu_check.GPU_TESTS)


FAKE_GPU_TESTS = """
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
"""


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


# ---------------------------------------------------------------------- the GPU host's job (gpu_host.py)

PROBE = "m3rt_staged_probe"


def _wheel(folder, version: str = "1.31.1"):
    """A small real wheel (pip installs it) with a random payload, so that its parts differ."""
    import base64
    import hashlib
    import os
    import zipfile

    info = f"{PROBE}-{version}.dist-info"
    files = {
        f"{PROBE}/__init__.py": f"__version__ = {version!r}\n".encode(),
        f"{PROBE}/payload.bin": os.urandom(200_003),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for name, data in files.items()
    ]
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    wheel = folder / f"{PROBE}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


def _stage(tmp_path, tokenizer_bytes: bytes):
    """What split-onnxruntime-gpu.sh stages, made the same way (split -n 6 -d -a 1, xz, sha256)."""
    import hashlib
    import lzma
    import shutil
    import subprocess

    wheel = _wheel(tmp_path)
    staged = tmp_path / "st"
    staged.mkdir()
    if shutil.which("split"):
        subprocess.run(["split", "-n", "6", "-d", "-a", "1", str(wheel), str(staged / "p")], check=True)
    else:
        data = wheel.read_bytes()
        size = len(data) // 6
        for k in range(6):
            (staged / f"p{k}").write_bytes(data[k * size : (k + 1) * size if k < 5 else len(data)])
    (staged / "wheel.sha256").write_text(hashlib.sha256(wheel.read_bytes()).hexdigest() + "\n")
    (staged / "tokenizer.json.xz").write_bytes(lzma.compress(tokenizer_bytes, preset=9))
    assert sorted(p.name for p in staged.glob("p*")) == [f"p{k}" for k in range(6)]
    return wheel, staged


def _host_args(tmp_path, wheel, staged, *extra):
    return [
        "--out", str(tmp_path / "OUT"), "--staged", str(staged), "--wheel", wheel.name,
        "--wheel-dir", str(tmp_path / "assembled"), "--module", PROBE, "--site", str(tmp_path / "site"),
        "--work", str(tmp_path / "work"), *extra,
    ]  # fmt: skip


def test_the_host_job_installs_the_staged_parts_and_runs_the_dry_check(tiny, tmp_path):
    import tarfile

    from m3rt.benchmarks import gpu_host

    tokenizer = (tiny[0] / "tokenizer.json").read_bytes()
    wheel, staged = _stage(tmp_path, tokenizer)
    # As on the host: the last transfer's files (p5, the checksum, the tokenizer) arrive with the job.
    carried = tmp_path / ".ortgpu"
    carried.mkdir()
    for name in ("p5", "wheel.sha256", "tokenizer.json.xz"):
        (staged / name).rename(carried / name)
    args = _host_args(tmp_path, wheel, staged, "--collect", str(carried), "--dry-run", "--deadline-s", "400")
    args += ["--", "--checkpoint", str(tiny[0])]
    assert gpu_host.main(args) == 0
    out = tmp_path / "OUT"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "gpu_results.tar.gz", "host.log"]
    log = (out / "host.log").read_text()
    assert "matches wheel.sha256" in log and f"{PROBE} 1.31.1 from {tmp_path / 'site'}" in log
    assert (tmp_path / "assembled" / wheel.name).read_bytes() == wheel.read_bytes()
    assert (staged / "tokenizer.json").read_bytes() == tokenizer
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and report["steps"]["export"]["status"] == "ok"
    assert "--budget-s" in log and "DRY RUN" in (out / "gpu_check.md").read_text()
    with tarfile.open(out / "gpu_results.tar.gz") as archive:
        assert "gpu_results/gpu_check.json" in archive.getnames()
    # The same wheel again (a second run on a warm host): not reinstalled.
    job = gpu_host.Job(gpu_host.build_parser().parse_args(_host_args(tmp_path, wheel, staged)))
    digest = gpu_host.sha256(wheel)
    assert gpu_host.install(wheel, tmp_path / "site", PROBE, digest, job).startswith(f"{PROBE} 1.31.1")
    job.close()
    assert "already holds this wheel" in (out / "host.log").read_text()


@pytest.mark.parametrize("damage", ["byte_flipped", "part_missing", "part_extra", "tokenizer_not_xz"])
def test_damaged_staging_fails_before_the_check_with_a_clear_log(tmp_path, damage):
    from m3rt.benchmarks import gpu_host

    wheel, staged = _stage(tmp_path, b'{"model": {}}')
    if damage == "byte_flipped":
        data = bytearray((staged / "p3").read_bytes())
        data[100] ^= 0xFF
        (staged / "p3").write_bytes(bytes(data))
    elif damage == "part_missing":
        (staged / "p4").unlink()
    elif damage == "part_extra":
        (staged / "p6").write_bytes(b"x")
    else:
        (staged / "tokenizer.json.xz").write_bytes(b'{"model": {}}')
    assert gpu_host.main(_host_args(tmp_path, wheel, staged)) == 2
    log = (tmp_path / "OUT" / "host.log").read_text()
    expected = {
        "byte_flipped": "wheel.sha256 says",
        "part_missing": "staged parts missing",
        "part_extra": "parts beyond p5: p6",
        "tokenizer_not_xz": "is not an xz-compressed tokenizer.json",
    }[damage]
    assert "staging failed: " in log and expected in log, log
    assert not (tmp_path / "OUT" / "gpu_check.json").exists()
    assert (tmp_path / "site").exists() == (damage == "tokenizer_not_xz")  # installed only from a good wheel


def test_a_failed_export_still_runs_the_kernel_tests_and_no_scenario(tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "no-such-checkpoint"
    argv = ["--out", str(out), "--work", str(tmp_path / "work"), "--checkpoint", str(missing), "--budget-s", "300"]
    assert gpu_check.main(argv) == 1
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert steps["export"]["status"] == "failed" and "scenarios" not in steps
    # The CUDA smoke test says what a session asking for CUDA got: here, the CPU build's CPU provider.
    smoke = steps["environment"]["cuda_session_smoke_test"]
    assert smoke == {"providers": ["CPUExecutionProvider"], "correct": True}
    assert "| ONNX Runtime session on CUDA" in capsys.readouterr().out.split("| check")[1]
    tests = steps["gpu_tests"]
    assert tests["status"] == "ok", tests.get("error")  # here every kernel test skips: no GPU
    assert tests["outcomes"] and all(name.startswith("tests/test_cuda_kernels.py::") for name in tests["outcomes"])


def test_a_check_killed_before_its_end_still_gets_its_table_from_the_saved_figures(tmp_path):
    from m3rt.benchmarks import gpu_host

    job = gpu_host.Job(gpu_host.build_parser().parse_args(["--out", str(tmp_path / "OUT"), "--work", str(tmp_path)]))
    job.results.mkdir(parents=True)
    saved = {  # what gpu_check.json holds when the host's limit kills the check during the scenarios
        "dry_run": False,
        "steps": {
            "gpu_tests": {
                "status": "ok", "tests": 30, "failures": 0, "skipped": 1,
                "figures": {"fused_fp16_vs_pytorch_fp32": {"dense_cos_min": 0.99931, "colbert_cos_mean": 0.99975,
                                                            "colbert_cos_min": 0.9961, "sparse_top10_overlap": 0.98}},
            },
            "scenarios": {"status": "running", "latency": {"status": "ok", "m3rt_e2e": {"p50_ms": 0.93},
                                                           "target": {"met": True}}},
        },
    }  # fmt: skip
    (job.results / "gpu_check.json").write_text(json.dumps(saved))
    assert gpu_host.pack(job) == ["gpu_check.md", "gpu_check.json", "gpu_results.tar.gz"]
    job.close()
    table = (tmp_path / "OUT" / "gpu_check.md").read_text()
    assert "killed before its end" in table and "DRY RUN" not in table
    assert "0.99931" in table and "0.99975 / 0.99610" in table and "0.98000" in table
    assert "| batch-1 16 tok e2e p50" in table and "0.93 ms" in table and "PASS" in table


FAKE_CHECK = """
import json, subprocess, sys, time
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--out") + 1])
if "--report-only" in sys.argv:
    (out / "gpu_check.md").write_text("table from " + (out / "gpu_check.json").read_text())
    sys.exit(0)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
(out / "child.pid").write_text(str(child.pid))
(out / "gpu_check.json").write_text(json.dumps({"steps": {"export": {"status": "ok"}}}))
print("exported", flush=True)
time.sleep(300)
"""


def test_a_check_past_its_deadline_is_killed_with_all_it_started_and_its_results_packed(tmp_path, monkeypatch):
    import os
    import time

    from m3rt.benchmarks import gpu_host

    fake_repo = tmp_path / "repo"
    (fake_repo / "benchmarks").mkdir(parents=True)
    (fake_repo / "benchmarks" / "gpu_check.py").write_text(FAKE_CHECK)
    monkeypatch.setattr(gpu_host, "REPO", fake_repo)
    monkeypatch.setattr(gpu_host, "MIN_CHECK_S", 1.0)
    args = ["--out", str(tmp_path / "OUT"), "--work", str(tmp_path / "work"), "--deadline-s", "4"]
    job = gpu_host.Job(gpu_host.build_parser().parse_args([*args, "--pack-reserve-s", "0", "--grace-s", "1"]))
    start = time.monotonic()
    assert gpu_host.run_check(job, tmp_path / "site", None) == 124
    assert time.monotonic() - start < 30
    child = int((job.results / "child.pid").read_text())
    for _ in range(50):  # reaped by init once killed; gone from the process table soon after
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with open(f"/proc/{child}/stat") as stat:
            assert stat.read().split()[2] == "Z", "the check's own child survived it"
    assert gpu_host.pack(job) == ["gpu_check.md", "gpu_check.json", "gpu_results.tar.gz"]
    job.close()
    assert (tmp_path / "OUT" / "gpu_check.md").read_text().startswith("table from")
    log = (tmp_path / "OUT" / "host.log").read_text()
    assert "  | exported" in log and "killed" in log


def test_each_scenario_record_is_handed_over_as_soon_as_it_exists(monkeypatch):
    from m3rt.benchmarks import scenarios

    seen: list[tuple[str, str, list[str]]] = []
    done: list[str] = []

    def runner(name: str, fail: bool = False):
        def run(setup):
            done.append(name)
            if fail:
                raise RuntimeError("device lost")
            return {"value": len(done)}

        return run

    monkeypatch.setattr(
        scenarios, "RUNNERS", {"latency": runner("latency"), "documents": runner("documents", fail=True)}
    )
    monkeypatch.setattr(scenarios, "NEEDS_S", {"latency": 0, "documents": 0, "throughput": 1e9})

    class GpuSetup:
        on_gpu = True

    results = scenarios.run_scenarios(
        GpuSetup(), ["latency", "documents", "throughput"], budget_s=100.0, log=lambda _: None,
        on_result=lambda name, record: seen.append((name, record["status"], list(done))),
    )  # fmt: skip
    # Each record arrives before the next scenario starts; the one that no longer fits is skipped.
    assert seen == [("latency", "ok", ["latency"]), ("documents", "failed", ["latency", "documents"]),
                    ("throughput", "skipped", ["latency", "documents"])]  # fmt: skip
    assert results["documents"]["error"] == "RuntimeError: device lost" and results["latency"]["value"] == 1
