"""The ONNX Runtime CPU backend runs each batch on the plain or the flash-attention graph by its padded
length; both give PyTorch's outputs, the two sessions share one copy of the weights, and the memory
budget follows the graph a batch will run on."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_parity_pytorch import pytorch_encode

from m3rt import ArtifactError, M3Model
from m3rt.backends.onnxruntime import OnnxRuntimeBackend
from m3rt.fidelity import DEFAULT_GATES, compare_outputs
from m3rt.memory import MemoryModel, budget_rows

from parity import assert_outputs

EVERYTHING = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
FLASH_FROM = 48  # the tiny model's crossover for these tests: short texts below it, long ones above


@pytest.fixture(scope="module")
def artifact(tiny, tmp_path_factory):
    from m3rt.export.artifact import ExportOptions, export_artifact

    out = tmp_path_factory.mktemp("switch") / "artifact"
    export_artifact(ExportOptions(model=str(tiny[0]), output=out, int8=True, int8_forms=("cpu",)))
    return tiny[0], out


def _texts(words: int, count: int) -> list[str]:
    return [" ".join(f"word{i + j} and {j % 7}." for j in range(words)) for i in range(count)]


def test_short_batches_run_the_plain_graph_and_long_ones_the_flash_graph(artifact):
    ckpt, path = artifact
    model = M3Model.load(path, backend_options={"flash_from_tokens": FLASH_FROM})
    short, long = _texts(3, 4), _texts(60, 3)
    assert max(len(ids) for ids in model.tokenizer.encode(short, max_length=8192).ids) < FLASH_FROM
    assert min(len(ids) for ids in model.tokenizer.encode(long, max_length=8192).ids) >= FLASH_FROM

    got_short = model.encode(short, **EVERYTHING)
    assert dict(model.backend.batches) == {"model.onnx": 1}
    got_long = model.encode(long, **EVERYTHING)
    assert dict(model.backend.batches) == {"model.onnx": 1, "model.flash.onnx": 1}
    assert_outputs(got_short, pytorch_encode(ckpt, short, 8192))
    assert_outputs(got_long, pytorch_encode(ckpt, long, 8192))


def test_a_mixed_call_splits_by_padded_length(artifact, texts):
    ckpt, path = artifact
    model = M3Model.load(path, backend_options={"flash_from_tokens": FLASH_FROM})
    mixed = texts + _texts(60, 2)
    got = model.encode(mixed, batch_size=4, **EVERYTHING)
    assert set(model.backend.batches) == {"model.onnx", "model.flash.onnx"}
    assert_outputs(got, pytorch_encode(ckpt, mixed, 8192))


def test_int8_long_batches_run_the_int8_flash_graph_within_its_gate(artifact):
    _, path = artifact
    long = _texts(60, 3)
    switched = M3Model.load(path, precision="int8", backend_options={"flash_from_tokens": FLASH_FROM})
    assert switched.backend.long_graph_path.name == "model.int8.flash.onnx"
    got = switched.encode(long, **EVERYTHING)
    assert dict(switched.backend.batches) == {"model.int8.flash.onnx": 1}
    plain = M3Model.load(path, precision="int8", backend_options={"flash_from_tokens": 1 << 20})
    plain_out = plain.encode(long, **EVERYTHING)
    assert dict(plain.backend.batches) == {"model.int8.onnx": 1}
    # Both against the fp32 graph (short batches: the plain graph), held to the int8 gate.
    fp32 = M3Model.load(path, backend_options={"flash_from_tokens": 1 << 20}).encode(long, **EVERYTHING)
    gate = DEFAULT_GATES["int8"]
    assert not gate.failures(compare_outputs(got, fp32)) and not gate.failures(compare_outputs(plain_out, fp32))


def test_the_default_crossover_is_the_measured_one(artifact):
    from m3rt.backends.onnxruntime import FLASH_FROM_TOKENS

    model = M3Model.load(artifact[1])
    crossover = FLASH_FROM_TOKENS["fp32"]
    assert model.backend.flash_from_tokens == crossover
    assert model.backend.graph_for(crossover - 1).name == "model.onnx"
    assert model.backend.graph_for(crossover).name == "model.flash.onnx"
    # Outputs only the flash graph has go to it whatever the length.
    assert model.backend.graph_for(8, ["last_hidden_state"]).name == "model.flash.onnx"
    assert M3Model.load(artifact[1], precision="int8").backend.flash_from_tokens == FLASH_FROM_TOKENS["int8"]


@pytest.mark.parametrize("value", [0, 1, "512", 2.5, True])
def test_a_bad_crossover_is_refused(artifact, value):
    with pytest.raises(ArtifactError, match="flash_from_tokens"):
        M3Model.load(artifact[1], backend_options={"flash_from_tokens": value})


def test_the_memory_budget_follows_the_graph_a_batch_runs_on(artifact):
    _, path = artifact
    model = M3Model.load(path, backend_options={"flash_from_tokens": 4096})
    manifest = model.manifest
    heads = manifest.data["model"]["num_attention_heads"]
    plain, flash = MemoryModel(manifest.hidden_size, heads, True), MemoryModel(manifest.hidden_size, heads, False)
    budget = 2**30
    rows = budget_rows(manifest, model.placement, budget, model.backend.flash_from_tokens)
    assert rows(4095) == plain.max_rows(4095, budget) < flash.max_rows(4095, budget)
    assert rows(4096) == flash.max_rows(4096, budget)
    # 8192 tokens on the plain graph would need 2 GiB of scores: the flash graph keeps it under 1 GiB.
    assert plain.max_rows(8192, budget) == 0 and rows(8192) >= 1


def test_both_sessions_share_one_copy_of_external_weights(artifact, tmp_path):
    """At full size the weights live in model.onnx.data, which the flash graph reads too."""
    from m3rt.export.flash_attention import write_flash_graph

    ckpt, path = artifact
    plain = onnx.load(str(path / "model.onnx"))
    onnx.save_model(plain, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    heads = M3Model.load(path).manifest.data["model"]["num_attention_heads"]
    files = write_flash_graph(tmp_path / "model.onnx", tmp_path / "model.flash.onnx", heads)
    assert [f.name for f in files] == ["model.flash.onnx", "model.onnx.data"]
    backend = OnnxRuntimeBackend(
        tmp_path / "model.onnx", long_graph_path=tmp_path / "model.flash.onnx", flash_from_tokens=FLASH_FROM
    )
    assert len(backend.shared_weights.values) > 10
    model = M3Model(M3Model.load(path).manifest, backend, M3Model.load(path).tokenizer)
    texts = _texts(3, 2) + _texts(60, 2)
    got = model.encode(texts, batch_size=2, **EVERYTHING)
    assert set(backend.batches) == {"model.onnx", "model.flash.onnx"}
    assert_outputs(got, pytorch_encode(ckpt, texts, 8192))


def test_unequal_weights_are_not_shared(artifact, tmp_path):
    _, path = artifact
    plain = onnx.load(str(path / "model.onnx"))
    onnx.save_model(plain, str(tmp_path / "model.onnx"), save_as_external_data=True, location="a.data")
    flash = onnx.load(str(path / "model.flash.onnx"))
    onnx.save_model(flash, str(tmp_path / "model.flash.onnx"), save_as_external_data=True, location="b.data")
    backend = OnnxRuntimeBackend(tmp_path / "model.onnx", long_graph_path=tmp_path / "model.flash.onnx")
    assert backend.shared_weights.values == {}
    ids = np.array([[0, 5, 6, 2]], dtype=np.int64)
    assert backend.run(ids, np.ones_like(ids), ["dense_vecs"])["dense_vecs"].shape == (1, 64)


def test_without_shared_weights_each_session_has_its_own(artifact):
    ckpt, path = artifact
    model = M3Model.load(path, backend_options={"flash_from_tokens": FLASH_FROM, "share_weights": False})
    assert model.backend.shared_weights is None
    texts = _texts(3, 2) + _texts(60, 2)
    got = model.encode(texts, batch_size=2, **EVERYTHING)
    assert set(model.backend.batches) == {"model.onnx", "model.flash.onnx"}
    assert_outputs(got, pytorch_encode(ckpt, texts, 8192))
