"""Scores with FlagEmbedding's exact definitions (see docs: reference semantics, section 2.4-2.6)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from m3rt.errors import InputError


def lexical_matching_score(lw1: Mapping[str, float], lw2: Mapping[str, float]) -> float:
    """Sum of weight products over shared token ids (unnormalised by design)."""
    if len(lw2) < len(lw1):
        lw1, lw2 = lw2, lw1
    score = 0
    for token, weight in lw1.items():
        other = lw2.get(token)
        if other is not None:
            score += weight * other
    return score


def lexical_matching_scores(lexical_weights_1, lexical_weights_2):
    """dict x dict -> float; list x list -> [len1, len2] matrix (FlagEmbedding's contract)."""
    if isinstance(lexical_weights_1, Mapping) and isinstance(lexical_weights_2, Mapping):
        return lexical_matching_score(lexical_weights_1, lexical_weights_2)
    if isinstance(lexical_weights_1, list) and isinstance(lexical_weights_2, list):
        return np.array([[lexical_matching_score(a, b) for b in lexical_weights_2] for a in lexical_weights_1])
    raise InputError("lexical weights must be two dicts or two lists of dicts")


def colbert_score(q_reps: np.ndarray, p_reps: np.ndarray, padded_passage: bool = False) -> np.float32:
    """Mean over query vectors of the max similarity to any passage vector.

    `padded_passage` reproduces FlagEmbedding's `compute_score`, whose batched passages keep their
    zero padding rows, so a max below 0 becomes 0 for any passage shorter than its batch's longest.
    """
    q = np.asarray(q_reps, dtype=np.float32)
    p = np.asarray(p_reps, dtype=np.float32)
    if q.ndim != 2 or p.ndim != 2 or q.shape[1] != p.shape[1]:
        raise InputError(f"ColBERT vectors must be [n, dim] with equal dim, got {q.shape} and {p.shape}")
    if q.shape[0] == 0:
        raise InputError("the query has no ColBERT vectors")
    best = (q @ p.T).max(axis=1) if p.shape[0] else np.full(q.shape[0], -np.inf, np.float32)
    if padded_passage:
        best = np.maximum(best, 0)
    return np.float32(best.sum(dtype=np.float32) / np.float32(q.shape[0]))


def combine_scores(
    dense: np.ndarray, sparse: np.ndarray, colbert: np.ndarray, weights: list[float] | None
) -> dict[str, np.ndarray]:
    if weights is None:
        weights, weight_sum = [1.0, 1.0, 1.0], 3
    else:
        if len(weights) != 3:
            raise InputError("weights_for_different_modes must have 3 entries: [dense, sparse, colbert]")
        weight_sum = sum(weights)
    w_dense, w_sparse, w_colbert = weights
    return {
        "colbert": colbert,
        "sparse": sparse,
        "dense": dense,
        "sparse+dense": (sparse * w_sparse + dense * w_dense) / (w_sparse + w_dense),
        "colbert+sparse+dense": (colbert * w_colbert + sparse * w_sparse + dense * w_dense) / weight_sum,
    }


def pair_scores(
    queries: Mapping[str, Any], passages: Mapping[str, Any], batch_size: int, weights: list[float] | None
) -> dict[str, np.ndarray]:
    """`compute_score`'s scores of pair i = (queries row i, passages row i), from the three outputs of
    both sides (`encode`'s dict, lexical weights as dicts), as float32 arrays per score name."""
    dense = np.einsum("ij,ij->i", queries["dense_vecs"], passages["dense_vecs"]).astype(np.float32)
    sparse = np.array(
        [lexical_matching_score(q, p) for q, p in zip(queries["lexical_weights"], passages["lexical_weights"])],
        dtype=np.float32,
    )
    # FlagEmbedding pads passages per chunk of batch_size pairs: shorter ones see zero rows.
    p_counts = np.array([len(v) for v in passages["colbert_vecs"]])
    padded = np.zeros(len(p_counts), dtype=bool)
    for start in range(0, len(p_counts), batch_size):
        chunk = slice(start, start + batch_size)
        padded[chunk] = p_counts[chunk] < p_counts[chunk].max()
    colbert = np.array(
        [
            colbert_score(q, p, padded_passage=bool(pad))
            for q, p, pad in zip(queries["colbert_vecs"], passages["colbert_vecs"], padded)
        ],
        dtype=np.float32,
    )
    return combine_scores(dense, sparse, colbert, weights)
