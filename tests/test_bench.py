"""m3-bench end to end on the tiny model: it runs in seconds and its outputs parse."""

import json
import shutil

import pytest

from m3rt.benchmarks.bench import flops_per_token, main
from m3rt.benchmarks.texts import TextFactory
from m3rt.tokenizer import M3Tokenizer

QUICK = [
    "--lengths",
    "16,64",
    "--texts",
    "6",
    "--repeats",
    "3",
    "--warmup",
    "1",
    "--max-seconds",
    "2",
    "--throughput-runs",
    "1",
    "--distributions",
    "queries,passages",
]


@pytest.fixture(scope="module")
def report(tiny, tmp_path_factory):
    pytest.importorskip("FlagEmbedding")
    out = tmp_path_factory.mktemp("bench")
    assert main([str(tiny[1]), "--checkpoint", str(tiny[0]), "--out", str(out), *QUICK]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_report_has_every_runner_and_metric(report):
    out, data = report
    names = [r["runner"] for r in data["results"]]
    assert names[0] == "FlagEmbedding PyTorch cpu fp32" and "m3rt onnxruntime cpu fp32" in names
    assert data["machine"]["cores"] >= 1 and "onnxruntime" in data["machine"]["versions"]
    for r in data["results"]:
        assert r["ratios_vs"] == "FlagEmbedding PyTorch cpu fp32"
        for length in ("16", "64"):
            for kind in ("end_to_end", "model_only"):
                cell = r["latency"][length][kind]
                assert 0 < cell["p50_ms"] <= cell["p90_ms"] <= cell["p99_ms"] and cell["n"] >= 1
        for workload in ("queries", "passages"):
            cell = r["throughput"][workload]
            assert cell["tokens_per_s"] > 0 and cell["texts"] == 6 and cell["padding_ratio"] >= 0
        assert r["peak_rss_bytes"] > 0
    m3rt_fp32 = next(r for r in data["results"] if r["runner"] == "m3rt onnxruntime cpu fp32")
    assert "fidelity_vs_fp32" not in m3rt_fp32  # it is the fidelity baseline
    # The reference computes the same function as m3rt fp32: fidelity is near exact.
    assert data["results"][0]["fidelity_vs_fp32"]["dense_cos_min"] > 0.9999
    table = (out / "results.md").read_text()
    assert "| FlagEmbedding PyTorch cpu fp32 |" in table and "tokens/s" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_is_skipped_with_a_note_never_invented(tiny, tmp_path):
    artifact = tmp_path / "artifact"
    shutil.copytree(tiny[1], artifact)
    manifest = json.loads((artifact / "m3rt.json").read_text())
    manifest["source"]["model"] = str(tmp_path / "checkpoint-that-is-gone")
    (artifact / "m3rt.json").write_text(json.dumps(manifest))
    assert main([str(artifact), "--out", str(tmp_path / "out"), *QUICK]) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert not any(r["reference"] for r in data["results"])
    assert any(note.startswith("PyTorch reference: skipped") for note in data["notes"])


def test_text_factory_lengths(tiny):
    tokenizer = M3Tokenizer(tiny[1] / "tokenizer.json")
    factory = TextFactory(tokenizer)
    for n in (16, 300, 8192):
        assert len(tokenizer.encode([factory.at_least(n)], max_length=n).ids[0]) == n
    lengths = [len(x) for x in tokenizer.encode(factory.distribution("passages", 20), 8192).ids]
    assert 60 <= min(lengths) and max(lengths) <= 400


def test_flops_formula_matches_the_anchor():
    # F(S) = 24 (24 d^2 + 4 S d) = 604 M + 98,304 * S for BGE-M3 (d = 1024), worked out by hand.
    assert flops_per_token(0) == pytest.approx(604e6, rel=1e-3)
    assert flops_per_token(1000) - flops_per_token(0) == pytest.approx(98_304_000)


def test_without_flag_embedding_the_reference_is_pytorch_in_m3rt_pipeline(tiny, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "FlagEmbedding", None)  # makes `import FlagEmbedding` fail
    assert main([str(tiny[1]), "--checkpoint", str(tiny[0]), "--out", str(tmp_path), *QUICK]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    reference = data["results"][0]
    assert reference["runner"] == "PyTorch (m3rt pipeline) cpu fp32" and reference["reference"]
    assert reference["fidelity_vs_fp32"]["dense_cos_min"] > 0.9999


def test_without_matplotlib_the_report_is_written_without_the_plot(tiny, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is absent
    assert main([str(tiny[1]), "--no-reference", "--out", str(tmp_path), *QUICK]) == 0
    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.md").is_file()
    assert not (tmp_path / "results.png").exists()
    assert "matplotlib is not installed: pip install 'm3rt[bench]'" in capsys.readouterr().err


def test_openvino_forms_side_by_side(report):
    pytest.importorskip("openvino")
    from m3rt.backends.openvino import bf16_flags

    results = {r["runner"]: r for r in report[1]["results"]}
    assert results["m3rt openvino cpu fp32"]["fidelity_vs_fp32"]["dense_cos_min"] > 0.99999
    if bf16_flags():
        assert results["m3rt openvino cpu bf16"]["fidelity_vs_fp32"]["dense_cos_min"] >= 0.999
