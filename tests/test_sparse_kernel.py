import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from m3rt.kernels.sparse import SparseRows, aggregate_sparse

from reference_rules import lexical_weights


@st.composite
def batches(draw):
    rows = draw(st.integers(1, 6))
    seq = draw(st.integers(1, 40))
    # A small id range forces many repeats; ids 0-3 are the specials.
    ids = draw(arrays(np.int64, (rows, seq), elements=st.integers(0, 12)))
    weights = draw(
        arrays(
            np.float32, (rows, seq), elements=st.sampled_from([0.0, -0.5, 0.1, 0.25, 0.5, 0.5, 1.0, 2.5, 1e-8, -0.0])
        )
    )
    lengths = draw(st.lists(st.integers(0, seq), min_size=rows, max_size=rows))
    mask = (np.arange(seq)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 1)  # right padding with <pad>
    return weights, ids, mask


@settings(max_examples=300, deadline=None)
@given(batches())
def test_matches_plain_rule(batch):
    weights, ids, mask = batch
    rows = aggregate_sparse(weights, ids, mask, {0, 1, 2, 3})
    dicts = rows.to_dicts()
    assert len(dicts) == len(ids)
    for r in range(len(ids)):
        expected = lexical_weights(weights[r].tolist(), ids[r].tolist())
        assert dicts[r] == expected
        # Same key order as FlagEmbedding's dict: first kept occurrence.
        assert list(dicts[r]) == list(expected)
        assert all(isinstance(v, np.float32) for v in dicts[r].values())


@settings(max_examples=100, deadline=None)
@given(batches(), st.randoms())
def test_take_and_concat_restore_any_order(batch, rnd):
    weights, ids, mask = batch
    whole = aggregate_sparse(weights, ids, mask, {0, 1, 2, 3})
    split = len(ids) // 2
    parts = SparseRows.concat(
        [
            aggregate_sparse(weights[:split], ids[:split], mask[:split], {0, 1, 2, 3}),
            aggregate_sparse(weights[split:], ids[split:], mask[split:], {0, 1, 2, 3}),
        ]
    )
    assert parts.to_dicts() == whole.to_dicts()
    order = list(range(len(ids)))
    rnd.shuffle(order)
    taken = whole.take(np.array(order))
    assert taken.to_dicts() == [whole.to_dicts()[i] for i in order]


def test_mask_drops_positions_even_with_non_special_ids():
    weights = np.array([[0.5, 0.7, 0.9]], np.float32)
    ids = np.array([[5, 6, 7]])
    assert aggregate_sparse(weights, ids, np.array([[1, 1, 0]]), {0}).to_dicts() == [{"5": 0.5, "6": 0.7}]


def test_all_special_and_empty_rows():
    weights = np.ones((3, 4), np.float32)
    ids = np.array([[0, 2, 1, 1], [0, 3, 2, 1], [0, 9, 9, 2]])
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    rows = aggregate_sparse(weights, ids, mask, {0, 1, 2, 3})
    assert rows.to_dicts() == [{}, {}, {"9": 1.0}]
    assert rows.indptr.tolist() == [0, 0, 0, 1]


def test_to_scipy():
    pytest.importorskip("scipy")
    weights = np.array([[0.3, 0.1, 0.9, 0.2]], np.float32)
    ids = np.array([[0, 8, 5, 8]])
    matrix = aggregate_sparse(weights, ids, None, {0}).to_scipy(vocab_size=10)
    assert matrix.shape == (1, 10)
    assert matrix[0, 8] == pytest.approx(0.2) and matrix[0, 5] == pytest.approx(0.9) and matrix.nnz == 2
    with pytest.raises(ValueError, match="vocab_size"):
        aggregate_sparse(weights, ids, None, {0}).to_scipy(vocab_size=6)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="batch, seq"):
        aggregate_sparse(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.int64), None, {0})
