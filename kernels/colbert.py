"""ColBERT trimming: each text keeps `tokens_num - 1` vectors (`<s>` dropped, `</s>` kept)."""

from __future__ import annotations

import numpy as np


def split_colbert(colbert_vecs: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
    """Per-row copies of the real vectors of a right-padded batch [B, S-1, D].

    Copies, so that a returned text does not keep the whole padded batch alive.
    """
    counts = np.asarray(attention_mask).sum(axis=1) - 1
    return [np.array(colbert_vecs[r, : max(int(n), 0)]) for r, n in enumerate(counts)]


def colbert_counts(attention_mask: np.ndarray) -> np.ndarray:
    """Per-row ColBERT vector counts of a right-padded batch: mask.sum() - 1, at least 0."""
    mask = np.asarray(attention_mask)
    return np.maximum(np.count_nonzero(mask, axis=1).astype(np.int64) - 1, 0)
