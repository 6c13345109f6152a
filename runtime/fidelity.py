"""How far a variant's outputs are from the fp32 reference: the metrics of the accuracy gates.

Inputs are `encode` results of the same texts (all three outputs) from two models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

TOP_K = 10


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each pair of vectors along the last axis (in float64); two identical zero vectors
    count as 1, a zero vector against a non-zero one as 0."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    dot = (a * b).sum(-1)
    return np.where(norms > 0, dot / np.maximum(norms, 1e-30), np.where(np.abs(a - b).max(-1) == 0, 1.0, 0.0))


def _top(weights: Mapping[str, float], k: int) -> set[str]:
    return set(sorted(weights, key=weights.__getitem__, reverse=True)[:k])


def compare_outputs(got: dict[str, Any], want: dict[str, Any], top_k: int = TOP_K) -> dict[str, float]:
    """Dense and per-vector ColBERT cosine (min, mean); sparse top-k overlap, Jaccard of kept
    tokens and weight error on shared tokens (max, and mean relative to the text's top weight)."""
    dense = cosines(got["dense_vecs"], want["dense_vecs"])
    colbert = np.concatenate(
        [cosines(g, w) for g, w in zip(got["colbert_vecs"], want["colbert_vecs"]) if len(w)] or [np.ones(1)]
    )
    overlaps, jaccards, abs_errors, rel_errors = [], [], [], []
    for g, w in zip(got["lexical_weights"], want["lexical_weights"]):
        if not w and not g:
            continue
        reference_top = _top(w, top_k)
        overlaps.append(len(_top(g, top_k) & reference_top) / max(len(reference_top), 1))
        jaccards.append(len(g.keys() & w.keys()) / len(g.keys() | w.keys()))
        shared = list(g.keys() & w.keys())
        if shared:
            diff = np.abs(np.array([float(g[k]) for k in shared]) - np.array([float(w[k]) for k in shared]))
            abs_errors.append(diff.max())
            rel_errors.append(diff.mean() / max(float(max(w.values())), 1e-12))
    return {
        "texts": len(dense),
        "dense_cos_min": float(dense.min()) if dense.size else 1.0,
        "dense_cos_mean": float(dense.mean()) if dense.size else 1.0,
        "colbert_cos_min": float(colbert.min()),
        "colbert_cos_mean": float(colbert.mean()),
        f"sparse_top{top_k}_overlap": float(np.mean(overlaps)) if overlaps else 1.0,
        "sparse_jaccard": float(np.mean(jaccards)) if jaccards else 1.0,
        "sparse_weight_max_abs_err": float(np.max(abs_errors)) if abs_errors else 0.0,
        "sparse_weight_mean_rel_err": float(np.mean(rel_errors)) if rel_errors else 0.0,
    }


@dataclass(frozen=True)
class Gate:
    """Least acceptable figures; None leaves a metric unchecked."""

    dense_cos_min: float | None = None
    colbert_cos_mean: float | None = None
    sparse_top10_overlap: float | None = None
    # Lexical key agreement: mean Jaccard of the kept tokens' sets.
    sparse_jaccard: float | None = None

    def failures(self, figures: Mapping[str, float]) -> list[str]:
        return [
            f"{name} {figures[name]:.5f} < {limit}"
            for name, limit in vars(self).items()
            if limit is not None and figures[name] < limit
        ]


# A TensorRT engine against ONNX Runtime on the same graph: the same model, so only kernel-level
# differences are allowed (a silent miscompile fails the export).
ENGINE_GATE = Gate(dense_cos_min=0.999, colbert_cos_mean=0.999)

DEFAULT_GATES = {
    "fp16": Gate(dense_cos_min=0.999),
    "int8": Gate(dense_cos_min=0.99, colbert_cos_mean=0.98, sparse_top10_overlap=0.9),
    # OpenVINO's bf16 inference precision on the fp32 graph (`m3rt.bf16_gate`).
    "bf16": Gate(dense_cos_min=0.999, colbert_cos_mean=0.999, sparse_top10_overlap=0.95, sparse_jaccard=0.9),
}
