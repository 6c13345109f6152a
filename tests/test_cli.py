import json

from m3rt.cli import main


def test_encode_prints_dense_norm_sparse_tokens_and_colbert_shape(tiny, capsys):
    assert main(["encode", str(tiny[1]), "Paris est la capitale de la France.", "ok"]) == 0
    out = capsys.readouterr().out
    assert out.count("dense   norm 1.0000") == 2
    assert "sparse" in out and "'" in out  # top tokens shown as strings
    assert "colbert shape (" in out


def test_inspect_verifies(tiny, capsys):
    assert main(["inspect", str(tiny[1])]) == 0
    out = capsys.readouterr().out
    assert "verified: all files match" in out and "model.onnx" in out
    assert main(["inspect", str(tiny[1]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "m3rt-artifact"


def test_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    assert main(["encode", str(tmp_path), "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("m3rt: error:") and "Traceback" not in err


def test_exit_codes_come_from_the_error_table(tiny, tmp_path, monkeypatch, capsys):
    """Out of memory is worth retrying later (EX_TEMPFAIL, 75); export errors are M3Errors too."""
    import m3rt.model
    from m3rt.errors import BackendOutOfMemory
    from m3rt.export.cli import main as export_main

    def out_of_memory(*args, **kwargs):
        raise BackendOutOfMemory("a batch of 1 x 8192 did not fit")

    monkeypatch.setattr(m3rt.model.M3Model, "load", out_of_memory)
    assert main(["encode", str(tiny[1]), "x"]) == 75
    assert "did not fit" in capsys.readouterr().err
    # An empty directory as the checkpoint: CheckpointError, an ExportError, answered as one line.
    (tmp_path / "empty").mkdir()
    assert export_main(["--model", str(tmp_path / "empty"), "--output", str(tmp_path / "never")]) == 1
    err = capsys.readouterr().err
    assert "m3-export: error:" in err and "Traceback" not in err


def test_export_and_bench_verbs_are_m3_export_and_m3_bench(tiny, tmp_path, capsys):
    assert main(["export", "--model", str(tiny[0]), "-o", str(tmp_path / "a"), "--fp16", "--fused", "--int8"]) == 0
    graphs = json.loads((tmp_path / "a" / "m3rt.json").read_text())["graphs"]
    assert graphs["fp32"]["validation"] and set(graphs) >= {"fp16", "fp16-fused", "int8", "int8-u8", "int8-qdq"}
    assert "measured on " in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "a")]) == 0
    assert "graph    fp16-fused: model.fp16.fused.onnx" in capsys.readouterr().out
    quick = ["--no-reference", "--lengths", "16", "--texts", "3", "--repeats", "1", "--warmup", "0"]
    quick += ["--max-seconds", "1", "--throughput-runs", "1", "--distributions", "queries"]
    assert main(["bench", str(tmp_path / "a"), "-o", str(tmp_path / "bench"), *quick]) == 0
    assert json.loads((tmp_path / "bench" / "results.json").read_text())["results"]


def test_compare_measures_a_precision_against_fp32_with_its_gate(tmp_path, tiny, capsys):
    import numpy as np

    from m3rt import M3Model
    from m3rt.export.artifact import ExportOptions, export_artifact
    from m3rt.fidelity import compare_outputs

    out = tmp_path / "a"
    export_artifact(ExportOptions(model=str(tiny[0]), output=out, int8=True, int8_forms=("cpu", "cpu-u8")))
    texts = tmp_path / "texts.txt"
    texts.write_text("first text\n\nsecond, somewhat longer text about retrieval\nla troisième\n", encoding="utf-8")
    assert main(["compare", str(out), "--texts", str(texts), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["against"] == "fp32" and report["graph"] in ("int8", "int8-u8") and report["texts"] == 3
    lines = [line for line in texts.read_text().splitlines() if line.strip()]
    everything = dict(max_length=512, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    want = compare_outputs(
        M3Model.load(out, precision="int8").encode(lines, **everything), M3Model.load(out).encode(lines, **everything)
    )
    assert np.isclose(report["dense_cos_min"], want["dense_cos_min"], atol=1e-6)
    assert main(["compare", str(out), "--texts", str(tmp_path / "missing.txt")]) == 1
