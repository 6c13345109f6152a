"""How far one set of outputs is from another, and the thresholds they are held to: the one comparator
of the export's PyTorch check, the precision variants' gates, the runtime's int8 check and the TensorRT
engine check.

`compare_outputs` takes `encode` results of the same texts (all three outputs) from two models;
`HeadStats` accumulates raw head outputs (the export's check against PyTorch, per real position).
`Gate` holds a limit per figure, each its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from m3rt.heads import HEAD_OUTPUTS

TOP_K = 10


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each pair of vectors along the last axis (in float64); two identical zero vectors
    count as 1, a zero vector against a non-zero one as 0."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    dot = (a * b).sum(-1)
    return np.where(norms > 0, dot / np.maximum(norms, 1e-30), np.where(np.abs(a - b).max(-1) == 0, 1.0, 0.0))


class HeadStats:
    """One output head over pairs of vector sets: largest absolute difference, least and mean cosine."""

    def __init__(self) -> None:
        self.max_abs_diff = 0.0
        self.min_cosine = 1.0
        self._cos_sum = 0.0
        self._count = 0

    def add(self, got: np.ndarray, want: np.ndarray) -> None:
        got, want = np.asarray(got), np.asarray(want)
        if got.shape != want.shape:
            raise ValueError(f"outputs of different shapes compared: {got.shape} and {want.shape}")
        if got.size == 0:
            return
        cos = cosines(got, want).reshape(-1)
        self.max_abs_diff = max(self.max_abs_diff, float(np.abs(got.astype(np.float64) - want).max()))
        self.min_cosine = min(self.min_cosine, float(cos.min()))
        self._cos_sum += float(cos.sum())
        self._count += cos.size

    @property
    def mean_cosine(self) -> float:
        return self._cos_sum / self._count if self._count else 1.0

    def as_dict(self) -> dict[str, float]:
        return {"max_abs_diff": self.max_abs_diff, "min_cosine": self.min_cosine}


def _top(weights: Mapping[str, float], k: int) -> set[str]:
    return set(sorted(weights, key=weights.__getitem__, reverse=True)[:k])


def compare_outputs(got: dict[str, Any], want: dict[str, Any], top_k: int = TOP_K) -> dict[str, float]:
    """Dense and per-vector ColBERT cosine (min, mean); sparse top-k overlap, Jaccard of kept
    tokens and weight error on shared tokens (max, and mean relative to the text's top weight)."""
    if len(got["dense_vecs"]) != len(want["dense_vecs"]) or len(got["colbert_vecs"]) != len(want["colbert_vecs"]):
        raise ValueError("outputs of different numbers of texts compared")
    dense, colbert = HeadStats(), HeadStats()
    dense.add(got["dense_vecs"], want["dense_vecs"])
    for g, w in zip(got["colbert_vecs"], want["colbert_vecs"]):
        colbert.add(g, w)
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
        "texts": len(got["dense_vecs"]),
        "dense_cos_min": dense.min_cosine,
        "dense_cos_mean": dense.mean_cosine,
        "dense_max_abs_diff": dense.max_abs_diff,
        "colbert_cos_min": colbert.min_cosine,
        "colbert_cos_mean": colbert.mean_cosine,
        "colbert_max_abs_diff": colbert.max_abs_diff,
        f"sparse_top{top_k}_overlap": float(np.mean(overlaps)) if overlaps else 1.0,
        "sparse_jaccard": float(np.mean(jaccards)) if jaccards else 1.0,
        "sparse_weight_max_abs_err": float(np.max(abs_errors)) if abs_errors else 0.0,
        "sparse_weight_mean_rel_err": float(np.mean(rel_errors)) if rel_errors else 0.0,
    }


def flat_figures(figures: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{"heads": {"dense_vecs": {"min_cosine": x}}} -> {"heads.dense_vecs.min_cosine": x}; numbers only."""
    flat: dict[str, float] = {}
    for key, value in figures.items():
        if isinstance(value, Mapping):
            flat.update(flat_figures(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


# Figures that must stay at or below their limit (differences, errors); every other one at or above.
_UPPER_BOUNDED = ("max_abs", "_err")


class Gate:
    """A limit per checked figure (`compare_outputs` names, or dotted paths into nested figures such as
    "heads.dense_vecs.min_cosine"); a figure without a limit is not checked. Differences and errors are
    upper bounds, cosines and overlaps lower bounds. A limited figure that was not measured, or is not
    finite, fails."""

    def __init__(self, limits: Mapping[str, float | None] | None = None, /, **named: float | None) -> None:
        merged = {**(limits or {}), **named}
        self.limits = {name: float(limit) for name, limit in merged.items() if limit is not None}

    @staticmethod
    def is_upper_bound(name: str) -> bool:
        return any(part in name for part in _UPPER_BOUNDED)

    def failures(self, figures: Mapping[str, Any]) -> list[str]:
        flat = flat_figures(figures)
        found = []
        for name, limit in self.limits.items():
            value = flat.get(name)
            if value is None:
                found.append(f"{name} not measured")
            elif self.is_upper_bound(name) and not value <= limit:
                found.append(f"{name} {value:.5g} > {limit:g}")
            elif not self.is_upper_bound(name) and not (math.isfinite(value) and value >= limit):
                found.append(f"{name} {value:.7g} < {limit:g}")
        return found

    def as_record(self) -> dict[str, float]:
        """What the manifest records (`Gate(record)` reads it back)."""
        return dict(self.limits)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Gate) and other.limits == self.limits

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.limits.items())))

    def __repr__(self) -> str:
        return f"Gate({self.limits!r})"


def reference_gate(
    min_cosine: float = 0.99999, max_abs_diff: float = 1e-3, heads: Iterable[str] = HEAD_OUTPUTS
) -> Gate:
    """An exported graph against the PyTorch reference: every head's least cosine and largest abs difference."""
    limits: dict[str, float] = {}
    for head in heads:
        limits[f"heads.{head}.min_cosine"] = min_cosine
        limits[f"heads.{head}.max_abs_diff"] = max_abs_diff
    return Gate(limits)


REFERENCE_GATE = reference_gate()

# A TensorRT engine against ONNX Runtime on the same graph: the same model, so only kernel-level
# differences are allowed (a silent miscompile fails the export).
ENGINE_GATE = Gate(dense_cos_min=0.999, colbert_cos_mean=0.999)

DEFAULT_GATES = {
    "fp16": Gate(dense_cos_min=0.999),
    "int8": Gate(dense_cos_min=0.99, colbert_cos_mean=0.98, sparse_top10_overlap=0.9),
    # OpenVINO's bf16 inference precision on the fp32 graph (`m3rt.bf16_gate`).
    "bf16": Gate(dense_cos_min=0.999, colbert_cos_mean=0.999, sparse_top10_overlap=0.95, sparse_jaccard=0.9),
}

def gate_for(name: str, gates: Mapping[str, Gate] | None = None) -> Gate:
    """The gate of a graph named in the manifest ("int8-u8" -> the "int8" gate), from `gates` or the defaults."""
    chosen = DEFAULT_GATES if gates is None else gates
    return chosen.get(name.split("-")[0], Gate())
