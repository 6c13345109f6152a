"""m3rt against the PyTorch model, written here from transformers + torch (not m3rt's exporter)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, PreTrainedTokenizerFast

from m3rt import M3Model

from parity import assert_outputs
from reference_rules import colbert_rows, lexical_weights


def _heads(ckpt, hidden):
    heads = []
    for name, out in (("colbert_linear.pt", hidden), ("sparse_linear.pt", 1)):
        linear = torch.nn.Linear(hidden, out)
        linear.load_state_dict(torch.load(ckpt / name, map_location="cpu", weights_only=True))
        heads.append(linear.float())
    return heads


@torch.no_grad()
def pytorch_encode(ckpt, texts, max_length):
    # The checkpoint's tokenizer.json as transformers' fast tokenizer loads it, which is what
    # FlagEmbedding (transformers 4) runs. Transformers 5's XLMRobertaTokenizer rebuilds the pipeline
    # itself and encodes a whitespace-only text as [<s>, </s>], without the "▁" token.
    tok = PreTrainedTokenizerFast.from_pretrained(ckpt)
    encoder = AutoModel.from_pretrained(ckpt).float().eval()
    colbert_linear, sparse_linear = _heads(ckpt, encoder.config.hidden_size)
    dense, lexical, colbert = [], [], []
    for start in range(0, len(texts), 5):  # unsorted batches of 5: padding everywhere
        inputs = tok(
            texts[start : start + 5], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        h = encoder(**inputs).last_hidden_state
        mask = inputs["attention_mask"]
        dense.append(F.normalize(h[:, 0], dim=-1).numpy())
        weights = torch.relu(sparse_linear(h)).squeeze(-1).numpy()
        cvecs = F.normalize(colbert_linear(h[:, 1:]) * mask[:, 1:, None].float(), dim=-1).numpy()
        for r in range(len(mask)):
            lexical.append(lexical_weights(weights[r].tolist(), inputs["input_ids"][r].tolist()))
            colbert.append(colbert_rows(cvecs[r], mask[r].numpy()))
    return {"dense_vecs": np.concatenate(dense), "lexical_weights": lexical, "colbert_vecs": colbert}


@pytest.mark.parametrize("batch_size,max_length", [(256, 8192), (3, 64)])
def test_encode_matches_pytorch(exported, texts, batch_size, max_length):
    ckpt, artifact = exported
    ours = M3Model.load(artifact).encode(
        texts,
        batch_size=batch_size,
        max_length=max_length,
        return_dense=True,
        return_sparse=True,
        return_colbert_vecs=True,
    )
    assert_outputs(ours, pytorch_encode(ckpt, texts, max_length))


def test_small_token_budget_changes_batching_not_results(exported, texts):
    ckpt, artifact = exported
    model = M3Model.load(artifact, token_budget=64)
    ours = model.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert_outputs(ours, pytorch_encode(ckpt, texts, 8192))
