"""Assertions with the issue's tolerances, shared by the parity tests."""

from __future__ import annotations

import numpy as np

COS = 0.99999
# 1e-5 relative to the text's largest weight: a weight near 0 is the difference of a 1024-term dot
# product and a bias, so its own relative error reflects fp32 summation order, not a wrong result
# (PyTorch disagrees with itself by as much at another batch padding).
SPARSE_RTOL = 1e-5
SCORE_TOL = 1e-5


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def assert_dense(ours, ref):
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert cosines(ours, ref).min() >= COS


def assert_sparse(ours, ref):
    assert len(ours) == len(ref)
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert set(o) == set(r), f"text {i}: sparse keys differ: {set(o) ^ set(r)}"
        keys = sorted(r)
        want = np.array([float(r[k]) for k in keys])
        scale = want.max() if keys else 0.0
        np.testing.assert_allclose(
            [o[k] for k in keys], want, rtol=SPARSE_RTOL, atol=SPARSE_RTOL * scale, err_msg=f"text {i}"
        )


def assert_colbert(ours, ref):
    assert len(ours) == len(ref)
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert o.shape == r.shape, f"text {i}: {o.shape} vs {r.shape}"
        assert cosines(o, r).min() >= COS, f"text {i}"


def assert_outputs(ours: dict, ref: dict):
    assert_dense(ours["dense_vecs"], ref["dense_vecs"])
    assert_sparse(ours["lexical_weights"], ref["lexical_weights"])
    assert_colbert(ours["colbert_vecs"], ref["colbert_vecs"])
