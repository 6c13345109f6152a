"""The artifact directory: manifest contents, verification, and broken artifacts."""

import json
import shutil

import onnxruntime
import pytest
import torch
import transformers

import m3rt
from m3rt import ArtifactError, M3Model
from m3rt.manifest import load_manifest, sha256_file


def test_manifest_records_everything(tiny):
    ckpt, artifact = tiny
    data = json.loads((artifact / "m3rt.json").read_text())
    assert data["format"] == "m3rt-artifact" and data["format_version"] == 1
    assert set(data["files"]) == {"model.onnx", "model.flash.onnx", "tokenizer.json"}
    for name, rec in data["files"].items():
        assert rec["sha256"] == sha256_file(artifact / name) and rec["size"] == (artifact / name).stat().st_size
    assert set(data["source"]["files"]) >= {"config.json", "colbert_linear.pt", "sparse_linear.pt", "tokenizer.json"}
    graph = data["graphs"]["fp32"]
    assert graph["opset"] == 17 and graph["precision"] == "fp32"
    assert list(graph["outputs"]) == ["dense_vecs", "sparse_weights", "colbert_vecs"]
    assert graph["inputs"]["input_ids"] == {"dtype": "int64", "shape": ["batch", "sequence"]}
    heads = graph["validation"]["heads"]
    assert all(h["min_cosine"] >= 0.99999 and h["max_abs_diff"] <= 1e-3 for h in heads.values())
    assert data["special_tokens"]["cls"] == 0 and data["special_tokens"]["pad"] == 1
    assert data["special_tokens"]["eos"] == 2 and data["special_tokens"]["unk"] == 3
    assert data["model"]["max_length"] == 8192
    versions = data["versions"]
    assert versions["m3rt"] == m3rt.__version__ and versions["onnxruntime"] == onnxruntime.__version__
    assert versions["torch"] == torch.__version__ and versions["transformers"] == transformers.__version__
    assert "onnx" in versions


def test_graph_has_dynamic_batch_and_sequence(tiny):
    import onnx

    model = onnx.load(str(tiny[1] / "model.onnx"))
    for tensor in model.graph.input:
        dims = tensor.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "sequence"]
        assert tensor.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [o.name for o in model.graph.output] == ["dense_vecs", "sparse_weights", "colbert_vecs"]


@pytest.fixture
def copy(tiny, tmp_path):
    target = tmp_path / "artifact"
    shutil.copytree(tiny[1], target)
    return target


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="m3rt.json is missing"):
        M3Model.load(tmp_path)
    with pytest.raises(ArtifactError, match="not a directory"):
        M3Model.load(tmp_path / "nope")


def test_truncated_model_is_named(copy):
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"model\.onnx is .* bytes .*truncated"):
        M3Model.load(copy)


def test_corrupted_model_is_named(copy):
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.onnx does not match the sha256"):
        M3Model.load(copy)


def test_corrupted_model_without_verification_is_still_a_clear_error(copy):
    (copy / "model.onnx").write_bytes(b"not an onnx file at all")
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load"):
        M3Model.load(copy, verify=False)


def test_missing_file_is_named(copy):
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match=r"tokenizer\.json is listed .* but missing"):
        M3Model.load(copy)


def test_bad_manifest(copy):
    (copy / "m3rt.json").write_text("{ not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_manifest(copy)
    (copy / "m3rt.json").write_text(json.dumps({"format": "m3rt-artifact", "format_version": 99}))
    with pytest.raises(ArtifactError, match="format_version 99"):
        load_manifest(copy)


def test_unknown_precision_and_backend(tiny):
    with pytest.raises(ArtifactError, match="no 'int8' graph"):
        M3Model.load(tiny[1], precision="int8")
    with pytest.raises(ArtifactError, match="unknown backend"):
        M3Model.load(tiny[1], backend="nope")


def test_a_gpu_provider_that_cannot_start_is_an_error_not_a_silent_cpu_run(tiny):
    from m3rt import BackendError

    with pytest.raises(BackendError, match="could not start CUDAExecutionProvider.*onnxruntime-gpu"):
        M3Model.load(tiny[1], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_typed_schema_reads_what_the_exporter_writes(tiny):
    from pathlib import Path

    from m3rt.errors import ArtifactError
    from m3rt.manifest import EngineInfo, engine_record, load_manifest

    config = json.loads((Path(tiny[0]) / "config.json").read_text())
    manifest = load_manifest(tiny[1])
    assert manifest.model.hidden_size == config["hidden_size"]
    assert manifest.model.num_hidden_layers == config["num_hidden_layers"]
    assert manifest.model.vocab_size == config["vocab_size"]
    fp32 = manifest.graph("fp32")
    assert fp32.file == "model.onnx" and fp32.precision == "fp32" and fp32.validation["heads"]
    assert manifest.graph_path("fp32") == Path(tiny[1]) / "model.onnx"
    assert set(manifest.files) >= {"model.onnx", "tokenizer.json"}
    with pytest.raises(ArtifactError, match="has no 'int8' graph; it has: fp32"):
        manifest.graph("int8")
    profiles = [{"name": "short", "min": [1, 1], "opt": [8, 32], "max": [64, 64]}]
    device = {"gpu": "NVIDIA H100", "compute_capability": "9.0"}
    record = engine_record(Path("model.fp16.plan"), "model.fp16.onnx", "10.16.0", device, profiles, workspace_bytes=1)
    engine = EngineInfo.parse("fp16", json.loads(json.dumps(record)))
    assert (engine.file, engine.built_from, engine.gpu, engine.profiles[0]["max"]) == (
        "model.fp16.plan",
        "model.fp16.onnx",
        "NVIDIA H100",
        [64, 64],
    )
