"""What a padded batch costs in activation memory, so that batches can be kept under a budget.

An encoder pass holds, per layer, a few [rows, length, hidden] tensors (hidden states, Q, K, V, the
attention output, the 4 x hidden feed-forward activations) and, in the plain exported graph, the
attention scores [rows, heads, length, length] in float32: two such tensors are alive at once (the
scaled/masked scores and their softmax). The flash-attention graph (`model.flash.onnx`) never holds
them. Weights are not counted: they are loaded once, whatever the batches.

The constants are fitted to ONNX Runtime CPU fp32 peak RSS on the full-size model (benchmarks/
RESULTS.md, "Long documents"); they are estimates, rounded up, for keeping batches apart, not an
allocator's exact account.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from m3rt.errors import InputError

# float32 values alive per token per hidden unit, the largest layer's working set plus the outputs.
PER_TOKEN_HIDDEN_FLOATS = 24
# float32 [rows, heads, length, length] score tensors alive at once in the plain graph.
SCORE_COPIES = 2

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20}
_UNITS.update({"g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40})


def parse_bytes(value: int | float | str) -> int:
    """Bytes from an int or a string such as "6GiB", "512 MB", "2.5g" (binary units throughout)."""
    if isinstance(value, bool):
        raise InputError(f"memory_budget must be bytes or a size like '6GiB', got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise InputError(f"memory_budget must be bytes or a size like '6GiB', got {value!r}")
        number, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(number):
        raise InputError(f"memory_budget must be a finite size, got {value!r}")
    result = int(number * _UNITS[unit])
    if result <= 0:
        raise InputError(f"memory_budget must be positive, got {value!r}")
    return result


@dataclass(frozen=True)
class MemoryModel:
    hidden_size: int
    num_heads: int
    quadratic_attention: bool  # False for the flash-attention graph
    # With both graphs served (`OnnxRuntimeBackend(long_graph_path=...)`): batches padded to this many
    # tokens or more run on the flash graph and hold no score tensors.
    flash_from_tokens: int | None = None

    def holds_scores(self, length: int) -> bool:
        return self.quadratic_attention and (self.flash_from_tokens is None or length < self.flash_from_tokens)

    def batch_bytes(self, rows: int, length: int) -> int:
        """Estimated peak activation bytes of one batch of `rows` texts padded to `length` tokens."""
        linear = rows * length * PER_TOKEN_HIDDEN_FLOATS * self.hidden_size * 4
        scores = SCORE_COPIES * rows * self.num_heads * length * length * 4 if self.holds_scores(length) else 0
        return linear + scores

    def max_rows(self, length: int, budget: int) -> int:
        """The most rows of `length` tokens within `budget` bytes (0 when not even one fits)."""
        one = self.batch_bytes(1, length)
        return int(budget // one)


def memory_rows(model: MemoryModel, budget: int) -> Callable[[int], int]:
    """`plan_batches`' `max_rows`: rows per batch at a padded length, or InputError when one text alone
    exceeds the budget (it cannot be split: a shorter max_length or the flash-attention graph helps)."""

    def rows(length: int) -> int:
        fitting = model.max_rows(length, budget)
        if fitting < 1:
            need = model.batch_bytes(1, length) / 2**30
            hint = "" if not model.holds_scores(length) else ", or keep the export's flash-attention graph"
            raise InputError(
                f"a text of {length} tokens needs about {need:.1f} GiB of activations, over the memory budget of "
                f"{budget / 2**30:.1f} GiB; raise memory_budget, lower max_length{hint}"
            )
        return fitting

    return rows


def budget_rows(
    manifest: Any, placement: Any, budget: int | str | None, flash_from_tokens: int | None = None
) -> Callable[[int], int] | None:
    """`memory_rows` for what `placement` (an `m3rt.placement.Placement`) runs, or None without a budget;
    `flash_from_tokens`: the backend's crossover to the placement's long-document graph. Without a
    placement (a backend built by hand) every batch is costed as the plain graph's."""
    if budget is None:
        return None
    # Where the backend serves a flash-attention graph beside the plain one, a batch's graph follows its
    # padded length (from `flash_from_tokens` on, flash: no layer's scores held whole).
    quadratic = True if placement is None else placement.quadratic_attention
    long_graph = None if placement is None else placement.long_document_graph
    heads = int(manifest.data["model"].get("num_attention_heads", manifest.hidden_size // 64))
    cost = MemoryModel(manifest.hidden_size, heads, quadratic, flash_from_tokens if long_graph else None)
    return memory_rows(cost, parse_bytes(budget))
