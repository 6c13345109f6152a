"""The device kernels' cases and their exact comparison with the CPU kernels.

Shared by tests/test_cuda_kernels.py: the same named edge cases run on the GPU (`gpu` tests, through
`DeviceKernels`) and, without a GPU, through the C++ emulation of the kernels' sources.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from m3rt.kernels.colbert import colbert_counts, split_colbert
from m3rt.kernels.cuda_api import check, runtime_api
from m3rt.kernels.sparse import SparseRows, aggregate_sparse

SPECIALS = (0, 1, 2, 3)  # XLM-R's <s>, <pad>, </s>, <unk>


def right_padded_mask(rng: np.random.Generator, batch: int, seq_len: int, full: bool = False) -> np.ndarray:
    lengths = np.full(batch, seq_len) if full else rng.integers(0, seq_len + 1, size=batch)
    return (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)


def sparse_case(rng: np.random.Generator, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple]:
    """(weights, ids, mask, specials) for a named edge case."""

    def weights(b: int, s: int) -> np.ndarray:
        return rng.standard_normal((b, s)).astype(np.float32)

    if name == "random":
        w, ids = weights(6, 37), rng.integers(0, 60, (6, 37))
        w[0, :3] = [np.nan, -0.0, 0.0]  # dropped like non-positive weights
        return w, ids, right_padded_mask(rng, 6, 37), SPECIALS
    if name == "batch_1":
        return weights(1, 300), rng.integers(0, 200, (1, 300)), right_padded_mask(rng, 1, 300, True), SPECIALS
    if name == "all_special":
        return np.abs(weights(4, 50)) + 0.1, rng.integers(0, 4, (4, 50)), right_padded_mask(rng, 4, 50), SPECIALS
    if name == "empty_rows":
        mask = right_padded_mask(rng, 8, 40)
        mask[::2] = 0
        return weights(8, 40), rng.integers(0, 100, (8, 40)), mask, SPECIALS
    if name == "all_masked":
        return weights(3, 16), rng.integers(4, 100, (3, 16)), np.zeros((3, 16), np.int64), SPECIALS
    if name == "non_positive":
        w = -np.abs(weights(5, 64))
        w[:, ::7] = 0.0
        return w, rng.integers(4, 100, (5, 64)), right_padded_mask(rng, 5, 64, True), SPECIALS
    if name == "long_8192":
        return weights(3, 8192), rng.integers(0, 250002, (3, 8192)), right_padded_mask(rng, 3, 8192), SPECIALS
    if name == "few_ids_many_repeats":
        # Heavy contention on a handful of slots, with tied maxima (few distinct weights).
        w = rng.integers(-2, 6, (8, 4096)).astype(np.float32) / 4
        return w, rng.integers(2, 9, (8, 4096)), right_padded_mask(rng, 8, 4096, True), SPECIALS
    if name == "large_batch":
        return weights(640, 96), rng.integers(0, 5000, (640, 96)), right_padded_mask(rng, 640, 96), SPECIALS
    if name == "int64_ids":
        # Ids that differ only above bit 32, negative ids, and the extremes: 64-bit hashing and compares.
        pool = np.array([5, 5 + (1 << 32), 5 + (1 << 40), -5, -(1 << 62), (1 << 63) - 1, -(1 << 63), 7], np.int64)
        return weights(4, 200), pool[rng.integers(0, len(pool), (4, 200))], None, ()
    if name == "weights_bs1":
        return weights(3, 33)[..., None], rng.integers(0, 40, (3, 33)), right_padded_mask(rng, 3, 33), SPECIALS
    if name == "no_mask_no_specials":
        return weights(4, 129), rng.integers(0, 30, (4, 129)), None, ()
    if name == "empty_batch":
        return np.zeros((0, 10), np.float32), np.zeros((0, 10), np.int64), np.zeros((0, 10), np.int64), SPECIALS
    raise KeyError(name)


SPARSE_CASES = (
    "random", "batch_1", "all_special", "empty_rows", "all_masked", "non_positive", "long_8192",
    "few_ids_many_repeats", "large_batch", "int64_ids", "weights_bs1", "no_mask_no_specials", "empty_batch",
)  # fmt: skip
# (batch, seq - 1, dim, fp16, all rows full)
COLBERT_CASES = {
    "colbert_random": (5, 20, 8, False, False),
    "colbert_fp16": (5, 20, 8, True, False),
    "colbert_odd_dim": (4, 9, 6, False, False),
    "colbert_odd_dim_fp16": (4, 9, 6, True, False),
    "colbert_8192": (2, 8191, 1024, False, True),
    "colbert_8192_fp16": (2, 8191, 1024, True, False),
    "colbert_large_batch": (300, 15, 32, False, False),
}
CASES = SPARSE_CASES + tuple(COLBERT_CASES)


class _DeviceArrays:
    """Device copies of host arrays via the CUDA runtime (no torch/CuPy), freed on exit.

    The copies are enqueued on `stream`, the stream the kernels then run on, so they are ordered
    before the kernels (a cudaMemcpy on the legacy stream is not ordered before a non-blocking
    stream's work); the host arrays are kept until exit, after the kernels' own synchronize.
    """

    def __init__(self, stream: int) -> None:
        self.cudart = runtime_api()
        self.stream = stream
        self.ptrs: list[int] = []
        self.sources: list[np.ndarray] = []

    def put(self, array: np.ndarray | None) -> int:
        if array is None:
            return 0
        array = np.ascontiguousarray(array)
        ptr = int(check(self.cudart.cudaMalloc(max(array.nbytes, 1))))
        self.ptrs.append(ptr)
        self.sources.append(array)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(self.cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream))
        return ptr

    def __enter__(self) -> _DeviceArrays:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cudart.cudaStreamSynchronize(self.stream)
        for ptr in self.ptrs:
            self.cudart.cudaFree(ptr)


def compare_sparse(got: SparseRows, want: SparseRows) -> str:
    """'' when equal (offsets, ids, order, weight bits), else where they first differ."""
    if not np.array_equal(got.indptr, want.indptr):
        if len(got.indptr) != len(want.indptr):
            return f"{len(got.indptr) - 1} rows, expected {len(want.indptr) - 1}"
        rows = np.flatnonzero(np.diff(got.indptr) != np.diff(want.indptr))[:5].tolist()
        return f"row sizes differ (rows {rows}; totals {got.indptr[-1]} vs {want.indptr[-1]})"
    if not np.array_equal(got.indices, want.indices):
        at = int(np.flatnonzero(got.indices != want.indices)[0])
        return f"ids or their order differ, first at entry {at}: {got.indices[at]} vs {want.indices[at]}"
    if not np.array_equal(got.values.view(np.uint32), want.values.view(np.uint32)):
        at = int(np.flatnonzero(got.values.view(np.uint32) != want.values.view(np.uint32))[0])
        return f"weights differ in bits, first at entry {at}: {got.values[at]!r} vs {want.values[at]!r}"
    return ""


def check_kernels_against_cpu(
    kernels: Any,
    rng: np.random.Generator,
    cases: Iterable[str] = CASES,
) -> list[tuple[str, bool, str]]:
    """Run the device and the CPU kernels on the same inputs; (case, ok, detail) per case.

    Exact comparison: offsets, ids and their order equal, weights equal bit for bit (a max of the
    same floats), ColBERT rows equal bit for bit (fp16 against numpy's astype(float16)). Inputs are
    copied to the device on the non-default stream the kernels then run on.
    """
    cudart = runtime_api()
    check(cudart.cudaSetDevice(kernels.device))
    stream = int(check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking)))
    results: list[tuple[str, bool, str]] = []
    try:
        for case in cases:
            try:
                with _DeviceArrays(stream) as dev:
                    if case in COLBERT_CASES:
                        results.append((case, *_check_colbert(kernels, dev, rng, COLBERT_CASES[case], stream)))
                    else:
                        results.append((case, *_check_sparse(kernels, dev, rng, case, stream)))
            except Exception as exc:  # one broken case must not hide the others
                results.append((case, False, f"{type(exc).__name__}: {exc}"))
    finally:
        cudart.cudaStreamDestroy(stream)
    return results


def _check_sparse(
    kernels: Any, dev: _DeviceArrays, rng: np.random.Generator, case: str, stream: int
) -> tuple[bool, str]:
    w, ids, mask, specials = sparse_case(rng, case)
    w = np.ascontiguousarray(w, np.float32)
    ids = np.ascontiguousarray(ids, np.int64)
    got = kernels.aggregate_sparse(dev.put(w), dev.put(ids), dev.put(mask), w.shape, specials, stream=stream)
    want = aggregate_sparse(w, ids, mask, specials)
    detail = compare_sparse(got, want)
    return (False, detail) if detail else (True, f"{want.indptr[-1]} entries in {want.num_rows} rows")


def _check_colbert(
    kernels: Any, dev: _DeviceArrays, rng: np.random.Generator, spec: tuple, stream: int
) -> tuple[bool, str]:
    batch, rows, dim, fp16, full = spec
    vecs = rng.standard_normal((batch, rows, dim)).astype(np.float32)
    mask = right_padded_mask(rng, batch, rows + 1, full)
    if batch > 1:
        mask[1] = 0  # a row with no vectors at all
    got = kernels.compact_colbert(dev.put(vecs), vecs.shape, colbert_counts(mask), stream=stream, fp16=fp16)
    want = split_colbert(vecs, mask)
    if fp16:
        want = [w.astype(np.float16) for w in want]
    detail = compare_colbert(got, want)
    return (False, detail) if detail else (True, f"{sum(len(w) for w in want)} vectors in {batch} rows")


def compare_colbert(got: list[np.ndarray], want: list[np.ndarray]) -> str:
    """'' when the rows are equal in dtype, shape and bits, else the first difference."""
    if len(got) != len(want):
        return f"{len(got)} rows, expected {len(want)}"
    for r, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"row {r}: {g.dtype}{g.shape}, expected {w.dtype}{w.shape}"
        if g.tobytes() != w.tobytes():
            return f"row {r}: values differ"
    return ""
