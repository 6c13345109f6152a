"""m3rt's tokenisation equals the transformers tokenizer FlagEmbedding uses, truncation included."""

import pytest
from transformers import AutoTokenizer

from m3rt.tokenizer import M3Tokenizer


@pytest.mark.parametrize("max_length", [2, 3, 16, 100, 8192])
def test_same_ids_as_transformers(exported, texts, max_length):
    ckpt, artifact = exported
    hf = AutoTokenizer.from_pretrained(ckpt)
    ours = M3Tokenizer(artifact / "tokenizer.json")
    long_text = " ".join(texts) * 5
    batch = texts + [long_text]
    want = hf(batch, truncation=True, max_length=max_length)["input_ids"]
    got = ours.encode(batch, max_length=max_length).ids
    assert [g.tolist() for g in got] == want


def test_decode_matches_transformers(exported):
    ckpt, artifact = exported
    hf = AutoTokenizer.from_pretrained(ckpt)
    ours = M3Tokenizer(artifact / "tokenizer.json")
    for token_id in list(range(0, 60)) + [ours.vocab_size - 1]:
        assert ours.decode_id(token_id) == hf.decode([token_id])
