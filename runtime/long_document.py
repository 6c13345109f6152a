"""Documents and their windows: what the document level computes, within and beyond `max_length`.

- "windows" (default): a text longer than `max_length` is cut into `max_length` windows overlapping
  by `document_overlap` tokens (ends snapped to sentence ends nearby), each encoded in full. Each
  token is *owned* by the window in which it sits furthest from an edge (consecutive windows split
  their overlap in the middle). The document's dense vector is the normalised mean of the windows'
  dense vectors weighted by the tokens each owns; its lexical weights are the maximum per token over
  windows (as within one window); its ColBERT vectors are every token's vector from its owning
  window, then the last window's `</s>` vector, the layout of `encode`. A text that fits is one
  window: exactly `encode`.
- "mcls": multiple CLS (BGE-M3 paper, arXiv 2402.03216, section 3.4): a `<s>` is inserted before
  every `MCLS_STRIDE` (256) tokens and the dense vector is the normalised mean of the last hidden
  states at all `<s>` positions. The inserted tokens cost one position each, so a window holds
  `mcls_capacity(max_length)` text tokens (8159 of 8192); longer texts are cut into such windows and
  pooled as above. Lexical weights and ColBERT vectors come from the same pass (the inserted `<s>`
  rows dropped). A text under 256 tokens has one `<s>`: plain CLS pooling, `encode` itself. Needs the
  graph's `last_hidden_state` output (artifacts exported with `--flash-attention`).
- "truncate": FlagEmbedding's behaviour, the first `max_length` tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

LONG_DOCUMENT_STRATEGIES = ("windows", "mcls", "truncate")
MCLS_STRIDE = 256
HIDDEN_OUTPUT = "last_hidden_state"


@dataclass(frozen=True)
class Window:
    """Text tokens `[lo, hi)` encoded as sequence `sequence`; `positions[j]` is where text token
    `lo + j` sits in that sequence (1 + j, or further right past inserted `<s>` tokens)."""

    lo: int
    hi: int
    sequence: int
    positions: np.ndarray
    cls_positions: np.ndarray | None = None  # MCLS: the `<s>` positions pooled for the dense vector


def plain_positions(count: int) -> np.ndarray:
    return np.arange(1, count + 1, dtype=np.int64)


def mcls_capacity(max_length: int) -> int:
    """The most text tokens an MCLS sequence of `max_length` holds: n + ceil(n / 256) + 1 <= max_length."""
    n = max_length - 2
    while n > 1 and n + -(-n // MCLS_STRIDE) + 1 > max_length:
        n -= 1
    return max(n, 1)


def mcls_sequence(content: np.ndarray, cls_id: int, eos_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, positions of the content tokens, `<s>` positions): `<s>` before every 256 text tokens, `</s>` last."""
    parts, positions, cls_positions = [], [], []
    cursor = 0
    for start in range(0, max(len(content), 1), MCLS_STRIDE):
        chunk = content[start : start + MCLS_STRIDE]
        cls_positions.append(cursor)
        positions.append(np.arange(cursor + 1, cursor + 1 + len(chunk), dtype=np.int64))
        parts.append(np.concatenate([[cls_id], chunk]))
        cursor += 1 + len(chunk)
    ids = np.concatenate([*parts, [eos_id]]).astype(np.int64)
    return ids, np.concatenate(positions), np.asarray(cls_positions, dtype=np.int64)


def owned_ranges(windows: Sequence[tuple[tuple[int, int], Any]]) -> list[tuple[int, int]]:
    """The text tokens `[lo, hi)` each window owns: consecutive windows split their overlap midway.
    `windows`: ((lo, hi), anything) in text order."""
    cuts = [windows[0][0][0]]
    for (prev, _), (cur, _) in zip(windows, windows[1:]):
        cuts.append((cur[0] + prev[1]) // 2)
    cuts.append(windows[-1][0][1])
    return list(zip(cuts[:-1], cuts[1:]))


def _owned(windows: Sequence[Window]) -> list[tuple[int, int]]:
    return owned_ranges([((w.lo, w.hi), None) for w in windows])


def stitch_windows(windows: Sequence[Window], results: Any, covered: int) -> dict[str, np.ndarray]:
    """Per text token `0..covered`: its sparse weight and ColBERT vector from its owning window."""
    out: dict[str, np.ndarray] = {}
    owned = _owned(windows)
    picks = [(w, w.positions[lo - w.lo : hi - w.lo]) for w, (lo, hi) in zip(windows, owned)]
    if results.token_weights[windows[0].sequence] is not None:
        parts = [results.token_weights[w.sequence][pos] for w, pos in picks]
        out["sparse_weights"] = np.concatenate(parts).astype(np.float32)[:covered]
    if results.colbert[windows[0].sequence] is not None:
        parts = [results.colbert[w.sequence][pos - 1] for w, pos in picks]  # ColBERT row p-1 is position p
        # In the dtype the post-processor gave them (float16 with colbert_fp16), as for one window.
        out["colbert_vecs"] = np.concatenate(parts).reshape(-1, parts[0].shape[-1])[:covered]
    return out


def _normalized(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    return (vector / max(np.linalg.norm(vector), 1e-12)).astype(np.float32)


def pool_windows(windows: Sequence[Window], results: Any, num_tokens: int) -> dict[str, Any]:
    """The document's outputs from its windows' (see the module's description)."""
    out: dict[str, Any] = {}
    first = windows[0].sequence
    mcls = windows[0].cls_positions is not None
    if len(windows) == 1 and not mcls:
        if results.dense[first] is not None:
            out["dense_vecs"] = results.dense[first][None]
        if results.lexical[first] is not None:
            out["lexical_weights"] = [results.lexical[first]]
        if results.colbert[first] is not None:
            out["colbert_vecs"] = [results.colbert[first]]
        return out
    owned = _owned(windows)
    weights = np.array([max(hi - lo, 1) for lo, hi in owned], dtype=np.float64)
    if results.dense[first] is not None:
        if mcls:  # each window's mean of `<s>` hidden states, un-normalised, then pooled
            vectors = np.stack([results.cls_hidden[w.sequence].astype(np.float64).mean(axis=0) for w in windows])
        else:
            vectors = np.stack([results.dense[w.sequence] for w in windows]).astype(np.float64)
        out["dense_vecs"] = _normalized((vectors * weights[:, None]).sum(axis=0) / weights.sum())[None]
    if results.lexical[first] is not None:
        merged: dict[str, np.float32] = {}
        for window in windows:
            for token, weight in results.lexical[window.sequence].items():
                if token not in merged or weight > merged[token]:
                    merged[token] = weight
        out["lexical_weights"] = [merged]
    if results.colbert[first] is not None:
        tokens = stitch_windows(windows, results, num_tokens)["colbert_vecs"]
        eos = results.colbert[windows[-1].sequence][-1:]
        out["colbert_vecs"] = [np.concatenate([tokens, eos])]
    return out
