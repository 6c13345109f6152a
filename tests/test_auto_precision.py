"""precision="auto" on the CPU: the fastest form whose gate holds here, measured once per CPU and cached."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("openvino")

from m3rt import M3Model, auto_precision
from m3rt.backends import openvino as ov_backend
from m3rt.errors import ArtifactError
from m3rt.export.artifact import ExportOptions, export_artifact
from m3rt.manifest import load_manifest


@pytest.fixture(scope="module")
def int8_artifact(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "artifact"
    export_artifact(ExportOptions(model=str(tiny[0]), output=out, int8=True, int8_forms=("cpu",)))
    return out


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("M3RT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_auto_picks_the_fastest_measured_form_and_caches_it(int8_artifact, private_cache, texts):
    model = M3Model.load(int8_artifact, precision="auto")
    choice = model.placement.auto
    measured = choice.tokens_per_s
    assert "onnxruntime fp32" in measured and "onnxruntime int8" in measured
    if ov_backend.bf16_flags():
        assert "openvino bf16" in measured
    fastest = max(measured, key=measured.get)
    assert f"{model.placement.engine} {model.placement.precision}" == fastest == f"{choice.engine} {choice.precision}"
    assert any("precision='auto'" in note for note in model.notes)
    # What it serves agrees with fp32 within the chosen form's gate (here: loose, the int8 one's).
    reference = M3Model.load(int8_artifact).encode(texts[:8])["dense_vecs"]
    assert np.min(np.sum(model.encode(texts[:8])["dense_vecs"] * reference, -1)) > 0.99

    cache = json.loads((private_cache / auto_precision.CACHE_FILE).read_text())
    assert len(cache) == 1 and next(iter(cache.values()))["engine"] == choice.engine
    again = M3Model.load(int8_artifact, precision="auto").placement.auto  # from the cache: not measured
    assert again.cached and (again.engine, again.precision) == (choice.engine, choice.precision)


def test_a_form_below_its_gate_here_is_left_out(int8_artifact, tmp_path):
    artifact = shutil.copytree(int8_artifact, tmp_path / "artifact")
    path = artifact / "m3rt.json"
    data = json.loads(path.read_text())
    data["graphs"]["int8"]["fidelity"]["gate"]["dense_cos_min"] = 1.01  # a gate nothing meets
    data["graphs"]["int8"]["fidelity"]["measured_on"]["cpu"] = "another CPU"
    data["graphs"]["int8"]["fidelity"]["measured_on"]["exact"] = False  # so it is validated here
    data["cpu_precisions"] = {"bf16": {"engine": "openvino", "graph": "fp32", "fidelity": {
        "gate": {"dense_cos_min": 1.01}, "measured_on": {"cpu": "another CPU"}}}}  # fmt: skip
    path.write_text(json.dumps(data))
    choice = auto_precision.measure_choice(load_manifest(artifact), timer=lambda m, b: 1.0)
    assert "gate" in choice.excluded["onnxruntime int8"]
    assert "gate" in choice.excluded["openvino bf16"] or "bf16" in choice.excluded["openvino bf16"]
    assert (choice.engine, choice.precision) == ("onnxruntime", "fp32")


def test_missing_int8_graph_and_no_bf16_cpu_are_reasons(tiny, monkeypatch):
    monkeypatch.setattr(ov_backend, "bf16_flags", lambda: frozenset())
    choice = auto_precision.measure_choice(load_manifest(tiny[1]), timer=lambda m, b: 1.0)
    assert "no 'int8' graph" in choice.excluded["onnxruntime int8"]
    assert "no native bf16" in choice.excluded["openvino bf16"]
    assert choice.precision == "fp32"


def test_damaged_cache_is_measured_again(tiny, private_cache):
    private_cache.mkdir()
    (private_cache / auto_precision.CACHE_FILE).write_text("{not json")
    model = M3Model.load(tiny[1], precision="auto")
    assert not model.placement.auto.cached
    assert json.loads((private_cache / auto_precision.CACHE_FILE).read_text())


@pytest.mark.parametrize("kwargs,match", [(dict(device="cuda"), "CPU"), (dict(backend="tensorrt"), "backend='auto'")])
def test_auto_refuses_what_it_cannot_choose(tiny, kwargs, match):
    with pytest.raises(ArtifactError, match=match):
        M3Model.load(tiny[1], precision="auto", **kwargs)


def test_inspect_shows_the_choice(tiny, capsys):
    from m3rt.cli import main

    assert main(["inspect", str(tiny[1])]) == 0
    assert "has not measured this CPU yet" in capsys.readouterr().out
    M3Model.load(tiny[1], precision="auto")
    assert main(["inspect", str(tiny[1])]) == 0
    assert "precision='auto' on" in capsys.readouterr().out
