"""The PyTorch reference: encoder + BGE-M3's three heads, exactly as FlagEmbedding computes them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class M3Reference(nn.Module):
    """(input_ids, attention_mask) -> (dense_vecs, sparse_weights, colbert_vecs).

    dense: normalize(h[:, 0]); sparse: relu(sparse_linear(h)) per token; colbert:
    normalize(colbert_linear(h[:, 1:]) * mask[:, 1:]) (padding rows stay 0).
    """

    def __init__(self, encoder: nn.Module, colbert_linear: nn.Linear, sparse_linear: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.colbert_linear = colbert_linear
        self.sparse_linear = sparse_linear

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        dense = F.normalize(hidden[:, 0], dim=-1)
        sparse = torch.relu(self.sparse_linear(hidden)).squeeze(-1)
        colbert = self.colbert_linear(hidden[:, 1:]) * attention_mask[:, 1:, None].to(hidden.dtype)
        colbert = F.normalize(colbert, dim=-1)
        return dense, sparse, colbert
