"""The flash-attention fp32 graph: the same model as model.onnx, checked against PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_parity_pytorch import pytorch_encode

from m3rt import InputError, M3Model
from m3rt.export.flash_attention import PatternError, rewrite_attention

from parity import assert_outputs

EVERYTHING = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)


@pytest.fixture(scope="module")
def flash_artifact(tiny, tmp_path_factory):
    from m3rt.export.artifact import ExportOptions, export_artifact

    ckpt = tiny[0]
    out = tmp_path_factory.mktemp("flash") / "artifact"
    export_artifact(ExportOptions(model=str(ckpt), output=out, flash_attention=True))
    return ckpt, out


@pytest.fixture(scope="module")
def plain_artifact(tiny, tmp_path_factory):
    """The export without its flash-attention graph (m3-export --no-flash-attention)."""
    from m3rt.export.artifact import ExportOptions, export_artifact

    out = tmp_path_factory.mktemp("plain") / "artifact"
    export_artifact(ExportOptions(model=str(tiny[0]), output=out, flash_attention=False))
    return out


def test_manifest_lists_a_validated_flash_graph_that_the_cpu_serves(flash_artifact):
    _, artifact = flash_artifact
    data = json.loads((artifact / "m3rt.json").read_text())
    entry = data["graphs"]["fp32-flash"]
    assert entry["file"] == "model.flash.onnx" and "model.flash.onnx" in data["files"]
    assert min(h["min_cosine"] for h in entry["validation"]["heads"].values()) >= 0.99999
    graph = onnx.load(str(artifact / "model.flash.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    layers = data["model"]["num_hidden_layers"]
    assert ops.count("MultiHeadAttention") == layers and "Softmax" not in ops
    model = M3Model.load(artifact)
    # Long batches run on it, short ones on model.onnx (tests/test_attention_switch.py).
    assert model.backend.long_graph_path.name == "model.flash.onnx" and model.backend.graph_path.name == "model.onnx"
    assert M3Model.load(artifact, precision="fp32-flash").backend.graph_path.name == "model.flash.onnx"


@pytest.mark.parametrize("batch_size,max_length", [(256, 8192), (3, 64)])
def test_flash_graph_matches_pytorch_with_padding(flash_artifact, texts, batch_size, max_length):
    ckpt, artifact = flash_artifact
    ours = M3Model.load(artifact).encode(texts, batch_size=batch_size, max_length=max_length, **EVERYTHING)
    assert_outputs(ours, pytorch_encode(ckpt, texts, max_length))


def test_flash_graph_equals_the_plain_graph_on_a_long_text(flash_artifact, plain_artifact):
    _, artifact = flash_artifact
    text = " ".join(f"word{i} and sentence {i % 17}." for i in range(600))
    flash = M3Model.load(artifact, precision="fp32-flash").encode([text, "short"], **EVERYTHING)
    plain = M3Model.load(plain_artifact).encode([text, "short"], **EVERYTHING)
    assert plain["colbert_vecs"][0].shape[0] > 2000
    np.testing.assert_allclose(flash["dense_vecs"], plain["dense_vecs"], atol=1e-5)
    for got, want in zip(flash["colbert_vecs"], plain["colbert_vecs"]):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_graph_without_the_attention_pattern_is_refused():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    with pytest.raises(PatternError):
        rewrite_attention(model, 4)


def test_mcls_capacity():
    from m3rt.long_document import mcls_capacity

    assert mcls_capacity(8192) == 8159  # 8159 tokens + 32 inserted <s> + </s>
    for length in (3, 10, 257, 258, 259, 512, 1000, 8192):
        n = mcls_capacity(length)
        assert n + -(-n // 256) + 1 <= length < (n + 1) + -(-(n + 1) // 256) + 1


def test_mcls_under_256_tokens_is_plain_cls_pooling(flash_artifact):
    _, artifact = flash_artifact
    model = M3Model.load(artifact)
    text = "A short document about the Amazon river and its many tributaries."
    doc = model.encode(text, granularity="document", granularity_options={"long_document": "mcls"}, **EVERYTHING)
    # MCLS reads the flash graph's hidden states: its plain <s> pooling, on the same graph, is the reference.
    plain = M3Model.load(artifact, precision="fp32-flash").encode(text, **EVERYTHING)
    np.testing.assert_allclose(doc["document"]["dense_vecs"][0], plain["dense_vecs"], atol=1e-6)
    assert doc["document"]["lexical_weights"][0] == plain["lexical_weights"]
    np.testing.assert_array_equal(doc["document"]["colbert_vecs"][0], plain["colbert_vecs"])


def test_mcls_pools_the_hidden_states_of_a_cls_every_256_tokens(flash_artifact):
    import torch
    from transformers import AutoModel

    ckpt, artifact = flash_artifact
    model = M3Model.load(artifact)
    text = " ".join(f"token{i} sits in sentence {i % 13}." for i in range(150))
    result = model.encode(text, granularity=["document", "token"], granularity_options={"long_document": "mcls"})
    content = result["token"]["token_ids"].tolist()
    assert 512 < len(content) < 8000
    # The paper's layout, written out: <s> before every 256 tokens, </s> at the end.
    ids, cls_at = [], []
    for start in range(0, len(content), 256):
        cls_at.append(len(ids))
        ids += [0, *content[start : start + 256]]
    ids.append(2)
    encoder = AutoModel.from_pretrained(ckpt).float().eval()
    with torch.no_grad():
        hidden = encoder(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    mean = hidden.last_hidden_state[0, cls_at].mean(dim=0).numpy()
    want = mean / np.linalg.norm(mean)
    got = result["document"]["dense_vecs"][0]
    assert float(got @ want) >= 0.99999
    plain = model.encode(text)["dense_vecs"]
    assert float(plain @ want) < 0.9999  # MCLS is not the first <s> alone


def test_mcls_needs_a_graph_with_hidden_states(plain_artifact):
    model = M3Model.load(plain_artifact)
    with pytest.raises(InputError, match="flash-attention"):
        model.encode("text", granularity="document", granularity_options={"long_document": "mcls"})


def test_a_memory_budget_counts_score_matrices_only_on_the_plain_graph(flash_artifact, plain_artifact):
    _, artifact = flash_artifact
    # Tiny model, 8192 tokens: two [4, 8192, 8192] float32 score tensors are 2 GiB on the plain graph.
    flash = M3Model.load(artifact, memory_budget="1GiB")
    plain = M3Model.load(plain_artifact, memory_budget="1GiB")
    assert flash._memory_rows(8192) >= 1
    with pytest.raises(InputError, match="flash-attention"):
        plain._memory_rows(8192)
    with pytest.raises(InputError, match="memory budget"):
        plain.encode("word " * 9000)


def test_long_document_benchmark_runs(flash_artifact, tmp_path, capsys):
    from m3rt.benchmarks.long_document import main

    _, artifact = flash_artifact
    assert main(["flash", str(artifact), "--tokens", "600", "--mcls", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["graph"] == "model.flash.onnx" and report["tokens"] == 600 and report["mcls_seconds"] > 0
    assert np.load(tmp_path / "flash_colbert.npy").shape[0] == 599
