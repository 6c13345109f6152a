"""The server on an open network: API keys, opt-in CORS, and 5xx bodies without the server's internals."""

from __future__ import annotations

import logging
import re

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from m3rt.errors import BackendError  # noqa: E402
from m3rt.serve.app import ServedModel, create_app  # noqa: E402
from m3rt.serve.batching import LocalEncoder  # noqa: E402

KEY = "k3y-for-tests-only"
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def keyed(tiny_model):
    app = create_app(ServedModel.of(tiny_model, "bge-m3"), LocalEncoder(tiny_model), api_key=KEY)
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize(
    "method, route, body",
    [
        ("post", "/v1/embeddings", {"input": "hi"}),
        ("post", "/v1/encode", {"input": "hi"}),
        ("post", "/v1/rerank", {"query": "q", "documents": ["d"]}),
        ("post", "/v1/score", {"pairs": [["q", "d"]]}),
        ("get", "/v1/models", None),
        ("get", "/metrics", None),
        ("get", "/docs", None),
        ("get", "/openapi.json", None),
        ("post", "/no-such-route", {}),
    ],
)
def test_every_route_but_the_probes_needs_the_key(keyed, method, route, body):
    kwargs = {} if body is None else {"json": body}
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"bearer {KEY}x"}]:
        response = getattr(keyed, method)(route, headers=headers, **kwargs)
        assert response.status_code == 401, (headers, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    response = getattr(keyed, method)(route, headers={"Authorization": f"Bearer {KEY}"}, **kwargs)
    assert response.status_code != 401
    if route != "/no-such-route":
        assert response.status_code == 200


def test_probes_need_no_key(keyed):
    assert keyed.get("/health").status_code == 200
    assert keyed.get("/ready").status_code == 200


def test_the_key_comes_from_the_environment(monkeypatch):
    from m3rt.cli import build_parser

    monkeypatch.setenv("M3RT_API_KEY", KEY)
    assert build_parser().parse_args(["serve", "artifact"]).api_key == KEY
    assert build_parser().parse_args(["serve", "artifact", "--api-key", "other"]).api_key == "other"
    monkeypatch.delenv("M3RT_API_KEY")
    assert build_parser().parse_args(["serve", "artifact"]).api_key is None


def test_cors_is_off_unless_an_origin_is_given(tiny_model):
    served = ServedModel.of(tiny_model, "bge-m3")
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    with TestClient(create_app(served, LocalEncoder(tiny_model))) as closed:
        assert "access-control-allow-origin" not in closed.options("/v1/embeddings", headers=preflight).headers
        assert "access-control-allow-origin" not in closed.get("/health", headers={"Origin": ORIGIN}).headers
    app = create_app(served, LocalEncoder(tiny_model), api_key=KEY, cors_origins=[ORIGIN])
    with TestClient(app) as opened:
        answer = opened.options(
            "/v1/embeddings", headers={**preflight, "Access-Control-Request-Headers": "authorization"}
        )
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN
        other = opened.options("/v1/embeddings", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        keyed = opened.post(
            "/v1/embeddings", json={"input": "x"}, headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"}
        )
        assert keyed.status_code == 200 and keyed.headers["access-control-allow-origin"] == ORIGIN


@pytest.mark.parametrize("error", [RuntimeError("disk /srv/secret/path exploded"), BackendError("/srv/secret/path")])
def test_5xx_bodies_name_a_request_id_and_the_log_has_the_details(tiny_model, caplog, error):
    class Broken:
        async def encode(self, job):
            raise error

    served = ServedModel.of(tiny_model, "bge-m3")
    with caplog.at_level(logging.ERROR, logger="m3rt.serve"):
        with TestClient(create_app(served, Broken()), raise_server_exceptions=False) as client:
            response = client.post("/v1/embeddings", json={"input": "hello"})
    assert response.status_code == 500
    message = response.json()["error"]["message"]
    assert "secret" not in response.text and type(error).__name__ not in response.text
    request_id = re.search(r"request id ([0-9a-f]{32})", message).group(1)
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and "/srv/secret/path" in logged[0].getMessage()
