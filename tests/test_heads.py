"""The heads' registry: every place that names an output reads it from `m3rt.heads.HEADS`."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from m3rt.heads import HEAD_OUTPUTS, HEADS, head
from m3rt.postprocess import OutputCollector
from m3rt.scheduler import pad_batch


def test_every_head_is_an_output_of_the_exported_graph_with_its_recorded_rank(tiny_model):
    graph = onnx.load(str(tiny_model.backend.graph_path), load_external_data=False).graph
    ranks = {o.name: len(o.type.tensor_type.shape.dim) for o in graph.output}
    recorded = tiny_model.manifest.data["graphs"]["fp32"]["outputs"]
    for spec in HEADS:
        assert ranks[spec.output] == len(recorded[spec.output]["shape"]), spec.output


def test_a_head_is_found_by_any_of_its_names():
    for spec in HEADS:
        assert head(spec.output) is head(spec.api) is head(spec.flag) is head(spec.serve) is spec
    with pytest.raises(KeyError, match="unknown head"):
        head("hidden_states")


def test_encode_and_the_collector_answer_in_head_order(tiny_model):
    out = tiny_model.encode(["a b", "c"], return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert list(out) == [spec.api for spec in HEADS]
    ids = tiny_model.tokenizer.encode(["a b", "c"], 512).ids
    batch = pad_batch(ids, np.array([1, 0]), tiny_model.pad_id)
    collector = OutputCollector(2, tiny_model.manifest.hidden_size, HEAD_OUTPUTS[::-1], tiny_model.postprocessor)
    collector.add(batch, tiny_model.backend.run(batch.input_ids, batch.attention_mask, HEAD_OUTPUTS))
    dense, sparse, colbert = collector.finish()
    np.testing.assert_allclose(dense, out["dense_vecs"], atol=1e-6)
    assert sparse.to_dicts() == out["lexical_weights"]
    assert [c.shape for c in colbert] == [c.shape for c in out["colbert_vecs"]]


def test_the_collector_refuses_an_unknown_output_and_a_missing_one(tiny_model):
    with pytest.raises(ValueError, match="unknown outputs"):
        OutputCollector(1, tiny_model.manifest.hidden_size, ["hidden_states"], tiny_model.postprocessor)
    ids = tiny_model.tokenizer.encode(["a"], 512).ids
    batch = pad_batch(ids, np.array([0]), tiny_model.pad_id)
    collector = OutputCollector(
        1, tiny_model.manifest.hidden_size, ["dense_vecs"], tiny_model.postprocessor, hidden_rows={0: np.array([0])}
    )
    with pytest.raises(RuntimeError, match="returned no last_hidden_state"):
        collector.add(batch, tiny_model.backend.run(batch.input_ids, batch.attention_mask, ["dense_vecs"]))
