"""Sparse (lexical) aggregation: per-token weights -> per-text {token id: weight}.

FlagEmbedding's rule (`M3Embedder._process_token_weights`): drop the special ids (`<s>`, `</s>`,
`<pad>`, `<unk>`) and weights that are not strictly positive, keep the max weight of a repeated id,
key the result by `str(id)` in order of first kept occurrence. This kernel does the same for a
whole padded batch with array operations only, producing CSR rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SparseRows:
    """CSR rows: row `r` holds `indices[indptr[r]:indptr[r+1]]` with `values` alongside.

    Within a row, entries are in order of each id's first kept occurrence in the text (the order
    FlagEmbedding's dicts have), not sorted by id.
    """

    indptr: np.ndarray  # int64 [rows + 1]
    indices: np.ndarray  # int64 token ids
    values: np.ndarray  # float32 weights, all > 0

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1

    def to_dicts(self) -> list[dict[str, np.float32]]:
        """FlagEmbedding's `lexical_weights`: {str(token_id): np.float32 weight} per row."""
        keys = self.indices.astype(str).tolist()
        values = list(self.values)  # np.float32 scalars, as FlagEmbedding returns them
        bounds = self.indptr.tolist()
        return [dict(zip(keys[lo:hi], values[lo:hi])) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def to_scipy(self, vocab_size: int):
        """A `scipy.sparse.csr_matrix` of shape [rows, vocab_size] (needs the `scipy` extra)."""
        try:
            from scipy.sparse import csr_matrix
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("to_scipy needs scipy: pip install 'm3rt[scipy]'") from exc
        if self.indices.size and int(self.indices.max()) >= vocab_size:
            raise ValueError(f"token id {int(self.indices.max())} does not fit vocab_size={vocab_size}")
        matrix = csr_matrix((self.values, self.indices, self.indptr), shape=(self.num_rows, vocab_size), copy=True)
        matrix.sort_indices()
        return matrix

    @staticmethod
    def concat(parts: Iterable[SparseRows]) -> SparseRows:
        parts = list(parts)
        if not parts:
            return SparseRows(np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        offsets = np.cumsum([0] + [p.indptr[-1] for p in parts[:-1]])
        indptr = np.concatenate([[0]] + [p.indptr[1:] + off for p, off in zip(parts, offsets)])
        return SparseRows(
            indptr.astype(np.int64),
            np.concatenate([p.indices for p in parts]),
            np.concatenate([p.values for p in parts]),
        )

    def take(self, rows: np.ndarray) -> SparseRows:
        """The rows in the given order (used to restore input order after length sorting)."""
        rows = np.asarray(rows, dtype=np.int64)
        counts = (self.indptr[1:] - self.indptr[:-1])[rows]
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        starts = self.indptr[rows]
        # Gather positions of every selected entry without a Python loop over entries.
        gather = np.repeat(starts - indptr[:-1], counts) + np.arange(indptr[-1])
        return SparseRows(indptr, self.indices[gather], self.values[gather])


def aggregate_sparse(
    weights: np.ndarray,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    special_ids: Iterable[int],
) -> SparseRows:
    """Aggregate per-token weights [B, S] of token ids [B, S] into CSR rows.

    `attention_mask` (optional) additionally drops masked positions; FlagEmbedding relies on the
    pad id being special, which gives the same result for right-padded batches.
    """
    weights = np.asarray(weights)
    input_ids = np.asarray(input_ids)
    if weights.ndim == 3 and weights.shape[-1] == 1:
        weights = weights[..., 0]
    if weights.shape != input_ids.shape or weights.ndim != 2:
        raise ValueError(f"weights {weights.shape} and input_ids {input_ids.shape} must both be [batch, seq]")
    rows_total = weights.shape[0]

    keep = weights > 0
    keep &= ~np.isin(input_ids, np.fromiter(special_ids, dtype=np.int64))
    if attention_mask is not None:
        keep &= np.asarray(attention_mask) != 0

    row, pos = np.nonzero(keep)  # row-major: positions ascend within a row
    if row.size == 0:
        return SparseRows(np.zeros(rows_total + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    ids = input_ids[row, pos].astype(np.int64)
    vals = weights[row, pos].astype(np.float32)

    # Group equal (row, id); inside a group, the largest weight first.
    order = np.lexsort((-vals, ids, row))
    row, ids, vals, pos = row[order], ids[order], vals[order], pos[order]
    starts = np.flatnonzero(np.r_[True, (row[1:] != row[:-1]) | (ids[1:] != ids[:-1])])
    first_pos = np.minimum.reduceat(pos, starts)
    row, ids, vals = row[starts], ids[starts], vals[starts]

    # Back to first-occurrence order within each row.
    order = np.lexsort((first_pos, row))
    row, ids, vals = row[order], ids[order], vals[order]
    indptr = np.zeros(rows_total + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=rows_total), out=indptr[1:])
    return SparseRows(indptr, ids, vals)
