"""`explain`: its parts add up to the scores `compute_score` and the scoring functions give."""

from __future__ import annotations

import json

import numpy as np
import pytest

from m3rt import InputError, M3Model
from m3rt.cli import main
from m3rt.export.samples import sample_texts

EVERYTHING = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)


@pytest.fixture(scope="module")
def model(exported):
    return M3Model.load(exported[1])


@pytest.fixture(scope="module")
def pair(model):
    """A (query, passage) pair of sample texts that share lexical tokens under this tokenizer and model."""
    texts = sample_texts()
    lexical = model.encode(texts, return_sparse=True, return_dense=False)["lexical_weights"]
    for passage, weights in zip(texts, lexical):
        words = passage.split()
        query = " ".join(words[: max(2, len(words) // 2)])
        shared = set(model.encode(query, return_sparse=True)["lexical_weights"]) & set(weights)
        if len(shared) >= 2:
            return query, passage
    pytest.fail("no sample pair shares two lexical tokens")


def test_scores_are_compute_scores(model, pair):
    assert model.explain(*pair).scores == model.compute_score(pair)
    weights = [0.4, 0.2, 0.4]
    got = model.explain(*pair, weights_for_different_modes=weights).scores
    assert got == model.compute_score(pair, weights_for_different_modes=weights)


def test_lexical_products_sum_to_the_lexical_matching_score(model, pair):
    query, passage = pair
    explanation = model.explain(query, passage)
    q = model.encode(query, max_length=model.query_max_length, **EVERYTHING)["lexical_weights"]
    p = model.encode(passage, **EVERYTHING)["lexical_weights"]
    assert {m.token_id for m in explanation.lexical} == {int(k) for k in set(q) & set(p)}
    for match in explanation.lexical:
        assert match.query_weight == float(q[str(match.token_id)])
        assert match.passage_weight == float(p[str(match.token_id)])
        assert match.product == pytest.approx(match.query_weight * match.passage_weight, rel=1e-6)
        # Each span is an occurrence of that token.
        token = match.token.strip()
        assert query[slice(*match.query_span)].strip() == token
        assert passage[slice(*match.passage_span)].strip() == token
    total = sum(m.product for m in explanation.lexical)
    assert total > 0
    assert total == pytest.approx(float(model.compute_lexical_matching_score(q, p)), rel=1e-6)
    assert total == pytest.approx(explanation.scores["sparse"], rel=1e-6)


def test_colbert_maxima_average_to_the_colbert_score(model, pair):
    query, passage = pair
    explanation = model.explain(query, passage)
    q = model.encode(query, max_length=model.query_max_length, **EVERYTHING)["colbert_vecs"]
    p = model.encode(passage, **EVERYTHING)["colbert_vecs"]
    assert len(explanation.colbert) == len(q)
    similarity = q @ p.T
    for row, match in enumerate(explanation.colbert):
        assert match.score == pytest.approx(float(similarity[row].max()), abs=1e-6)
        if match.query_span is None:
            assert row == len(q) - 1 and match.query_token == "</s>"
        else:
            assert query[slice(*match.query_span)].strip() == match.query_token.strip()
        if match.passage_span is not None:
            assert passage[slice(*match.passage_span)].strip() == match.passage_token.strip()
    mean = np.mean([m.score for m in explanation.colbert])
    assert mean == pytest.approx(float(model.colbert_score(q, p)), abs=1e-6)
    assert mean == pytest.approx(explanation.scores["colbert"], abs=1e-6)


def test_long_texts_are_truncated_as_compute_score_truncates(model, pair):
    query, passage = pair
    long_query, long_passage = " ".join([query] * 10), " ".join([passage] * 20)
    got = model.explain(long_query, long_passage, max_query_length=8, max_passage_length=40)
    want = model.compute_score((long_query, long_passage), max_query_length=8, max_passage_length=40)
    assert got.scores == want
    assert len(got.colbert) == 7  # 8 tokens, minus <s>


def test_bad_input(model):
    with pytest.raises(InputError):
        model.explain(["a"], "b")
    with pytest.raises(InputError):
        model.explain("a", "b", max_passage_length=0)


def test_cli_explain_and_granular_encode(exported, pair, capsys):
    artifact = str(exported[1])
    assert main(["explain", artifact, *pair, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"query", "passage", "scores", "lexical", "colbert"} and data["lexical"]
    assert main(["explain", artifact, *pair]) == 0
    out = capsys.readouterr().out
    assert "lexical matches" in out and "ColBERT" in out and f"{data['scores']['colbert']:.4f}" in out
    text = "First sentence here. Second one!"
    assert main(["encode", artifact, text, "--granularity", "sentence", "document"]) == 0
    out = capsys.readouterr().out
    assert "'First sentence here.'" in out and "'Second one!'" in out and "document  1 pieces" in out
    assert main(["encode", artifact, text, "--granularity", "token", "passage", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["text"] == text and set(entry) == {"text", "token", "passage"}
    assert [text[a:b] for a, b in entry["passage"]["offsets"]] == [text]
