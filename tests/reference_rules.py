"""Plain-Python statements of FlagEmbedding's post-processing, independent of m3rt's kernels."""

from __future__ import annotations

import numpy as np

UNUSED = {0, 1, 2, 3}  # <s>, <pad>, </s>, <unk>


def lexical_weights(weights, ids, unused=UNUSED) -> dict[str, float]:
    result: dict[str, float] = {}
    for w, idx in zip(weights, ids):
        if idx not in unused and w > 0:
            key = str(int(idx))
            if w > result.get(key, 0):
                result[key] = w
    return result


def colbert_rows(colbert, mask) -> np.ndarray:
    return colbert[: int(np.sum(mask)) - 1]
