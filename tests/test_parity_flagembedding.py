"""m3rt against FlagEmbedding's BGEM3FlagModel itself, on the same checkpoint."""

import numpy as np
import pytest

from m3rt import BGEM3FlagModel as M3Drop
from m3rt import M3Model

from parity import SCORE_TOL, assert_dense, assert_outputs

flag_embedding = pytest.importorskip("FlagEmbedding")


@pytest.fixture(scope="module")
def pair(exported):
    ckpt, artifact = exported
    reference = flag_embedding.BGEM3FlagModel(str(ckpt), use_fp16=False, devices="cpu")
    return reference, M3Model.load(artifact)


ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)


@pytest.mark.parametrize("batch_size,max_length", [(256, 512), (4, 8192), (7, 32)])
def test_encode(pair, texts, batch_size, max_length):
    reference, ours = pair
    want = reference.encode(texts, batch_size=batch_size, max_length=max_length, **ALL)
    got = ours.encode(texts, batch_size=batch_size, max_length=max_length, **ALL)
    assert_outputs(got, want)


def test_single_string_is_unbatched(pair):
    reference, ours = pair
    want = reference.encode("Wie hoch ist die Zugspitze?", **ALL)
    got = ours.encode("Wie hoch ist die Zugspitze?", **ALL)
    assert got["dense_vecs"].shape == want["dense_vecs"].shape
    assert isinstance(got["lexical_weights"], dict)
    assert got["colbert_vecs"].shape == want["colbert_vecs"].shape

    def batched(out):
        return {
            "dense_vecs": out["dense_vecs"][None],
            "lexical_weights": [out["lexical_weights"]],
            "colbert_vecs": [out["colbert_vecs"]],
        }

    assert_outputs(batched(got), batched(want))


def test_defaults_return_dense_only(pair, texts):
    reference, ours = pair
    want = reference.encode(texts[:5])
    got = ours.encode(texts[:5])
    assert got["lexical_weights"] is None and got["colbert_vecs"] is None
    assert_dense(got["dense_vecs"], want["dense_vecs"])


def test_encode_queries_and_corpus(pair, texts):
    reference, ours = pair
    assert_outputs(
        ours.encode_queries(texts[:6], max_length=512, **ALL),
        reference.encode_queries(texts[:6], max_length=512, **ALL),
    )
    assert_outputs(
        ours.encode_corpus(texts[6:12], max_length=512, **ALL),
        reference.encode_corpus(texts[6:12], max_length=512, **ALL),
    )


@pytest.mark.parametrize("weights", [None, [0.4, 0.2, 0.4]])
@pytest.mark.parametrize("batch_size", [256, 3])
def test_compute_score(pair, texts, weights, batch_size):
    reference, ours = pair
    pairs = [(texts[i], texts[i + 1]) for i in range(0, 30, 2)] + [(texts[2], texts[3]), ("", texts[5])]
    kw = dict(batch_size=batch_size, max_query_length=64, max_passage_length=512, weights_for_different_modes=weights)
    want = reference.compute_score(pairs, **kw)
    got = ours.compute_score(pairs, **kw)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=SCORE_TOL, atol=SCORE_TOL, err_msg=key)
    one_want = reference.compute_score((texts[0], texts[1]), **kw)
    one_got = ours.compute_score((texts[0], texts[1]), **kw)
    assert all(isinstance(v, float) for v in one_got.values())
    for key in one_want:
        assert one_got[key] == pytest.approx(one_want[key], rel=SCORE_TOL, abs=SCORE_TOL)


def test_lexical_and_colbert_scores(pair, texts):
    reference, ours = pair
    out = ours.encode(texts[:8], return_sparse=True, return_colbert_vecs=True)
    lw, cv = out["lexical_weights"], out["colbert_vecs"]
    np.testing.assert_allclose(
        ours.compute_lexical_matching_score(lw[:4], lw[4:]),
        reference.compute_lexical_matching_score(lw[:4], lw[4:]),
        rtol=1e-6,
        atol=1e-7,
    )
    assert ours.compute_lexical_matching_score(lw[0], lw[1]) == pytest.approx(
        reference.compute_lexical_matching_score(lw[0], lw[1]), rel=1e-6, abs=1e-7
    )
    for q, p in [(cv[0], cv[1]), (cv[2], cv[7]), (cv[5], cv[5])]:
        want = float(reference.colbert_score(q, p))
        assert float(ours.colbert_score(q, p)) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_convert_id_to_token(pair, texts):
    reference, ours = pair
    lw = ours.encode(texts[:10], return_sparse=True)["lexical_weights"]
    assert ours.convert_id_to_token(lw) == reference.convert_id_to_token(lw)
    assert ours.convert_id_to_token(lw[0]) == reference.convert_id_to_token(lw[0])


def test_drop_in_class_has_flag_embedding_defaults(exported, pair, texts):
    reference, _ = pair
    drop_in = M3Drop(str(exported[1]), use_fp16=True, devices="cpu")  # FlagEmbedding's arguments accepted
    assert drop_in.passage_max_length == reference.passage_max_length == 512
    long_text = " ".join(texts) * 3
    assert_outputs(drop_in.encode([long_text, texts[0]], **ALL), reference.encode([long_text, texts[0]], **ALL))


def test_colbert_padding_quirk_of_compute_score(pair):
    """FlagEmbedding's batched ColBERT max runs over zero padding rows: a negative max becomes 0."""
    import torch

    from m3rt.scoring import colbert_score

    reference, _ = pair
    q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    p = np.array([[-0.8, -0.6], [-0.6, -0.8]], np.float32)
    padded_p = np.concatenate([p, np.zeros((2, 2), np.float32)])
    q_mask = torch.ones(1, 3)  # <s> + two query tokens
    want_padded = reference.model.compute_colbert_score(
        torch.from_numpy(q)[None], torch.from_numpy(padded_p)[None], q_mask=q_mask
    )
    want_plain = reference.model.compute_colbert_score(
        torch.from_numpy(q)[None], torch.from_numpy(p)[None], q_mask=q_mask
    )
    assert float(colbert_score(q, p, padded_passage=True)) == pytest.approx(float(want_padded), abs=1e-7)
    assert float(colbert_score(q, p)) == pytest.approx(float(want_plain), abs=1e-7)
    assert float(want_plain) == pytest.approx(-0.6) and float(want_padded) == 0
