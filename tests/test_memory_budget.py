"""A memory budget caps the rows of every batch; results do not change."""

from __future__ import annotations

import numpy as np
import pytest

from m3rt import InputError, M3Model
from m3rt.memory import PER_TOKEN_HIDDEN_FLOATS, SCORE_COPIES, MemoryModel, memory_rows, parse_bytes
from m3rt.scheduler import plan_batches

from fake_backend import FakeBackend

EVERYTHING = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1024, 1024), ("6GiB", 6 * 2**30), ("512 MB", 512 * 2**20), ("2.5g", int(2.5 * 2**30)), ("100", 100)],
)
def test_parse_bytes(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value", ["lots", "-1GiB", 0, True, "5 parsecs"])
def test_bad_budgets_are_input_errors(value):
    with pytest.raises(InputError):
        parse_bytes(value)


def test_the_plain_graph_pays_for_its_score_matrices():
    plain, flash = MemoryModel(1024, 16, True), MemoryModel(1024, 16, False)
    linear = 2 * 8192 * PER_TOKEN_HIDDEN_FLOATS * 1024 * 4
    assert flash.batch_bytes(2, 8192) == linear
    assert plain.batch_bytes(2, 8192) == linear + SCORE_COPIES * 2 * 16 * 8192 * 8192 * 4


def test_no_batch_exceeds_the_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 3000, size=500)
    model, budget = MemoryModel(1024, 16, True), 3 * 2**30
    batches = plan_batches(lengths, 256, 10**9, memory_rows(model, budget))
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    for batch in batches:
        assert model.batch_bytes(len(batch), int(lengths[batch].max())) <= budget
    # Without a budget the huge token budget would have put far more rows together.
    assert len(plan_batches(lengths, 256, 10**9)) < len(batches)


def test_a_text_over_the_budget_alone_is_refused():
    rows = memory_rows(MemoryModel(1024, 16, True), 2**30)
    with pytest.raises(InputError, match="memory budget"):
        plan_batches(np.array([8192, 10]), 256, 8192, rows)


def test_encode_under_a_budget_gives_the_same_results(tiny, texts):
    inner = M3Model.load(tiny[1])
    counting = FakeBackend(inner.backend)
    manifest = inner.manifest
    heads = manifest.data["model"]["num_attention_heads"]
    cost = MemoryModel(manifest.hidden_size, heads, True)
    budget = cost.batch_bytes(3, 64)
    budgeted = M3Model(manifest, counting, inner.tokenizer, memory_budget=budget)
    got = budgeted.encode(texts, max_length=64, **EVERYTHING)
    want = inner.encode(texts, max_length=64, **EVERYTHING)
    assert counting.calls and all(cost.batch_bytes(rows, width) <= budget for rows, width in counting.calls)
    assert max(rows for rows, width in counting.calls if width == 64) <= 3  # shorter batches may hold more
    np.testing.assert_allclose(got["dense_vecs"], want["dense_vecs"], atol=1e-6)
    assert len(got["colbert_vecs"]) == len(texts)
