"""The HTTP API without Ray: routes against in-process `M3Model` calls, and every kind of bad request."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from fastapi.testclient import TestClient  # noqa: E402

from m3rt.errors import InputError  # noqa: E402
from m3rt.serve.app import Limits, ServedModel, create_app  # noqa: E402
from m3rt.serve.batching import EncodeJob, LocalEncoder, batch_size, encode_jobs, padded_tokens  # noqa: E402

TEXTS = ["hello world", "a much longer text about retrieval with several more words in it", "", "x y z"]


@pytest.fixture(scope="module")
def client(tiny_model):
    app = create_app(ServedModel.of(tiny_model, "bge-m3"), LocalEncoder(tiny_model), limits=Limits(4096, 8, 64))
    with TestClient(app) as test_client:
        yield test_client


def _f32(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4")


def _all(model, texts, **kwargs):
    return model.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True, **kwargs)


def _assert_sparse_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, weight in want.items():
        assert got[key] == pytest.approx(float(weight), abs=1e-6)


def test_encode_matches_in_process_encode(client, tiny_model):
    want = _all(tiny_model, TEXTS)
    body = client.post("/v1/encode", json={"input": TEXTS, "return_colbert": True}).json()
    assert [item["index"] for item in body["data"]] == list(range(len(TEXTS)))
    for item, dense, lexical, colbert in zip(
        body["data"], want["dense_vecs"], want["lexical_weights"], want["colbert_vecs"]
    ):
        np.testing.assert_allclose(item["dense"], dense, atol=1e-6)
        indices, values = item["sparse"]["indices"], item["sparse"]["values"]
        assert indices == sorted(indices)
        _assert_sparse_equal(dict(zip(map(str, indices), values)), lexical)
        np.testing.assert_allclose(np.array(item["colbert"]), colbert, atol=1e-6)
    tokens = sum(len(ids) for ids in tiny_model.tokenizer.encode(TEXTS, 8192).ids)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_encode_base64_and_flag_embedding_dict(client, tiny_model):
    want = _all(tiny_model, TEXTS[:2], max_length=4)
    body = client.post(
        "/v1/encode",
        json={
            "input": TEXTS[:2],
            "return_colbert": True,
            "encoding_format": "base64",
            "sparse_format": "dict",
            "max_length": 4,
        },
    ).json()
    for item, dense, lexical, colbert in zip(
        body["data"], want["dense_vecs"], want["lexical_weights"], want["colbert_vecs"]
    ):
        np.testing.assert_allclose(_f32(item["dense"]), dense, atol=1e-6)
        _assert_sparse_equal(item["sparse"], lexical)
        assert item["colbert"]["dtype"] == "float32" and item["colbert"]["shape"] == list(colbert.shape)
        np.testing.assert_allclose(_f32(item["colbert"]["data"]).reshape(colbert.shape), colbert, atol=1e-6)


def test_encode_only_what_is_asked(client):
    item = client.post("/v1/encode", json={"input": "x", "return_dense": False}).json()["data"][0]
    assert set(item) == {"index", "sparse"}


def test_embeddings_openai_shape(client, tiny_model):
    want = _all(tiny_model, TEXTS)
    body = client.post("/v1/embeddings", json={"input": TEXTS, "model": "bge-m3"}).json()
    assert body["object"] == "list" and body["model"] == "bge-m3"
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", i) for i in range(len(TEXTS))]
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], want["dense_vecs"], atol=1e-6)
    assert set(body["data"][0]) == {"object", "index", "embedding"}
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0

    single = client.post(
        "/v1/embeddings",
        json={"input": TEXTS[1], "encoding_format": "base64", "return_sparse": True, "return_colbert": True},
    ).json()["data"]
    assert len(single) == 1
    np.testing.assert_allclose(_f32(single[0]["embedding"]), want["dense_vecs"][1], atol=1e-6)
    _assert_sparse_equal(
        dict(zip(map(str, single[0]["sparse"]["indices"]), single[0]["sparse"]["values"])), want["lexical_weights"][1]
    )
    colbert = single[0]["colbert"]
    np.testing.assert_allclose(_f32(colbert["data"]).reshape(colbert["shape"]), want["colbert_vecs"][1], atol=1e-6)


def test_rerank_and_score_equal_compute_score(client, tiny_model):
    query = "what is retrieval"
    documents = ["retrieval finds documents", "a cat", "what is retrieval exactly, in many words " * 3, ""]
    weights = [0.4, 0.2, 0.4]
    want = tiny_model.compute_score([(query, d) for d in documents], weights_for_different_modes=weights)
    body = client.post(
        "/v1/rerank",
        json={
            "query": query,
            "documents": [documents[0], {"text": documents[1]}, *documents[2:]],
            "weights": weights,
            "top_n": 3,
            "return_documents": True,
        },
    ).json()
    combined = np.array(want["colbert+sparse+dense"])
    assert [r["index"] for r in body["results"]] == list(np.argsort(-combined, kind="stable")[:3])
    for result in body["results"]:
        i = result["index"]
        assert result["document"] == {"text": documents[i]}
        assert result["relevance_score"] == pytest.approx(combined[i], abs=1e-5)
        for name, values in want.items():
            assert result["scores"][name] == pytest.approx(values[i], abs=1e-5)

    pairs = [[query, d] for d in documents] + [["another query", "another passage"]]
    want = tiny_model.compute_score([tuple(p) for p in pairs])
    data = client.post("/v1/score", json={"pairs": pairs}).json()["data"]
    assert [d["index"] for d in data] == list(range(len(pairs)))
    for name, values in want.items():
        np.testing.assert_allclose([d["scores"][name] for d in data], values, atol=1e-5)


def test_models_health_ready_metrics(client):
    card = client.get("/v1/models").json()["data"][0]
    assert card["id"] == "bge-m3" and card["m3rt"]["outputs"] == ["dense", "sparse", "colbert"]
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    client.post("/v1/encode", json={"input": ["one", "two"]})
    metrics = client.get("/metrics").text
    assert 'm3rt_requests_total{route="/v1/encode",status="200"}' in metrics
    assert "m3rt_texts_total" in metrics


BAD = [
    # (description, route, raw body, status, code)
    ("bad JSON", "/v1/encode", b'{"input": ["a",', 400, "invalid_json"),
    ("not UTF-8", "/v1/encode", b'{"input": "\xff"}', 400, "invalid_json"),
    ("number as input", "/v1/embeddings", {"input": 5}, 422, "invalid_type"),
    ("number in list", "/v1/embeddings", {"input": ["a", 5]}, 422, "invalid_type"),
    ("negative token id", "/v1/embeddings", {"input": [[1, -2, 3]]}, 422, "invalid_type"),
    ("token id past the vocabulary", "/v1/embeddings", {"input": [[1, 10**9]]}, 400, "invalid_input"),
    ("missing input", "/v1/encode", {}, 422, "invalid_type"),
    ("misspelt option", "/v1/encode", {"input": "a", "return_colbrt": True}, 422, "invalid_type"),
    ("string bool", "/v1/encode", {"input": "a", "truncate": "no"}, 422, "invalid_type"),
    ("bad format", "/v1/embeddings", {"input": "a", "encoding_format": "int8"}, 422, "invalid_type"),
    ("empty list", "/v1/embeddings", {"input": []}, 400, "empty_input"),
    ("no documents", "/v1/rerank", {"query": "q", "documents": []}, 400, "empty_input"),
    ("no pairs", "/v1/score", {"pairs": []}, 400, "empty_input"),
    ("triple", "/v1/score", {"pairs": [["a", "b", "c"]]}, 422, "invalid_type"),
    ("two weights", "/v1/rerank", {"query": "q", "documents": ["d"], "weights": [1, 1]}, 422, "invalid_type"),
    ("zero weights", "/v1/rerank", {"query": "q", "documents": ["d"], "weights": [0, 0, 0]}, 400, "invalid_value"),
    *[
        (f"{name} weights ({route})", route, body.replace(b"WEIGHTS", weights), 400, "invalid_value")
        for route, body in [
            ("/v1/rerank", b'{"query": "q", "documents": ["d"], "weights": WEIGHTS}'),
            ("/v1/score", b'{"pairs": [["q", "d"]], "weights": WEIGHTS}'),
        ]
        for name, weights in [
            ("NaN", b"[NaN, 1, 1]"),
            ("infinite", b"[1, -Infinity, 1]"),
            ("overflowing", b"[1e400, 1, 1]"),
            ("overflowing sum", b"[1e308, 1e308, 0]"),
            ("huge integer", b"[1, 1, 1" + b"0" * 400 + b"]"),
            ("float32-overflowing", b"[1e39, 1, 1]"),
        ]
    ],
    ("unknown model", "/v1/embeddings", {"input": "a", "model": "text-embedding-3-small"}, 404, "model_not_found"),
    (
        "too long",
        "/v1/encode",
        {"input": ["ok", "word " * 20], "truncate": False, "max_length": 8},
        400,
        "context_length_exceeded",
    ),
    ("max_length 1", "/v1/encode", {"input": "a", "max_length": 1}, 400, "invalid_value"),
    ("max_length over model", "/v1/encode", {"input": "a", "max_length": 100000}, 400, "invalid_value"),
    ("no output", "/v1/encode", {"input": "a", "return_dense": False, "return_sparse": False}, 400, "no_output"),
    ("dimensions", "/v1/embeddings", {"input": "a", "dimensions": 32}, 400, "invalid_value"),
    ("too many", "/v1/embeddings", {"input": ["a"] * 9}, 413, "too_many_inputs"),
    ("too large", "/v1/embeddings", {"input": "a" * 5000}, 413, "request_too_large"),
    ("lone surrogate", "/v1/encode", b'{"input": "a\\ud800b"}', 400, "invalid_input"),
]


@pytest.mark.parametrize(("route", "body", "status", "code"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_answer_openai_error_json(client, route, body, status, code):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = client.post(route, headers={"content-type": "application/json"}, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]


def test_a_bad_job_fails_alone_in_its_batch(tiny_model):
    """encode_jobs on a model whose encode fails for one text: the other jobs of the batch succeed."""

    boom = tuple(tiny_model.tokenizer.encode(["boom"], 64).ids[0].tolist())

    class FailsOnBoom:
        def run_ids(self, ids, outputs, **kwargs):
            if any(tuple(row.tolist()) == boom for row in ids):
                raise InputError("boom")
            return tiny_model.run_ids(ids, outputs, **kwargs)

    def job(texts, max_length=64, outputs=("dense", "sparse", "colbert")):
        ids = tuple(tiny_model.tokenizer.encode(texts, max_length).ids)
        return EncodeJob(tuple(texts), ids, max_length, frozenset(outputs))

    jobs = [job(["a", "b c"]), job(["boom"]), job(["d e f"], max_length=8, outputs=("dense",)), job(["g"])]
    results = encode_jobs(FailsOnBoom(), jobs)
    assert isinstance(results[1], InputError)
    for result, texts, max_length in [
        (results[0], ["a", "b c"], 64),
        (results[2], ["d e f"], 8),
        (results[3], ["g"], 64),
    ]:
        want = _all(tiny_model, texts, max_length=max_length)
        np.testing.assert_allclose(result.dense, want["dense_vecs"], atol=1e-6)
    assert results[2].sparse is None and results[2].colbert is None
    longest = max(max(j.lengths) for j in jobs)
    assert padded_tokens(jobs) == batch_size(jobs) == 5 * longest
    assert batch_size(jobs[:1]) == 1  # a lone job always fits the budget


def test_busy_server_answers_503(tiny_model):
    """Past max_pending requests in progress, new work is refused with 503 and Retry-After."""
    import httpx

    class Blocking:
        def __init__(self) -> None:
            self.started, self.release = asyncio.Event(), asyncio.Event()

        async def encode(self, job):
            self.started.set()
            await self.release.wait()
            return await LocalEncoder(tiny_model).encode(job)

    async def scenario():
        encoder = Blocking()
        app = create_app(ServedModel.of(tiny_model, "bge-m3"), encoder, limits=Limits(max_pending=1))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            first = asyncio.create_task(http.post("/v1/embeddings", json={"input": "first"}))
            await encoder.started.wait()
            busy = await http.post("/v1/embeddings", json={"input": "second"})
            health = await http.get("/health")
            encoder.release.set()
            return (await first), busy, health, (await http.get("/metrics")).text

    first, busy, health, metrics = asyncio.run(scenario())
    assert first.status_code == 200 and health.status_code == 200
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "overloaded"
    assert "m3rt_rejected_busy_total 1.0" in metrics
    assert 'm3rt_requests_total{route="/v1/embeddings",status="503"} 1.0' in metrics
    assert len(first.json()["data"][0]["embedding"]) == tiny_model.manifest.hidden_size


def test_coalescer_merges_the_batches_that_wait_for_the_model():
    """Batches queued while the model runs go together in the next run (within the token budget);
    each batch gets its own results in order; a failed run fails only the batches it held."""
    import threading
    import time

    from m3rt.serve.batching import Coalescer

    runs: list[list[str]] = []
    started = threading.Event()

    def run(jobs):
        runs.append([job.texts[0] for job in jobs])
        started.set()
        time.sleep(0.2)  # the model is busy: the other batches queue meanwhile
        if any(job.texts[0] == "boom" for job in jobs):
            raise RuntimeError("boom")
        return [f"result of {job.texts[0]}" for job in jobs]

    def job(text, tokens=4):
        return EncodeJob((text,), (np.zeros(tokens, dtype=np.int64),), 64, frozenset({"dense"}))

    async def scenario(budget, batches):
        coalescer = Coalescer(run, budget)
        first = asyncio.create_task(coalescer([job("a")]))
        await asyncio.to_thread(started.wait)
        rest = [asyncio.create_task(coalescer(b)) for b in batches]
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(scenario(1000, [[job("b"), job("c")], [job("d")], [job("e"), job("f")]]))
    assert runs == [["a"], ["b", "c", "d", "e", "f"]]
    assert results == [["result of a"], ["result of b", "result of c"], ["result of d"], ["result of e", "result of f"]]

    runs.clear()
    started.clear()
    # Budget 16 padded tokens: b+c (3 rows x 4 with d) fit, e (8) does not join them; e and boom
    # (2 rows x 8) do, and their failed run fails those two batches only.
    results = asyncio.run(scenario(16, [[job("b"), job("c")], [job("d")], [job("e", 8)], [job("boom")]]))
    assert runs == [["a"], ["b", "c", "d"], ["e", "boom"]]
    assert results[:3] == [["result of a"], ["result of b", "result of c"], ["result of d"]]
    assert all(isinstance(r, RuntimeError) for r in results[3:])


def test_short_requests_wait_for_the_tokenizer_off_the_event_loop(tiny_model):
    """While the tokenizer is busy elsewhere (its lock is shared with the model's own tokenisation),
    a short request waiting for it leaves /health and every other route answering."""
    import httpx

    entered, free = threading.Event(), threading.Event()

    class BusyTokenizer:
        def encode(self, *args, **kwargs):
            entered.set()
            free.wait(10)
            return tiny_model.tokenizer.encode(*args, **kwargs)

    served = dataclasses.replace(ServedModel.of(tiny_model, "bge-m3"), tokenizer=BusyTokenizer())

    async def scenario():
        app = create_app(served, LocalEncoder(tiny_model))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            started = time.perf_counter()
            waiting = asyncio.create_task(http.post("/v1/embeddings", json={"input": "short"}))
            await asyncio.to_thread(entered.wait, 10)
            health = await http.get("/health")
            health_after = time.perf_counter() - started
            free.set()
            return health, health_after, await waiting

    health, health_after, waited = asyncio.run(scenario())
    assert health.status_code == 200 and waited.status_code == 200
    assert health_after < 5, f"/health waited {health_after:.1f} s for the tokenizer"


def test_chunked_body_over_the_limit_is_refused_before_it_is_read_whole(tiny_model):
    """A body without content-length (chunked upload) gets 413 once the limit is passed, not after
    the whole of it has been read into memory."""
    import httpx

    chunk, chunks = b" " * 1024, 1000
    sent = 0

    async def body():
        nonlocal sent
        yield b'{"input": "'
        for _ in range(chunks):
            sent += 1
            yield chunk
        yield b'"}'

    async def scenario():
        app = create_app(ServedModel.of(tiny_model, "bge-m3"), LocalEncoder(tiny_model), limits=Limits(4096))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.post("/v1/embeddings", content=body(), headers={"content-type": "application/json"})

    response = asyncio.run(scenario())
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    assert sent <= 8, f"{sent} of {chunks} chunks read before the 413"


def test_bench_batch_figures_are_those_of_one_round():
    from m3rt.benchmarks.serve_bench import _batching

    def scrape(count, total):
        return f"m3rt_batch_requests_count {count}\nm3rt_batch_requests_sum {total}\n"

    # Warm-up and an earlier round put 50 batches of 100 requests on the counters before this round.
    assert _batching(scrape(50.0, 100.0), scrape(60.0, 140.0)) == {"batches": 10.0, "requests_per_batch": 4.0}


def test_out_of_memory_is_503_and_each_m3error_answers_by_the_table(tiny_model):
    """A batch that does not fit even alone: 503 with Retry-After (the server's state, not the request's)."""
    from m3rt.errors import ERROR_ANSWERS, BackendError, BackendOutOfMemory, M3Error

    class Failing:
        def __init__(self, error):
            self.error = error

        def run_ids(self, ids, outputs, **kwargs):
            raise self.error

    served = ServedModel.of(tiny_model, "bge-m3")
    for error, status, code in [
        (BackendOutOfMemory("a 1 x 8192 batch did not fit"), 503, "out_of_memory"),
        (BackendError("provider failed"), 500, "backend_error"),
        (InputError("bad"), 400, "invalid_input"),
        (M3Error("anything else"), 500, "internal_error"),
    ]:
        assert (ERROR_ANSWERS[type(error)].http_status, ERROR_ANSWERS[type(error)].code) == (status, code)
        with TestClient(create_app(served, LocalEncoder(Failing(error)))) as failing:
            response = failing.post("/v1/encode", json={"input": ["hello"]})
        assert response.status_code == status and response.json()["error"]["code"] == code
        assert (response.headers.get("retry-after") == "1") == (status == 503)
