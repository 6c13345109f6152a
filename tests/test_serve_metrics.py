"""Metrics recorded through Ray Serve's metrics API too (tagged per replica by Serve, so they add up
across replicas), with the same values and labels as the replica's own /metrics."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from m3rt.serve import metrics as metrics_module  # noqa: E402
from m3rt.serve.app import ServedModel, create_app  # noqa: E402
from m3rt.serve.batching import LocalEncoder  # noqa: E402


class Recorded:
    """Stands in for a `ray.serve.metrics` metric: what was recorded, with which tags."""

    def __init__(self, kind, name, labels):
        self.kind, self.name, self.labels, self.calls = kind, name, labels, []

    def inc(self, value=1.0, tags=None):
        self.calls.append((value, tags))

    observe = set = inc


def _sample(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_every_metric_is_recorded_for_the_cluster_too(tiny_model, monkeypatch):
    made = {}

    def fake(kind, name, doc, labels, buckets):
        made[name] = Recorded(kind, name, labels)
        return made[name]

    monkeypatch.setattr(metrics_module, "_ray_metric", fake)
    metrics = metrics_module.Metrics(cluster=True)
    app = create_app(ServedModel.of(tiny_model, "bge-m3"), LocalEncoder(tiny_model), metrics=metrics)
    with TestClient(app) as client:
        for body in [{"input": ["a b", "c"]}, {"input": "d e f"}, {"input": []}]:
            client.post("/v1/embeddings", json=body)
        local = client.get("/metrics").text
    requests = [tags for _, tags in made["m3rt_requests"].calls if tags["route"] == "/v1/embeddings"]
    assert sorted(tags["status"] for tags in requests) == ["200", "200", "400"]
    assert sum(v for v, _ in made["m3rt_texts"].calls) == _sample(local, "m3rt_texts_total") == 3
    assert sum(v for v, _ in made["m3rt_tokens"].calls) == _sample(local, "m3rt_tokens_total") > 0
    # The empty input is refused before it is tokenised.
    assert len(made["m3rt_tokenize_seconds"].calls) == _sample(local, "m3rt_tokenize_seconds_count") == 2
    assert made["m3rt_requests_pending"].calls[-1][0] == _sample(local, "m3rt_requests_pending") == 0
    assert max(v for v, _ in made["m3rt_requests_pending"].calls) == 1
