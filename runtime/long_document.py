"""Documents longer than the model's window: what the document level computes beyond `max_length`.

- "windows" (default): the text is cut into `max_length` windows overlapping by `document_overlap`
  tokens (ends snapped to sentence ends nearby), each encoded in full. Each token is *owned* by the
  window in which it sits furthest from an edge (consecutive windows split their overlap in the
  middle). The document's dense vector is the normalised mean of the windows' dense vectors weighted
  by the tokens each owns; its lexical weights are the maximum per token over windows (as within one
  window); its ColBERT vectors are every token's vector from its owning window, then the last
  window's `</s>` vector, the same layout as `encode`. A text that fits is one window: exactly `encode`.
- "truncate": FlagEmbedding's behaviour, the first `max_length` tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

LONG_DOCUMENT_STRATEGIES = ("windows", "truncate")

Window = tuple[tuple[int, int], int]  # ((first token, end token) of the text, sequence index)


def owned_ranges(windows: Sequence[Window]) -> list[tuple[int, int]]:
    """The text tokens `[lo, hi)` each window owns: consecutive windows split their overlap midway."""
    cuts = [windows[0][0][0]]
    for (prev, _), (cur, _) in zip(windows, windows[1:]):
        cuts.append((cur[0] + prev[1]) // 2)
    cuts.append(windows[-1][0][1])
    return list(zip(cuts[:-1], cuts[1:]))


def stitch_windows(windows: Sequence[Window], results: Any, covered: int) -> dict[str, np.ndarray]:
    """Per text token `0..covered`: its sparse weight and ColBERT vector from its owning window."""
    out: dict[str, np.ndarray] = {}
    owned = owned_ranges(windows)
    if results.token_weights[windows[0][1]] is not None:
        weights = results.token_weights
        parts = [weights[seq][1 + lo - w0 : 1 + hi - w0] for ((w0, _), seq), (lo, hi) in zip(windows, owned)]
        out["sparse_weights"] = np.concatenate(parts).astype(np.float32)[:covered]
    if results.colbert[windows[0][1]] is not None:
        parts = [results.colbert[seq][lo - w0 : hi - w0] for ((w0, _), seq), (lo, hi) in zip(windows, owned)]
        out["colbert_vecs"] = np.concatenate(parts).astype(np.float32)[:covered]
    return out


def pool_windows(windows: Sequence[Window], results: Any, num_tokens: int) -> dict[str, Any]:
    """The document's outputs from its windows' (see the module's description)."""
    out: dict[str, Any] = {}
    if len(windows) == 1:
        seq = windows[0][1]
        if results.dense[seq] is not None:
            out["dense_vecs"] = results.dense[seq][None]
        if results.lexical[seq] is not None:
            out["lexical_weights"] = [results.lexical[seq]]
        if results.colbert[seq] is not None:
            out["colbert_vecs"] = [results.colbert[seq]]
        return out
    owned = owned_ranges(windows)
    sequences = [seq for _, seq in windows]
    if results.dense[sequences[0]] is not None:
        weights = np.array([hi - lo for lo, hi in owned], dtype=np.float64)
        mean = (np.stack([results.dense[s] for s in sequences]).astype(np.float64) * weights[:, None]).sum(axis=0)
        out["dense_vecs"] = (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)[None]
    if results.lexical[sequences[0]] is not None:
        merged: dict[str, np.float32] = {}
        for seq in sequences:
            for token, weight in results.lexical[seq].items():
                if token not in merged or weight > merged[token]:
                    merged[token] = weight
        out["lexical_weights"] = [merged]
    if results.colbert[sequences[0]] is not None:
        tokens = stitch_windows(windows, results, num_tokens)["colbert_vecs"]
        eos = results.colbert[sequences[-1]][-1:]
        out["colbert_vecs"] = [np.concatenate([tokens, eos])]
    return out
