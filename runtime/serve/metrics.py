"""Prometheus metrics of one server process (one Serve replica): requests, texts, tokens, batches,
requests in progress, tokenisation and inference durations.

`/metrics` shows the replica that answers the scrape. Inside Ray Serve every metric is also recorded
through Ray Serve's metrics API (`ray.serve.metrics`), tagged with its replica: Ray's metrics export
on each node (`ray start --metrics-export-port`, scraped by Prometheus) carries every replica's
series, which add up across replicas (`sum without (replica)`).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144)
_JOB_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60)


class _Mirrored:
    """A prometheus_client metric (`labels(...)`, `inc`, `observe`, `set`) that also records to a Ray
    Serve metric of the same name and labels."""

    def __init__(self, local: Any, cluster: Any, label_names: tuple[str, ...] = (), tags: dict | None = None) -> None:
        self.local, self.cluster, self.label_names, self.tags = local, cluster, label_names, tags

    def labels(self, *values: str) -> _Mirrored:
        return _Mirrored(self.local.labels(*values), self.cluster, (), dict(zip(self.label_names, values)))

    def inc(self, amount: float = 1) -> None:
        self.local.inc(amount)
        self.cluster.inc(amount, tags=self.tags)

    def observe(self, value: float) -> None:
        self.local.observe(value)
        self.cluster.observe(value, tags=self.tags)

    def set(self, value: float) -> None:
        self.local.set(value)
        self.cluster.set(value, tags=self.tags)


def _ray_metric(kind: str, name: str, doc: str, labels: tuple[str, ...], buckets: tuple | None) -> Any:
    from ray.serve import metrics as serve_metrics

    if kind == "counter":
        return serve_metrics.Counter(name, doc, tag_keys=labels)
    if kind == "gauge":
        return serve_metrics.Gauge(name, doc, tag_keys=labels)
    return serve_metrics.Histogram(name, doc, boundaries=list(buckets), tag_keys=labels)


class Metrics:
    """The server's metrics; `cluster=True` (inside a Serve replica) records each through Ray Serve too."""

    def __init__(self, cluster: bool = False) -> None:
        self.registry = CollectorRegistry()

        def make(kind: str, name: str, doc: str, labels: tuple[str, ...] = (), buckets: tuple | None = None) -> Any:
            options: dict[str, Any] = {"registry": self.registry}
            if buckets is not None:
                options["buckets"] = buckets
            local = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[kind](name, doc, labels, **options)
            if not cluster:
                return local
            return _Mirrored(local, _ray_metric(kind, name, doc, labels, buckets), labels)

        self.requests = make("counter", "m3rt_requests", "HTTP requests by route and status code", ("route", "status"))
        self.latency = make("histogram", "m3rt_request_seconds", "Request latency", ("route",), _SECONDS_BUCKETS)
        self.texts = make("counter", "m3rt_texts", "Texts encoded")
        self.tokens = make("counter", "m3rt_tokens", "Tokens encoded (after truncation, specials included)")
        self.batch_jobs = make(
            "histogram", "m3rt_batch_requests", "Encode jobs (request parts) per batched encode", buckets=_JOB_BUCKETS
        )
        self.batch_tokens = make(
            "histogram", "m3rt_batch_padded_tokens", "Padded tokens per batched encode", buckets=_TOKEN_BUCKETS
        )
        self.rejected = make("counter", "m3rt_rejected_busy", "Requests answered 503 (too many pending)")
        self.pending = make("gauge", "m3rt_requests_pending", "Requests of work in progress or waiting (queue size)")
        self.tokenize_seconds = make(
            "histogram", "m3rt_tokenize_seconds", "Tokenisation time per request part", buckets=_SECONDS_BUCKETS
        )
        self.inference_seconds = make(
            "histogram", "m3rt_inference_seconds", "Model time per batched encode", buckets=_SECONDS_BUCKETS
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
