"""Why a passage matched a query: each score of `compute_score` taken apart token by token.

- lexical: the token ids both texts have a weight for, with both weights and their product; the
  products sum to `compute_lexical_matching_score` (the sparse score). Each side's span is where that
  id has its (maximal) weight.
- ColBERT: for each query vector (the query's tokens, then `</s>`), the passage vector it matches
  best, with the similarity; their mean is `colbert_score` (the ColBERT score).
- scores: dense, sparse, ColBERT and their combinations, as `compute_score` gives them for the pair.

Texts are truncated as `compute_score` truncates them (query_max_length, passage_max_length).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from m3rt.errors import InputError
from m3rt.scoring import colbert_score, combine_scores, lexical_matching_score

Span = tuple[int, int] | None


@dataclass(frozen=True)
class LexicalMatch:
    token_id: int
    token: str
    query_weight: float
    passage_weight: float
    product: float
    query_span: Span
    passage_span: Span


@dataclass(frozen=True)
class ColbertMatch:
    query_token: str
    query_span: Span  # None for `</s>`
    passage_token: str
    passage_span: Span
    score: float


@dataclass(frozen=True)
class Explanation:
    query: str
    passage: str
    scores: dict[str, float]
    lexical: list[LexicalMatch]  # by product, largest first
    colbert: list[ColbertMatch]  # in query order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _encode_one(model: Any, text: str, max_length: int) -> dict[str, Any]:
    everything = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
    levels = dict(granularity=("token", "document"), granularity_options={"long_document": "truncate"})
    return model.encode([text], max_length=max_length, **levels, **everything)[0]


def _best_spans(token: dict[str, Any]) -> dict[int, tuple[int, int]]:
    """Per token id, the span of its occurrence with the largest sparse weight."""
    best: dict[int, tuple[float, tuple[int, int]]] = {}
    for token_id, weight, span in zip(token["token_ids"].tolist(), token["sparse_weights"].tolist(), token["offsets"]):
        if token_id not in best or weight > best[token_id][0]:
            best[token_id] = (weight, (int(span[0]), int(span[1])))
    return {k: v[1] for k, v in best.items()}


def _row_token(model: Any, token: dict[str, Any], row: int) -> tuple[str, Span]:
    """ColBERT row `row` is the text's token `row`, or `</s>` after the last one."""
    if row < len(token["token_ids"]):
        start, end = token["offsets"][row]
        return model.tokenizer.decode_id(int(token["token_ids"][row])), (int(start), int(end))
    return "</s>", None


def explain(
    model: Any,
    query: str,
    passage: str,
    *,
    max_query_length: int | None = None,
    max_passage_length: int | None = None,
    weights_for_different_modes: list[float] | None = None,
) -> Explanation:
    if not isinstance(query, str) or not isinstance(passage, str):
        raise InputError("explain needs a query string and a passage string")
    # encode checks the lengths.
    q_len = model.query_max_length if max_query_length is None else max_query_length
    p_len = model.passage_max_length if max_passage_length is None else max_passage_length
    q, p = _encode_one(model, query, q_len), _encode_one(model, passage, p_len)
    q_doc, p_doc = q["document"], p["document"]
    q_lex, p_lex = q_doc["lexical_weights"][0], p_doc["lexical_weights"][0]
    q_spans, p_spans = _best_spans(q["token"]), _best_spans(p["token"])
    lexical = [
        LexicalMatch(
            token_id=int(key),
            token=model.tokenizer.decode_id(int(key)),
            query_weight=float(q_lex[key]),
            passage_weight=float(p_lex[key]),
            product=float(q_lex[key] * p_lex[key]),
            query_span=q_spans.get(int(key)),
            passage_span=p_spans.get(int(key)),
        )
        for key in q_lex
        if key in p_lex
    ]
    lexical.sort(key=lambda m: -m.product)

    q_vecs, p_vecs = q_doc["colbert_vecs"][0], p_doc["colbert_vecs"][0]
    similarity = q_vecs @ p_vecs.T
    best = similarity.argmax(axis=1) if p_vecs.shape[0] else np.zeros(len(q_vecs), dtype=np.int64)
    colbert = []
    for row, col in enumerate(best.tolist()):
        q_token, q_span = _row_token(model, q["token"], row)
        p_token, p_span = _row_token(model, p["token"], col)
        colbert.append(ColbertMatch(q_token, q_span, p_token, p_span, float(similarity[row, col])))

    # The same reduction as compute_score, so that the scores are bit for bit its own.
    dense = np.einsum("ij,ij->i", q_doc["dense_vecs"], p_doc["dense_vecs"]).astype(np.float32)[0]
    sparse = np.float32(lexical_matching_score(q_lex, p_lex))
    late = colbert_score(q_vecs, p_vecs)
    combined = combine_scores(
        np.array([dense]), np.array([sparse]), np.array([late]), weights_for_different_modes
    )  # fmt: skip
    scores = {name: float(np.asarray(value, dtype=np.float32)[0]) for name, value in combined.items()}
    return Explanation(query, passage, scores, lexical, colbert)
