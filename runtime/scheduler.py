"""Token-budget batching: longest first, never padded past a batch's longest member."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batch:
    """Row `k` of the padded arrays is input text `indices[k]` (its index in the caller's input)."""

    indices: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens: what the progress bar counts."""
        return int(self.attention_mask.sum())


def plan_batches(
    lengths: np.ndarray, batch_size: int, token_budget: int, max_rows: Callable[[int], int] | None = None
) -> list[np.ndarray]:
    """Group text indices into batches, sorted by length descending.

    A batch holds at most `batch_size` texts and at most `token_budget` padded tokens
    (rows x longest row); a text longer than the budget runs alone. `max_rows(longest)`, when given,
    caps the rows further (a memory budget: `m3rt.memory`).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        rows = max(1, min(batch_size, token_budget // max(longest, 1)))
        if max_rows is not None:
            rows = max(1, min(rows, max_rows(longest)))
        batches.append(order[start : start + rows])
        start += rows
    return batches


def pad_batch(
    ids: list[np.ndarray], indices: np.ndarray, pad_id: int, first_index: int = 0, width: int | None = None
) -> Batch:
    """Right-pad the selected texts: XLM-R position ids assume right padding.

    `indices` are positions in `ids`; `ids[0]` is input text `first_index` (texts are tokenised in
    chunks), so the batch's `indices` are `first_index + indices`. `width` pads past the longest.
    """
    longest = max(len(ids[i]) for i in indices)
    width = longest if width is None else max(width, longest)
    input_ids = np.full((len(indices), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(indices), width), dtype=np.int64)
    for row, index in enumerate(indices):
        seq = ids[index]
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
    indices = np.asarray(indices, dtype=np.int64) + first_index
    return Batch(indices=indices, input_ids=input_ids, attention_mask=attention_mask)


def take_rows(batch: Batch, start: int, stop: int) -> Batch:
    """Rows `start:stop` of a padded batch (in order), trimmed to their own longest member: the same
    arrays `pad_batch` would build for those texts, without needing their token ids again."""
    rows = slice(start, stop)
    mask = batch.attention_mask[rows]
    width = int(mask.sum(axis=1).max())
    # Contiguous copies: backends hand the arrays to native code as they are.
    return Batch(
        batch.indices[rows],
        np.ascontiguousarray(batch.input_ids[rows, :width]),
        np.ascontiguousarray(mask[:, :width]),
    )


def split_batch(batch: Batch) -> tuple[Batch, Batch]:
    """Halve a padded batch (rows kept in order), each half trimmed to its own longest member: how a
    batch that ran out of memory is retried."""
    if len(batch.indices) < 2:
        raise ValueError("a batch of one text cannot be split")
    half = len(batch.indices) // 2
    return take_rows(batch, 0, half), take_rows(batch, half, len(batch.indices))


def token_lengths(ids: list[np.ndarray]) -> np.ndarray:
    return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
