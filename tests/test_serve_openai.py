"""/v1/embeddings as OpenAI's: token-id input, and over-length input refused unless truncate is true."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from m3rt.serve.app import ServedModel, create_app  # noqa: E402
from m3rt.serve.batching import LocalEncoder  # noqa: E402

TEXTS = ["token ids instead of text", "a second text, with punctuation and more words"]


@pytest.fixture(scope="module")
def client(tiny_model):
    with TestClient(create_app(ServedModel.of(tiny_model, "bge-m3"), LocalEncoder(tiny_model))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def plain_ids(tiny):
    """Token ids of TEXTS without specials, from `tokenizers` itself (what a client would send)."""
    tok = Tokenizer.from_file(str(tiny[1] / "tokenizer.json"))
    return [enc.ids for enc in tok.encode_batch(TEXTS, add_special_tokens=False)]


def _dense(response):
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]])


def test_token_id_input_equals_text_input(client, tiny_model, plain_ids):
    want = tiny_model.encode(TEXTS, return_dense=True)["dense_vecs"]
    np.testing.assert_allclose(_dense(client.post("/v1/embeddings", json={"input": plain_ids})), want, atol=1e-5)
    one = client.post("/v1/embeddings", json={"input": plain_ids[1]})
    np.testing.assert_allclose(_dense(one), want[1:], atol=1e-5)
    assert one.json()["usage"]["prompt_tokens"] == len(plain_ids[1]) + 2


def test_over_length_is_400_unless_truncate(client, tiny_model, plain_ids):
    long_text = " ".join(TEXTS * 10)
    for body in [{"input": long_text}, {"input": [plain_ids[0] * 10]}]:
        refused = client.post("/v1/embeddings", json={**body, "max_length": 16})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    want = tiny_model.encode([long_text], max_length=16, return_dense=True)["dense_vecs"]
    truncated = client.post("/v1/embeddings", json={"input": long_text, "max_length": 16, "truncate": True})
    np.testing.assert_allclose(_dense(truncated), want, atol=1e-5)
    ids_want = tiny_model.encode([TEXTS[0] * 1], max_length=len(plain_ids[0]) + 2, return_dense=True)["dense_vecs"]
    cut = client.post(
        "/v1/embeddings",
        json={"input": [plain_ids[0] + plain_ids[1]], "max_length": len(plain_ids[0]) + 2, "truncate": True},
    )
    np.testing.assert_allclose(_dense(cut), ids_want, atol=1e-5)
