"""backend="openvino": fp32 against the PyTorch reference, bf16 against ONNX Runtime fp32 within its gate,
the bf16 gate recorded at export and validated at load on another CPU, and refusals."""

import json
import shutil
import warnings

import numpy as np
import pytest

pytest.importorskip("openvino")

from test_parity_pytorch import pytorch_encode

from m3rt import M3Model
from m3rt.backends import openvino as ov_backend
from m3rt.bf16_gate import SECTION, record_bf16_gate
from m3rt.errors import ArtifactError, BackendError, BelowGateError
from m3rt.fidelity import DEFAULT_GATES, compare_outputs
from m3rt.manifest import load_manifest

from parity import assert_outputs

ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
needs_bf16 = pytest.mark.skipif(not ov_backend.bf16_flags(), reason="this CPU has no native bf16")


@pytest.fixture()
def artifact_copy(tiny, tmp_path):
    """A private copy of the tiny artifact, for tests that write its manifest."""
    return shutil.copytree(tiny[1], tmp_path / "artifact")


def test_fp32_matches_pytorch(tiny, texts):
    ckpt, artifact = tiny
    model = M3Model.load(artifact, backend="openvino")
    assert (model.placement.engine, model.placement.precision, model.placement.graph.name) == (
        "openvino",
        "fp32",
        "fp32",
    )
    ours = model.encode(texts, batch_size=3, max_length=64, **ALL)
    assert_outputs(ours, pytorch_encode(ckpt, texts, 64))


@needs_bf16
def test_bf16_within_gate_of_onnxruntime_fp32_and_really_bf16(artifact_copy, texts):
    reference = M3Model.load(artifact_copy).encode(texts, batch_size=4, **ALL)
    with pytest.warns(UserWarning, match="records no bf16 gate"):
        model = M3Model.load(artifact_copy, backend="openvino", precision="bf16")
    assert model.placement.precision == "bf16"
    assert any("validated on this CPU at load" in note for note in model.notes)
    assert "bfloat16" in str(model.backend._compiled.get_property("INFERENCE_PRECISION_HINT"))
    ours = model.encode(texts, batch_size=4, **ALL)
    figures = compare_outputs(ours, reference)
    assert not DEFAULT_GATES["bf16"].failures(figures), figures
    # bf16 products really ran: the outputs are close to fp32 but not fp32's.
    assert figures["dense_cos_min"] < 1 - 1e-12 or figures["colbert_cos_min"] < 1 - 1e-9


@needs_bf16
def test_bf16_gate_recorded_then_trusted_here_and_revalidated_elsewhere(artifact_copy):
    record = record_bf16_gate(artifact_copy)
    assert record["fidelity"]["passed"] and record["fidelity"]["measured_on"]["bf16"]
    manifest = load_manifest(artifact_copy)  # the rewritten manifest still verifies
    assert manifest.data[SECTION]["bf16"] == record
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trusted: no measurement here
        model = M3Model.load(artifact_copy, backend="openvino", precision="bf16")
    assert any("measured on this CPU at export" in note for note in model.notes)

    # The same record from another CPU: measured again here, and refused below its gate.
    path = artifact_copy / "m3rt.json"
    data = json.loads(path.read_text())
    data[SECTION]["bf16"]["fidelity"]["measured_on"]["cpu"] = "Intel(R) Xeon(R) Platinum 8480+"
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="measured on Intel"):
        M3Model.load(artifact_copy, backend="openvino", precision="bf16")
    data[SECTION]["bf16"]["fidelity"]["gate"]["dense_cos_min"] = 1.01  # a gate nothing meets
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning), pytest.raises(ArtifactError, match="misses its accuracy gate on this CPU"):
        M3Model.load(artifact_copy, backend="openvino", precision="bf16")


@needs_bf16
def test_record_refuses_below_gate(artifact_copy):
    from m3rt.fidelity import Gate

    with pytest.raises(BelowGateError, match="bf16"):
        record_bf16_gate(artifact_copy, Gate(dense_cos_min=1.01))
    assert SECTION not in load_manifest(artifact_copy).data  # nothing recorded


def test_bf16_refused_without_native_bf16(tiny, monkeypatch):
    monkeypatch.setattr(ov_backend, "bf16_flags", lambda: frozenset())
    with pytest.raises(ArtifactError, match="no native bf16"):
        M3Model.load(tiny[1], backend="openvino", precision="bf16")


