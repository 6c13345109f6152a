"""Bounded work per request: token and ColBERT budgets refused before any model work, big jobs sent in
budget-sized parts that let other requests in between, and a request timeout."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from m3rt.serve.app import Limits, ServedModel, create_app  # noqa: E402
from m3rt.serve.batching import LocalEncoder, padded_tokens  # noqa: E402

WORDS = "retrieval with dense sparse and multi vector outputs in many languages".split()


class Recording:
    """The tiny model's encoder, recording every job it is handed (in order)."""

    def __init__(self, model) -> None:
        self.inner, self.jobs = LocalEncoder(model), []

    async def encode(self, job):
        self.jobs.append(job)
        return await self.inner.encode(job)


def _tokens(tiny, texts, max_length):
    """Tokens after truncation, specials included, counted by `tokenizers` itself."""
    tok = Tokenizer.from_file(str(tiny[1] / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    return sum(len(enc.ids) for enc in tok.encode_batch(texts))


def _texts(n: int, words: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)) for i in range(n)]


@pytest.mark.parametrize("route", ["/v1/embeddings", "/v1/encode", "/v1/rerank", "/v1/score"])
def test_token_budget_counts_every_route_alike_and_refuses_before_model_work(tiny, tiny_model, route):
    texts = _texts(6, 30)
    served = ServedModel.of(tiny_model, "bge-m3")
    q_len, p_len = served.query_max_length, served.passage_max_length
    if route == "/v1/rerank":
        body = {"query": texts[0], "documents": texts[1:]}
        tokens = _tokens(tiny, texts[:1], q_len) + _tokens(tiny, texts[1:], p_len)
    elif route == "/v1/score":
        body = {"pairs": [[texts[0], t] for t in texts[1:]]}
        tokens = _tokens(tiny, [texts[0]] * 5, q_len) + _tokens(tiny, texts[1:], p_len)
    else:
        body = {"input": texts}
        tokens = _tokens(tiny, texts, p_len)
    for budget, status in [(tokens, 200), (tokens - 1, 413)]:
        encoder = Recording(tiny_model)
        app = create_app(served, encoder, limits=Limits(max_request_tokens=budget))
        with TestClient(app) as client:
            response = client.post(route, json=body)
        assert response.status_code == status, response.text
        if status == 413:
            assert response.json()["error"]["code"] == "too_many_tokens"
            assert response.json()["error"]["type"] == "invalid_request_error"
            assert encoder.jobs == []
        else:
            assert response.json()["usage"]["total_tokens"] == tokens


def test_colbert_response_cap(tiny_model):
    served = ServedModel.of(tiny_model, "bge-m3")
    texts = _texts(4, 20)
    vectors = sum(len(ids) - 1 for ids in tiny_model.tokenizer.encode(texts, served.passage_max_length).ids)
    cap = vectors * served.hidden_size
    for limit, status in [(cap, 200), (cap - 1, 413)]:
        encoder = Recording(tiny_model)
        with TestClient(create_app(served, encoder, limits=Limits(max_colbert_values=limit))) as client:
            colbert = client.post("/v1/encode", json={"input": texts, "return_colbert": True})
            plain = client.post("/v1/encode", json={"input": texts})
        assert colbert.status_code == status and plain.status_code == 200
        if status == 413:
            assert colbert.json()["error"]["code"] == "response_too_large"
            assert len(encoder.jobs) == 1  # only the request without ColBERT reached the model


def test_big_job_goes_in_budget_parts_and_equals_in_process_encode(tiny_model):
    served = ServedModel.of(tiny_model, "bge-m3")
    texts = _texts(12, 25) + ["short"]
    encoder = Recording(tiny_model)
    budget = 100
    with TestClient(create_app(served, encoder, limits=Limits(part_tokens=budget))) as client:
        response = client.post("/v1/encode", json={"input": texts, "return_colbert": True})
    assert response.status_code == 200
    assert len(encoder.jobs) > 1
    assert all(padded_tokens([job]) <= budget for job in encoder.jobs)
    assert [t for job in encoder.jobs for t in job.texts] == texts
    want = tiny_model.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    data = response.json()["data"]
    np.testing.assert_allclose([d["dense"] for d in data], want["dense_vecs"], atol=1e-5)
    for d, colbert in zip(data, want["colbert_vecs"]):
        np.testing.assert_allclose(d["colbert"], colbert, atol=1e-5)


def test_other_requests_run_between_the_parts_of_a_big_one(tiny_model):
    served = ServedModel.of(tiny_model, "bge-m3")
    encoder = Recording(tiny_model)
    app = create_app(served, encoder, limits=Limits(part_tokens=64))

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            big = asyncio.create_task(http.post("/v1/embeddings", json={"input": _texts(40, 25)}))
            while len(encoder.jobs) < 2:
                await asyncio.sleep(0.01)
            small = await http.post("/v1/embeddings", json={"input": "one small text"})
            return await big, small

    big, small = asyncio.run(scenario())
    assert big.status_code == 200 and small.status_code == 200
    order = [job.texts for job in encoder.jobs]
    small_at = order.index(("one small text",))
    assert 0 < small_at < len(order) - 1  # after the big request's first parts, before its last


def test_request_timeout_is_504_json(tiny_model):
    class Stuck:
        async def encode(self, job):
            await asyncio.sleep(3600)

    served = ServedModel.of(tiny_model, "bge-m3")
    with TestClient(create_app(served, Stuck(), limits=Limits(request_timeout_s=0.2))) as client:
        response = client.post("/v1/embeddings", json={"input": "hello"})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"


def test_a_draining_app_refuses_new_work_with_json_503(tiny_model):
    from m3rt.serve.app import Admission

    admission = Admission()
    served = ServedModel.of(tiny_model, "bge-m3")
    with TestClient(create_app(served, LocalEncoder(tiny_model), admission=admission)) as client:
        assert client.post("/v1/embeddings", json={"input": "before"}).status_code == 200
        assert admission.pending == 0
        admission.draining = True
        refused = client.post("/v1/embeddings", json={"input": "after"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "shutting_down"
        assert client.get("/health").status_code == 200
