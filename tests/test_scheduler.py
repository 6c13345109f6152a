import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from m3rt.scheduler import pad_batch, plan_batches


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(2, 9000), min_size=0, max_size=60), st.integers(1, 64), st.integers(1, 20000))
def test_every_text_once_within_limits(lengths, batch_size, budget):
    lengths = np.array(lengths, dtype=np.int64)
    batches = plan_batches(lengths, batch_size, budget)
    seen = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    flat = lengths[seen]
    assert all(flat[i] >= flat[i + 1] for i in range(len(flat) - 1)), "longest first"
    for b in batches:
        assert 1 <= len(b) <= batch_size
        assert len(b) == 1 or len(b) * lengths[b].max() <= budget


def test_pad_batch_right_pads_to_longest_member():
    ids = [np.array([0, 5, 2]), np.array([0, 7, 8, 9, 2]), np.array([0, 2])]
    batch = pad_batch(ids, np.array([1, 0, 2]), pad_id=1)
    assert batch.input_ids.tolist() == [[0, 7, 8, 9, 2], [0, 5, 2, 1, 1], [0, 2, 1, 1, 1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