@pytest.mark.parametrize("precision", ["int8", "fp16", "bogus"])
def test_other_precisions_refused(tiny, precision):
    with pytest.raises(ArtifactError, match="'fp32' or 'bf16'"):
        M3Model.load(tiny[1], backend="openvino", precision=precision)


def test_engine_failure_is_a_backend_error(tiny):
    model = M3Model.load(tiny[1], backend="openvino")
    ids = np.zeros((2, 5), np.int64)
    with pytest.raises(BackendError, match="OpenVINO failed on a batch"):
        model.backend.run(ids, np.ones((3, 7), np.int64), ["dense_vecs"])
    # Out-of-vocabulary ids are the runtime's to refuse, before the engine.
    with pytest.raises(Exception, match="vocabulary"):
        model.run_ids([np.array([0, 10**9, 2])], ["dense_vecs"])


def test_compiled_model_cache_beside_artifact_and_read_only_artifact(artifact_copy, texts):
    first = M3Model.load(artifact_copy, backend="openvino").encode(texts[:4])["dense_vecs"]
    cache = artifact_copy / ".openvino-cache"
    assert any(cache.iterdir()), "no compiled model cached"
    again = M3Model.load(artifact_copy, backend="openvino").encode(texts[:4])["dense_vecs"]
    np.testing.assert_allclose(again, first, rtol=0, atol=1e-6)
    # Where no cache folder can be made (here: a file in its place), the model loads without one.
    shutil.rmtree(cache)
    cache.write_text("not a folder")
    out = M3Model.load(artifact_copy, backend="openvino").encode(texts[:4])["dense_vecs"]
    np.testing.assert_allclose(out, first, rtol=0, atol=1e-6)


@needs_bf16
def test_m3_export_bf16_records_the_gate(tiny, tmp_path, capsys):
    from m3rt.export.cli import main as export_main

    out = tmp_path / "bf16-artifact"
    assert export_main(["--model", str(tiny[0]), "--output", str(out), "--bf16"]) == 0
    assert "OpenVINO bf16 vs fp32" in capsys.readouterr().out
    fidelity = load_manifest(out).data[SECTION]["bf16"]["fidelity"]
    assert fidelity["passed"] and fidelity["gate"] == DEFAULT_GATES["bf16"].as_record()


@needs_bf16
def test_cached_compiled_model_keeps_each_precision(artifact_copy, texts):
    # OpenVINO keeps one compiled blob per graph and applies the precision hint when it imports it.
    fp32 = M3Model.load(artifact_copy, backend="openvino").encode(texts[:6], **ALL)
    cached = M3Model.load(artifact_copy, backend="openvino", precision="bf16").encode(texts[:6], **ALL)
    uncached = M3Model.load(
        artifact_copy, backend="openvino", precision="bf16", backend_options={"cache_dir": None}
    ).encode(texts[:6], **ALL)
    for a, b in zip(cached["colbert_vecs"], uncached["colbert_vecs"]):
        np.testing.assert_array_equal(a, b)
    assert compare_outputs(cached, fp32)["colbert_cos_min"] < 1 - 1e-9  # bf16, not the fp32 blob


def test_concurrent_encodes_match_sequential(tiny, texts):
    from concurrent.futures import ThreadPoolExecutor

    model = M3Model.load(tiny[1], backend="openvino")
    chunks = [texts[i::4] for i in range(4)]
    sequential = [model.encode(chunk, batch_size=2, **ALL) for chunk in chunks]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda chunk: model.encode(chunk, batch_size=2, **ALL), chunks * 3))
    for got, want in zip(concurrent, sequential * 3):
        np.testing.assert_array_equal(got["dense_vecs"], want["dense_vecs"])


def test_m3_export_bf16_on_a_cpu_without_it_says_so(tiny, tmp_path, capsys, monkeypatch):
    from m3rt.export.cli import main as export_main

    monkeypatch.setattr(ov_backend, "bf16_flags", lambda: frozenset())
    out = tmp_path / "artifact"
    assert export_main(["--model", str(tiny[0]), "--output", str(out), "--bf16"]) != 0
    err = capsys.readouterr().err
    assert "bf16 is not recorded" in err and "no native bf16" in err
    assert SECTION not in load_manifest(out).data  # the artifact itself is complete and verifies
