"""Terminal and JSON views of `m3rt explain` and `m3rt encode --granularity`."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from m3rt.explain import Explanation

# Per-token shading: ColBERT similarity / lexical product above these thresholds of the maximum.
_STRONG, _WEAK = 0.75, 0.4


def explanation_json(explanation: Explanation) -> str:
    return json.dumps(explanation.to_dict(), ensure_ascii=False, indent=2)


def _highlight(text: str, spans: dict[tuple[int, int], float]) -> Any:
    """`text` as a rich Text with each span styled by its relative strength (0..1)."""
    from rich.text import Text

    out = Text(text)
    for (start, end), strength in spans.items():
        if strength >= _STRONG:
            out.stylize("bold black on green", start, end)
        elif strength >= _WEAK:
            out.stylize("black on yellow", start, end)
        else:
            out.stylize("underline", start, end)
    return out


def print_explanation(explanation: Explanation, top: int = 10, console: Any = None) -> None:
    """Scores, both texts highlighted (passage: where each query token matched best; green strong,
    yellow medium, underlined weak), the shared lexical tokens and the ColBERT matches."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    scores = "  ".join(f"{name} {value:.4f}" for name, value in explanation.scores.items())
    console.print(f"[bold]scores[/bold]  {scores}")

    best = max((m.score for m in explanation.colbert), default=1.0) or 1.0
    query_spans: dict[tuple[int, int], float] = {}
    passage_spans: dict[tuple[int, int], float] = {}
    for match in explanation.colbert:
        strength = max(match.score, 0.0) / best
        if match.query_span is not None:
            query_spans[tuple(match.query_span)] = strength
        if match.passage_span is not None:
            span = tuple(match.passage_span)
            passage_spans[span] = max(passage_spans.get(span, 0.0), strength)
    console.print("[bold]query[/bold]   ", _highlight(explanation.query, query_spans))
    console.print("[bold]passage[/bold] ", _highlight(explanation.passage, passage_spans))

    lexical = Table(title=f"lexical matches (sum of products = sparse score {explanation.scores['sparse']:.4f})")
    for column in ("token", "query weight", "passage weight", "product"):
        lexical.add_column(column, justify="left" if column == "token" else "right")
    for match in explanation.lexical[:top]:
        lexical.add_row(
            repr(match.token), f"{match.query_weight:.4f}", f"{match.passage_weight:.4f}", f"{match.product:.4f}"
        )
    if len(explanation.lexical) > top:
        lexical.add_row(f"... {len(explanation.lexical) - top} more", "", "", "")
    console.print(lexical)

    colbert = Table(title=f"ColBERT: best passage token per query token (mean = {explanation.scores['colbert']:.4f})")
    for column in ("query token", "passage token", "passage span", "similarity"):
        colbert.add_column(column, justify="right" if column == "similarity" else "left")
    for match in explanation.colbert:
        span = "" if match.passage_span is None else f"{match.passage_span[0]}-{match.passage_span[1]}"
        colbert.add_row(repr(match.query_token), repr(match.passage_token), span, f"{match.score:.4f}")
    console.print(colbert)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def granular_json(texts: list[str], results: list[dict[str, Any]]) -> str:
    return json.dumps([{"text": t, **_jsonable(r)} for t, r in zip(texts, results)], ensure_ascii=False)


def print_granular(texts: list[str], results: list[dict[str, Any]], width: int = 60) -> None:
    """Per text and level: how many pieces, and each piece's character span and text (shortened)."""
    for text, levels in zip(texts, results):
        print(f"text: {text[:70]!r}")
        for level, values in levels.items():
            offsets = values["offsets"]
            shapes = ", ".join(
                f"{name} {tuple(v.shape) if hasattr(v, 'shape') else len(v)}"
                for name, v in values.items()
                if name != "offsets"
            )
            print(f"  {level:9s} {len(offsets)} pieces; {shapes}")
            if level == "token":
                continue
            for start, end in offsets.tolist():
                print(f"    [{start:>6d}, {end:>6d}) {text[start:end][:width]!r}")
