"""Token-budget batching: longest first, never padded past a batch's longest member."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batch:
    """Row `k` of the padded arrays is input text `indices[k]`."""

    indices: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray


def plan_batches(lengths: np.ndarray, batch_size: int, token_budget: int) -> list[np.ndarray]:
    """Group text indices into batches, sorted by length descending.

    A batch holds at most `batch_size` texts and at most `token_budget` padded tokens
    (rows x longest row); a text longer than the budget runs alone.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        rows = max(1, min(batch_size, token_budget // max(longest, 1)))
        batches.append(order[start : start + rows])
        start += rows
    return batches


def pad_batch(ids: list[np.ndarray], indices: np.ndarray, pad_id: int) -> Batch:
    """Right-pad the selected texts: XLM-R position ids assume right padding."""
    width = max(len(ids[i]) for i in indices)
    input_ids = np.full((len(indices), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(indices), width), dtype=np.int64)
    for row, index in enumerate(indices):
        seq = ids[index]
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
    return Batch(indices=indices, input_ids=input_ids, attention_mask=attention_mask)


def iter_batches(ids: list[np.ndarray], batch_size: int, token_budget: int, pad_id: int) -> Iterator[Batch]:
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    for indices in plan_batches(lengths, batch_size, token_budget):
        yield pad_batch(ids, indices, pad_id)
