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
