"""8192-token inputs (the model's hard limit, <s> and </s> included) against FlagEmbedding."""

import pytest

from m3rt import M3Model

from parity import assert_outputs

flag_embedding = pytest.importorskip("FlagEmbedding")


def test_8192_tokens_and_beyond(tiny, texts):
    ckpt, artifact = tiny
    model = M3Model.load(artifact)
    very_long = " ".join(texts) * 40  # far over 8192 tokens: truncated
    batch = [very_long, texts[3], "short"]
    ours = model.encode(batch, max_length=8192, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert ours["colbert_vecs"][0].shape[0] == 8191
    reference = flag_embedding.BGEM3FlagModel(str(ckpt), use_fp16=False, devices="cpu")
    want = reference.encode(batch, max_length=8192, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert_outputs(ours, want)
