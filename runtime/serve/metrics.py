"""Prometheus metrics of one server process (one Serve replica): requests, texts, tokens, batches."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

_TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144)
_JOB_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "m3rt_requests", "HTTP requests by route and status code", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram("m3rt_request_seconds", "Request latency", ["route"], registry=self.registry)
        self.texts = Counter("m3rt_texts", "Texts encoded", registry=self.registry)
        self.tokens = Counter(
            "m3rt_tokens", "Tokens encoded (after truncation, specials included)", registry=self.registry
        )
        self.batch_jobs = Histogram(
            "m3rt_batch_requests",
            "Encode jobs (request parts) per batched encode",
            buckets=_JOB_BUCKETS,
            registry=self.registry,
        )
        self.batch_tokens = Histogram(
            "m3rt_batch_padded_tokens",
            "Padded tokens per batched encode",
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "m3rt_rejected_busy", "Requests answered 503 (too many pending)", registry=self.registry
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
