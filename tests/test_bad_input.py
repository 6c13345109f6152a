"""Every bad input gets FlagEmbedding's behaviour or a clear m3rt error, never an ORT traceback."""

import numpy as np
import pytest

from m3rt import InputError, InputTooLongError, M3Model

from fake_backend import FakeBackend
from parity import assert_outputs

ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)


def test_empty_list_gives_empty_outputs(tiny_model):
    out = tiny_model.encode([], **ALL)
    assert out["dense_vecs"].shape == (0, tiny_model.manifest.hidden_size)
    assert out["lexical_weights"] == [] and out["colbert_vecs"] == []
    assert tiny_model.compute_score([]) == []


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_and_whitespace_texts_encode_like_flag_embedding(tiny_model, text):
    out = tiny_model.encode([text, "hello"], **ALL)
    assert out["dense_vecs"].shape[0] == 2
    assert np.isclose(np.linalg.norm(out["dense_vecs"][0]), 1.0)
    # <s> and </s> only (or plus one space piece): specials never appear in lexical weights.
    assert all(k not in ("0", "1", "2", "3") for k in out["lexical_weights"][0])
    assert out["colbert_vecs"][0].shape[0] >= 1


@pytest.mark.parametrize("bad", [None, b"bytes", 42, {"a": 1}])
def test_wrong_argument_types(tiny_model, bad):
    with pytest.raises(InputError, match="sentences"):
        tiny_model.encode(bad)


@pytest.mark.parametrize("item,hint", [(None, "NoneType"), (b"x", "decode"), (3.5, "float")])
def test_wrong_item_types_name_the_index(tiny_model, item, hint):
    with pytest.raises(InputError, match=rf"sentences\[1\].*{hint}"):
        tiny_model.encode(["ok", item, "fine"])


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, "8", True])
def test_absurd_batch_size(tiny_model, batch_size):
    with pytest.raises(InputError, match="batch_size"):
        tiny_model.encode(["a"], batch_size=batch_size)


def test_huge_batch_size_is_bounded_by_the_token_budget(tiny_model, texts):
    out = tiny_model.encode(texts, batch_size=10**9, return_sparse=True)
    assert out["dense_vecs"].shape[0] == len(texts) == len(out["lexical_weights"])


@pytest.mark.parametrize("max_length", [0, 1, -5, 8193, 10**9, 3.0])
def test_absurd_max_length(tiny_model, max_length):
    with pytest.raises(InputError, match="max_length"):
        tiny_model.encode(["a"], max_length=max_length)


def test_too_long_text_truncates_by_default_and_can_be_an_error(tiny_model):
    long_text = "word " * 20000
    out = tiny_model.encode([long_text, "short"], max_length=100, return_colbert_vecs=True)
    assert out["colbert_vecs"][0].shape[0] == 99  # 100 tokens, <s> dropped
    with pytest.raises(InputTooLongError, match="text 0 .*max_length=100"):
        tiny_model.encode([long_text, "short"], max_length=100, truncate=False)
    assert tiny_model.encode(["short"], max_length=100, truncate=False)["dense_vecs"].shape[0] == 1


def test_sparse_format_checks(tiny_model):
    with pytest.raises(InputError, match="sparse_format"):
        tiny_model.encode(["a"], return_sparse=True, sparse_format="coo")


@pytest.mark.parametrize("pairs", [None, "just a string", [("q",)], [("q", "p", "x")]])
def test_bad_score_pairs(tiny_model, pairs):
    with pytest.raises(InputError):
        tiny_model.compute_score(pairs)


def test_bad_lexical_weights(tiny_model):
    with pytest.raises(InputError, match="lexical weights"):
        tiny_model.compute_lexical_matching_score({"5": 1.0}, [{"5": 1.0}])


def test_bad_colbert_shapes(tiny_model):
    with pytest.raises(InputError, match="ColBERT"):
        tiny_model.colbert_score(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))


def test_invalid_constructor_options(tiny):
    with pytest.raises(InputError, match="token_budget"):
        M3Model.load(tiny[1], token_budget=0)


def test_out_of_memory_batches_are_split_and_nothing_is_lost(tiny_model, texts):
    want = tiny_model.encode(texts, **ALL)
    backend = FakeBackend(tiny_model.backend, out_of_memory_above=lambda ids: len(ids) > 3)
    got = M3Model(tiny_model.manifest, backend, tiny_model.tokenizer).encode(texts, **ALL)
    assert backend.refused > 0 and max(rows for rows, _ in backend.calls) > 3
    # Re-padding a split batch may move results by float32 round-off only.
    assert_outputs(got, want)


def test_other_backend_errors_are_not_retried(tiny_model):
    from m3rt import BackendError

    # Only the type decides a retry, whatever the text says.
    backend = FakeBackend(tiny_model.backend, fail_on_call=1, error=BackendError("provider exploded: out of memory?"))
    with pytest.raises(BackendError, match="provider exploded"):
        M3Model(tiny_model.manifest, backend, tiny_model.tokenizer).encode(["a", "b", "c"])
    assert len(backend.calls) == 1


def test_text_that_is_not_valid_unicode_is_an_input_error(tiny_model):
    with pytest.raises(InputError, match=r"text 1 is not valid Unicode: surrogates not allowed at character 1"):
        tiny_model.encode(["fine", "a\ud800b", "also fine"])


def test_close_and_context_manager_release_the_backend(tiny_model):
    backend = FakeBackend(tiny_model.backend)
    with M3Model(tiny_model.manifest, backend, tiny_model.tokenizer) as model:
        assert model.encode("hello")["dense_vecs"].shape == (tiny_model.manifest.hidden_size,)
        assert backend.closed == 0
    assert backend.closed == 1
    M3Model(tiny_model.manifest, tiny_model.backend, tiny_model.tokenizer).close()  # no close(): nothing to do
