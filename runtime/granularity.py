"""Multi-granularity encoding: tokens, sentences, passages and whole documents in one scheduled pass.

Every text is tokenised once with character offsets. Each requested level cuts it into pieces, each
piece one model input (`<s> ... </s>`):

- token: no pieces of its own; every token's ColBERT vector and sparse weight are read from the
  document's encoding (so they carry the whole document's context), with the token's character span.
- sentence: each sentence of `m3rt.sentences.split_sentences`, tokenised as a text of its own (a
  sentence piece is exactly `encode(sentence)`). One longer than `max_length` tokens is cut into
  `max_length` windows.
- passage: windows of `passage_tokens` tokens (specials included) that overlap by `passage_overlap`
  tokens, cut on the text's token boundaries; a window's end moves back to a sentence end when one
  lies within `passage_snap` tokens of it. A text of at most `passage_tokens` tokens is one window
  equal to `encode(text)`.
- document: the whole text, `encode(text)` itself when it fits `max_length`. A longer text is not
  truncated silently; `long_document` says what happens (see `m3rt.long_document`).

All pieces of all levels of all texts are de-duplicated by their token ids (a document that fits one
passage window is that window; a repeated sentence is encoded once) and run through the scheduler's
token-budget batches in one pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from m3rt.errors import InputError
from m3rt.heads import HEADS, OUTPUT_COLBERT, OUTPUT_DENSE, OUTPUT_SPARSE
from m3rt.long_document import (
    HIDDEN_OUTPUT,
    LONG_DOCUMENT_STRATEGIES,
    Window,
    mcls_capacity,
    mcls_sequence,
    plain_positions,
    pool_windows,
    stitch_windows,
)
from m3rt.postprocess import OutputCollector
from m3rt.sentences import split_sentences

LEVELS = ("token", "sentence", "passage", "document")


@dataclass(frozen=True)
class GranularityOptions:
    """How texts are cut. `max_length` bounds every piece (specials included). None means the default:
    passage_tokens min(512, max_length), passage_overlap an eighth of it, passage_snap an eighth of
    it, document_overlap min(256, max_length // 8); language guessed per text."""

    max_length: int
    passage_tokens: int | None = None
    passage_overlap: int | None = None
    passage_snap: int | None = None
    long_document: str = "windows"
    document_overlap: int | None = None
    language: str | None = None

    def resolved(self, levels: Sequence[str] = LEVELS) -> GranularityOptions:
        """A copy with every default filled in, checked (the passage fields only when `levels` has
        passages: a document or its tokens alone may have a max_length too short for any passage)."""
        if self.language is not None and not isinstance(self.language, str):
            raise InputError(f"language must be an ISO 639-1 code such as 'de', got {self.language!r}")
        if self.long_document not in LONG_DOCUMENT_STRATEGIES:
            raise InputError(
                f"long_document must be one of {', '.join(LONG_DOCUMENT_STRATEGIES)}, got {self.long_document!r}"
            )
        for name in ("passage_tokens", "passage_overlap", "passage_snap", "document_overlap"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
                raise InputError(f"{name} must be an int >= 0, got {value!r}")
        passage = min(512, self.max_length) if self.passage_tokens is None else int(self.passage_tokens)
        overlap = passage // 8 if self.passage_overlap is None else int(self.passage_overlap)
        snap = passage // 8 if self.passage_snap is None else int(self.passage_snap)
        if "passage" in levels:
            if not 3 <= passage <= self.max_length:
                raise InputError(f"passage_tokens must be in 3..{self.max_length} (max_length), got {passage}")
            if overlap >= passage - 2:
                raise InputError(f"passage_overlap ({overlap}) must be < passage_tokens - 2")
        doc_overlap = min(256, self.max_length // 8) if self.document_overlap is None else int(self.document_overlap)
        # Windows advance by content - overlap tokens: more than half the window would multiply them.
        content = mcls_capacity(self.max_length) if self.long_document == "mcls" else self.max_length - 2
        if doc_overlap > content // 2:
            raise InputError(
                f"document_overlap ({doc_overlap}) must be at most half a {self.long_document!r} window: "
                f"{content // 2} tokens"
            )
        return replace(
            self, passage_tokens=passage, passage_overlap=overlap, passage_snap=snap, document_overlap=doc_overlap
        )


def parse_levels(granularity: str | Sequence[str]) -> tuple[str, ...]:
    if not isinstance(granularity, (str, list, tuple)) or not all(isinstance(g, str) for g in granularity):
        raise InputError(f"granularity must be a level or a list of levels ({', '.join(LEVELS)}), got {granularity!r}")
    levels = (granularity,) if isinstance(granularity, str) else tuple(granularity)
    if not levels:
        raise InputError(f"granularity is empty; choose from {', '.join(LEVELS)}")
    for level in levels:
        if level not in LEVELS:
            raise InputError(f"unknown granularity {level!r}; choose from {', '.join(LEVELS)}")
    return tuple(dict.fromkeys(levels))


def token_windows(
    n: int, content: int, overlap: int, boundaries: np.ndarray | None = None, snap: int = 0
) -> list[tuple[int, int]]:
    """Token ranges `[start, end)` covering `0..n`: at most `content` tokens each, consecutive ones
    sharing `overlap` tokens; an end moves back to the last of `boundaries` within `snap` of it."""
    if n <= content:
        return [(0, n)]
    windows = []
    start = 0
    while True:
        end = start + content
        if end >= n:
            windows.append((start, n))
            return windows
        if boundaries is not None and snap > 0:
            near = boundaries[(boundaries > max(end - snap, start + overlap)) & (boundaries < end)]
            if near.size:
                end = int(near.max())
        windows.append((start, end))
        start = max(end - overlap, start + 1)


@dataclass
class _Piece:
    """One model input, with where it comes from: token range of the text or a character span."""

    sequence: int  # index of its (de-duplicated) token sequence
    start: int  # character span in the text
    end: int
    tokens: tuple[int, int] | None = None  # token range of the text's tokenisation, when cut from it
    positions: np.ndarray | None = None  # where each of those tokens sits in the sequence (MCLS)
    cls_positions: np.ndarray | None = None  # MCLS: the `<s>` positions whose hidden states are pooled

    def window(self) -> Window:
        lo, hi = self.tokens
        positions = plain_positions(hi - lo) if self.positions is None else self.positions
        return Window(lo, hi, self.sequence, positions, self.cls_positions)


@dataclass
class _TextPlan:
    ids: np.ndarray
    offsets: np.ndarray
    levels: dict[str, list[_Piece]] = field(default_factory=dict)
    document: list[_Piece] = field(default_factory=list)  # the windows the document level pools


class _Sequences:
    """Unique model inputs: identical token ids are one sequence."""

    def __init__(self) -> None:
        self.ids: list[np.ndarray] = []
        self._index: dict[bytes, int] = {}

    def add(self, ids: np.ndarray) -> int:
        key = ids.tobytes()
        found = self._index.get(key)
        if found is None:
            found = self._index[key] = len(self.ids)
            self.ids.append(ids)
        return found


def _with_specials(content: np.ndarray, cls_id: int, eos_id: int) -> np.ndarray:
    return np.concatenate([[cls_id], content, [eos_id]]).astype(np.int64)


def _span(offsets: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    if hi <= lo:
        return 0, 0
    return int(offsets[lo, 0]), int(offsets[hi - 1, 1])


def _window_pieces(
    sequences: _Sequences,
    ids: np.ndarray,
    offsets: np.ndarray,
    content: int,
    overlap: int,
    ends: np.ndarray | None,
    snap: int,
    cls_id: int,
    eos_id: int,
) -> list[_Piece]:
    pieces = []
    for lo, hi in token_windows(len(ids), content, overlap, ends, snap):
        seq = sequences.add(_with_specials(ids[lo:hi], cls_id, eos_id))
        pieces.append(_Piece(seq, *_span(offsets, lo, hi), tokens=(lo, hi)))
    return pieces


def plan_texts(
    texts: Sequence[str],
    levels: Sequence[str],
    tokenizer: Any,
    options: GranularityOptions,
    cls_id: int,
    eos_id: int,
) -> tuple[list[_TextPlan], list[np.ndarray]]:
    """Pieces of every requested level of every text, and the unique token sequences they need."""
    options = options.resolved(levels)
    sequences = _Sequences()
    plans = []
    tokenized = tokenizer.encode_with_offsets(texts)
    need_sentences = "sentence" in levels or "passage" in levels
    doc_content = options.max_length - 2
    for text, (ids, offsets) in zip(texts, tokenized):
        plan = _TextPlan(ids, offsets)
        n = len(ids)
        # Document windows snap to sentence ends too: a long document's windows must not depend on
        # which other levels were asked for.
        long = ("document" in levels or "token" in levels) and n > mcls_capacity(options.max_length)
        sentences = split_sentences(text, options.language) if need_sentences or long else []
        # Token index at which each sentence ends: the first token starting at or after its end.
        ends = np.searchsorted(offsets[:, 0], [end for _, end in sentences]) if len(sentences) else None

        def window_pieces(content: int, overlap: int, snap: int, ids=ids, offsets=offsets, ends=ends):
            return _window_pieces(sequences, ids, offsets, content, overlap, ends, snap, cls_id, eos_id)

        if "document" in levels or "token" in levels:
            snap = options.max_length // 16
            if options.long_document == "mcls":
                plan.document = []
                for lo, hi in token_windows(n, mcls_capacity(options.max_length), options.document_overlap, ends, snap):
                    seq_ids, positions, cls_positions = mcls_sequence(ids[lo:hi], cls_id, eos_id)
                    plan.document.append(
                        _Piece(sequences.add(seq_ids), *_span(offsets, lo, hi), (lo, hi), positions, cls_positions)
                    )
            elif n <= doc_content or options.long_document == "windows":
                plan.document = window_pieces(doc_content, options.document_overlap, snap)
            else:  # "truncate": FlagEmbedding's behaviour
                plan.document = [
                    _Piece(
                        sequences.add(_with_specials(ids[:doc_content], cls_id, eos_id)),
                        *_span(offsets, 0, min(n, doc_content)),
                        tokens=(0, min(n, doc_content)),
                    )
                ]
        if "passage" in levels:
            plan.levels["passage"] = window_pieces(
                options.passage_tokens - 2, options.passage_overlap, options.passage_snap
            )
        if "sentence" in levels:
            pieces = []
            encoded = tokenizer.encode_with_offsets([text[lo:hi] for lo, hi in sentences]) if sentences else []
            for (lo, hi), (s_ids, s_offsets) in zip(sentences, encoded):
                for a, b in token_windows(len(s_ids), doc_content, 0):
                    seq = sequences.add(_with_specials(s_ids[a:b], cls_id, eos_id))
                    start, end = _span(s_offsets, a, b) if (a, b) != (0, len(s_ids)) else (0, hi - lo)
                    pieces.append(_Piece(seq, lo + start, lo + end))
            plan.levels["sentence"] = pieces
        plans.append(plan)
    return plans, sequences.ids


class SequenceResults:
    """Per-sequence results as the levels read them, indexed by sequence (None where not computed):
    the collector's, with each sequence's lexical weights as a dict."""

    def __init__(self, count: int, outputs: Sequence[str], collector: OutputCollector) -> None:
        self.outputs = tuple(outputs)
        results = collector.results()
        missing: list[Any] = [None] * count
        dense = results.get(OUTPUT_DENSE)
        sparse = results.get(OUTPUT_SPARSE)
        colbert = results.get(OUTPUT_COLBERT)
        self.dense: list[np.ndarray | None] = list(dense) if dense is not None else missing
        self.lexical: list[dict | None] = sparse.to_dicts() if sparse is not None else missing
        self.colbert: list[np.ndarray | None] = list(colbert) if colbert is not None else missing
        # Sparse weight per position (the token level) and, for MCLS, the pooled `<s>` rows' hidden states.
        self.token_weights: list[np.ndarray | None] = collector.token_weights or missing
        self.cls_hidden: list[np.ndarray | None] = [collector.hidden.get(i) for i in range(count)]
        # Graph output -> per-sequence results, as `encode` returns them.
        self.per_sequence = {OUTPUT_DENSE: self.dense, OUTPUT_SPARSE: self.lexical, OUTPUT_COLBERT: self.colbert}


def _piece_results(pieces: list[_Piece], results: SequenceResults, hidden: int) -> dict[str, Any]:
    out: dict[str, Any] = {"offsets": np.array([(p.start, p.end) for p in pieces], dtype=np.int64).reshape(-1, 2)}
    if pieces and pieces[0].tokens is not None:
        out["token_ranges"] = np.array([p.tokens for p in pieces], dtype=np.int64).reshape(-1, 2)
    for spec in HEADS:
        if spec.output in results.outputs:
            values = [results.per_sequence[spec.output][p.sequence] for p in pieces]
            if spec.output == OUTPUT_DENSE:  # one [pieces, hidden] array, as `encode` returns it
                values = np.array(values, dtype=np.float32).reshape(-1, hidden)
            out[spec.api] = values
    return out


def assemble(
    texts: Sequence[str], text_plans: list[_TextPlan], levels: Sequence[str], results: SequenceResults, hidden: int
) -> list[dict[str, Any]]:
    """Per text: {level: columnar results} (see `M3Model.encode`'s `granularity`)."""
    assembled = []
    for text, plan in zip(texts, text_plans):
        entry: dict[str, Any] = {}
        for level in levels:
            if level in plan.levels:
                entry[level] = _piece_results(plan.levels[level], results, hidden)
        if plan.document and ("document" in levels or "token" in levels):
            windows = [p.window() for p in plan.document]
            if "document" in levels:
                doc = pool_windows(windows, results, len(plan.ids))
                covered = plan.document[-1].tokens[1]
                end = len(text) if covered == len(plan.ids) else int(plan.offsets[covered - 1, 1])
                doc["offsets"] = np.array([[0, end]], dtype=np.int64)
                doc["window_offsets"] = np.array([_span(plan.offsets, w.lo, w.hi) for w in windows], dtype=np.int64)
                doc["window_token_ranges"] = np.array([(w.lo, w.hi) for w in windows], dtype=np.int64)
                entry["document"] = doc
            if "token" in levels:
                covered = plan.document[-1].tokens[1]
                token = {"token_ids": plan.ids[:covered].copy(), "offsets": plan.offsets[:covered].copy()}
                token.update(stitch_windows(windows, results, covered))
                entry["token"] = token
        assembled.append({level: entry[level] for level in levels})
    return assembled


def _check_hidden_output(model: Any) -> None:
    """MCLS reads the encoder's last hidden states: only graphs that output them can serve it."""
    placement = model.placement
    if placement is None:
        return  # a backend built by hand: the backend itself refuses an output its graph lacks
    # A backend serving a flash-attention graph beside the plain one runs hidden-state requests on it.
    if placement.plan is None and any(HIDDEN_OUTPUT in g.details.get("outputs", {}) for g in placement.graphs):
        return
    raise InputError(
        "long_document='mcls' needs the encoder's last hidden states, which the served graph does not output; "
        "export with m3-export's flash-attention graph (the default; ONNX Runtime CPU), or use long_document='windows'"
    )


def encode_granular(
    model: Any,
    texts: list[str],
    levels: Sequence[str],
    options: GranularityOptions,
    outputs: Sequence[str],
    batch_size: int,
    show_progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Plan every text's pieces, run the unique sequences in one pipeline, assemble per text."""
    specials = model.manifest.special_tokens
    plans, sequences = plan_texts(texts, levels, model.tokenizer, options, specials["cls"], specials["eos"])
    cls_positions = {}
    if OUTPUT_DENSE in outputs and "document" in levels:
        cls_positions = {
            p.sequence: p.cls_positions for plan in plans for p in plan.document if p.cls_positions is not None
        }
    run_outputs = list(outputs)
    if cls_positions:
        _check_hidden_output(model)
        run_outputs.append(HIDDEN_OUTPUT)
    collector = OutputCollector(
        len(sequences),
        model.manifest.hidden_size,
        outputs,
        model.postprocessor,
        token_weights=True,
        hidden_rows=cls_positions,
        hidden_output=HIDDEN_OUTPUT,
    )
    if outputs and sequences:
        model.run_ids(sequences, run_outputs, batch_size=batch_size, show_progress=show_progress, collector=collector)
    results = SequenceResults(len(sequences), outputs, collector)
    return assemble(texts, plans, levels, results, model.manifest.hidden_size)
