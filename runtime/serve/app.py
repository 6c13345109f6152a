"""The HTTP API as a plain FastAPI app over any `Encoder`: validation, routes, error JSON, metrics.

Ray Serve builds one per replica around its batching encoder (`m3rt.serve.deployment`); tests and
other ASGI servers can run it on a `LocalEncoder`. Bodies are parsed here rather than by FastAPI so
that every failure answers OpenAI's error JSON: 400 bad JSON or input, 404 unknown model, 413 too
large, 422 wrong types or fields, 503 too many requests pending; an `M3Error` is answered by
`m3rt.errors.ERROR_ANSWERS` (bad input 400, out of memory 503, ...).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from m3rt.errors import InputError, M3Error, error_answer
from m3rt.heads import HEADS, OUTPUT_DENSE, OUTPUT_SPARSE
from m3rt.scoring import pair_scores
from m3rt.serve.batching import OUTPUTS, EncodedTexts, EncodeJob, merge_encoded, split_job
from m3rt.serve.metrics import Metrics
from m3rt.serve.protocol import (
    EmbeddingsRequest,
    EncodeRequest,
    RerankRequest,
    ScoreRequest,
    as_texts,
    as_token_ids,
    error_body,
    matrix,
    sparse,
    vector,
)
from m3rt.tokenizer import M3Tokenizer

logger = logging.getLogger("m3rt.serve")

RequestModel = TypeVar("RequestModel", bound=BaseModel)
ROUTES = ("/v1/embeddings", "/v1/encode", "/v1/rerank", "/v1/score", "/v1/models", "/health", "/ready", "/metrics")
# Routes that queue work: the ones counted against `Limits.max_pending`.
_WORK_ROUTES = frozenset(ROUTES[:4])
# Routes a load balancer or orchestrator probes without a key.
_OPEN_ROUTES = frozenset({"/health", "/ready"})


class Encoder(Protocol):
    async def encode(self, job: EncodeJob) -> EncodedTexts: ...


@dataclass(frozen=True)
class ServedModel:
    """What the app needs to know about the model behind the encoder."""

    name: str
    tokenizer: M3Tokenizer
    hidden_size: int
    max_length: int
    query_max_length: int
    passage_max_length: int
    # compute_score's batch_size: FlagEmbedding's ColBERT padding depends on it.
    score_batch_size: int
    aliases: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, model: Any, name: str, metadata: Mapping[str, Any] | None = None) -> ServedModel:
        """From an `M3Model`; the artifact's source model name is accepted as well as `name`."""
        source = model.manifest.source.get("model")
        return cls(
            name=name,
            tokenizer=model.tokenizer,
            hidden_size=model.manifest.hidden_size,
            max_length=model.max_length,
            query_max_length=model.query_max_length,
            passage_max_length=model.passage_max_length,
            score_batch_size=model.batch_size,
            aliases=(source,) if isinstance(source, str) and source != name else (),
            metadata=dict(metadata or {}),
        )


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 * 1024 * 1024
    max_inputs: int = 2048  # texts, documents or pairs per request
    max_pending: int = 512  # requests in progress in this process before new ones get 503
    # Tokens after truncation (specials included) of all a request's texts: embeddings, encode, rerank
    # (query and documents) and score (both sides of every pair) alike.
    max_request_tokens: int = 262144
    # ColBERT floats one response may carry (tokens - 1 per text, x hidden size): 64 MiB as float32,
    # several times that as JSON floats.
    max_colbert_values: int = 1 << 24
    # A request's texts go to the encoder in parts of at most this many padded tokens (the batch budget).
    part_tokens: int = 16384
    # From the first part sent to the encoder to the last result: past it, 504.
    request_timeout_s: float = 300.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(error_body(self.message, kind, self.code, self.param), self.status, headers=headers)


def internal_error(exc: BaseException, code: str = "internal_error") -> ApiError:
    """A 500 whose details stay in the server's log: the body names only a request id to look them up by."""
    request_id = uuid.uuid4().hex
    logger.error("request %s failed: %s: %s", request_id, type(exc).__name__, exc, exc_info=exc)
    return ApiError(500, f"internal error (request id {request_id}); the server log has the details", code)


def api_error(exc: M3Error, param: str | None = None) -> ApiError:
    """An `M3Error` as the API answers it (`m3rt.errors.ERROR_ANSWERS`); a server fault (500) without
    its text (`internal_error`), an overloaded server (503) with it."""
    answer = error_answer(exc)
    if answer.http_status == 500:
        return internal_error(exc, answer.code)
    message = f"{param}: {exc}" if param is not None else str(exc)
    return ApiError(answer.http_status, message, answer.code, param)


def _validation_error(exc: ValidationError) -> ApiError:
    errors = exc.errors(include_url=False)
    not_finite = [e for e in errors if e["type"] == "finite_number"]
    if not_finite:
        # A number of the right type with an unusable value: the same answer as weights whose sum overflows.
        message, param = _validation_message(not_finite)
        return ApiError(400, message, "invalid_value", param)
    message, param = _validation_message(errors)
    return ApiError(422, message, "invalid_type", param)


def _validation_message(errors: list[Any]) -> tuple[str, str | None]:
    parts = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors[:5]]
    param = ".".join(map(str, errors[0]["loc"])) if errors and errors[0]["loc"] else None
    return "; ".join(parts), param


def _outputs(**wanted: bool) -> set[str]:
    return {name for name, want in wanted.items() if want}


def _usage(jobs: list[EncodeJob]) -> dict[str, int]:
    tokens = sum(job.num_tokens for job in jobs)
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def _flag_outputs(encoded: EncodedTexts, repeat: int | None = None) -> dict[str, Any]:
    """`encode`'s dict of one job (lexical weights as FlagEmbedding's dicts), for `pair_scores`;
    `repeat` stacks a single text's outputs that many times (one query against many documents)."""
    out = {}
    for spec in HEADS:
        values = getattr(encoded, spec.serve)
        if spec.output == OUTPUT_SPARSE:
            values = [dict(zip(ids.astype(str).tolist(), list(w.astype(np.float32)))) for ids, w in values]
        if repeat is not None:
            values = np.repeat(values, repeat, axis=0) if spec.output == OUTPUT_DENSE else values * repeat
        out[spec.api] = values
    return out


def _score_dict(scores: Mapping[str, np.ndarray], index: int) -> dict[str, float]:
    return {name: float(values[index]) for name, values in scores.items()}


@dataclass
class Admission:
    """Requests of work in progress in this app, and whether it still takes new ones (a server that
    drains before it stops: those in progress finish, new ones get 503)."""

    pending: int = 0
    draining: bool = False


class _Accounting:
    """ASGI middleware: 503 past `max_pending` requests of work in progress or while draining, metrics
    per route and status, `headers` on every response (a plain ASGI wrapper: Starlette's
    `BaseHTTPMiddleware` costs a task group and a stream per request)."""

    def __init__(
        self, app: Any, *, limits: Limits, metrics: Metrics, headers: dict[str, str], admission: Admission
    ) -> None:
        self.app, self.limits, self.metrics, self.admission = app, limits, metrics, admission
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        counted = route in _WORK_ROUTES
        started = time.perf_counter()
        status = 500

        async def send_with_headers(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        try:
            admission = self.admission
            if counted and admission.draining:
                refused = ApiError(503, "server is shutting down; retry on another", "shutting_down")
                await refused.response()(scope, receive, send_with_headers)
                return
            if counted and admission.pending >= self.limits.max_pending:
                self.metrics.rejected.inc()
                message = f"server busy: {admission.pending} requests pending; retry later"
                await ApiError(503, message, "overloaded").response()(scope, receive, send_with_headers)
                return
            admission.pending += counted
            self.metrics.pending.set(admission.pending)
            try:
                await self.app(scope, receive, send_with_headers)
            finally:
                admission.pending -= counted
                self.metrics.pending.set(admission.pending)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


class _ApiKey:
    """ASGI middleware: `Authorization: Bearer KEY` on every route but the probes, else 401 JSON."""

    def __init__(self, app: Any, *, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_ROUTES:
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        # Constant time: how much of a guess matches must not show in the answer's timing.
        if not hmac.compare_digest(given, self.expected):
            message = "missing or wrong API key: send Authorization: Bearer <key>"
            refused = ApiError(401, message, "invalid_api_key").response()
            refused.headers["WWW-Authenticate"] = "Bearer"
            await refused(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(
    served: ServedModel,
    encoder: Encoder,
    *,
    limits: Limits | None = None,
    metrics: Metrics | None = None,
    headers: Mapping[str, str] | None = None,
    ready: Callable[[], bool] | None = None,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
    admission: Admission | None = None,
) -> FastAPI:
    """The API over `encoder`. `headers` go on every response (e.g. which node answered);
    `ready` decides /ready (default: always ready, the encoder exists); `api_key`: the Bearer key
    every route but /health and /ready needs; `cors_origins`: browser origins allowed (none by default);
    `admission`: the app's count of work in progress and its draining switch, for its owner to watch."""
    limits = limits or Limits()
    metrics = metrics or Metrics()
    extra_headers = dict(headers or {})
    created = int(time.time())
    app = FastAPI(title="m3rt", description="BGE-M3: dense, sparse and ColBERT over HTTP", docs_url="/docs")

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(M3Error)
    async def _m3_error(_: Request, exc: M3Error) -> JSONResponse:
        return api_error(exc).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return internal_error(exc).response()

    # Inside accounting (added first), so refused keys show in the metrics; CORS outermost, so a
    # browser's preflight, which carries no key, is answered.
    if api_key:
        app.add_middleware(_ApiKey, key=api_key)
    app.add_middleware(
        _Accounting, limits=limits, metrics=metrics, headers=extra_headers, admission=admission or Admission()
    )
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    async def parse(request: Request, kind: type[RequestModel]) -> RequestModel:
        too_large = ApiError(413, f"request body over {limits.max_body_bytes} bytes", "request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise too_large
        # Counted as it arrives: a chunked upload declares no length, and reading it whole first
        # would hold any amount in memory before the limit applied.
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise too_large
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}", "invalid_json") from None
        try:
            parsed = kind.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        model = getattr(parsed, "model", None)
        if model is not None and model not in (served.name, *served.aliases):
            raise ApiError(
                404, f"model {model!r} does not exist; this server serves {served.name!r}", "model_not_found", "model"
            )
        return parsed

    def check_length(value: int | None, default: int, param: str) -> int:
        value = default if value is None else value
        if not 2 <= value <= served.max_length:
            raise ApiError(400, f"{param} must be in [2, {served.max_length}], got {value}", "invalid_value", param)
        return value

    def make_ids_job(rows: list[list[int]], max_length: int, truncate: bool, outputs: set[str]) -> EncodeJob:
        if len(rows) > limits.max_inputs:
            raise ApiError(
                413,
                f"input has {len(rows)} entries; at most {limits.max_inputs} per request",
                "too_many_inputs",
                "input",
            )
        try:
            ids = served.tokenizer.add_specials(rows, max_length, truncate)
        except InputError as exc:
            raise api_error(exc, "input") from None
        return EncodeJob(("",) * len(ids), tuple(ids), max_length, frozenset(outputs))

    async def make_job(texts: list[str], max_length: int, truncate: bool, outputs: set[str], param: str) -> EncodeJob:
        if not texts:
            raise ApiError(400, f"{param} is empty: pass at least one text", "empty_input", param)
        if len(texts) > limits.max_inputs:
            message = f"{param} has {len(texts)} entries; at most {limits.max_inputs} per request"
            raise ApiError(413, message, "too_many_inputs", param)
        try:
            # Always in a thread, however short the texts: the tokenizer's lock is shared with the
            # model's own tokenisation, and waiting for it on the event loop would stall every route.
            started = time.perf_counter()
            ids = (await asyncio.to_thread(served.tokenizer.encode, texts, max_length, truncate)).ids
            metrics.tokenize_seconds.observe(time.perf_counter() - started)
        except InputError as exc:
            raise api_error(exc, param) from None
        return EncodeJob(tuple(texts), tuple(ids), max_length, frozenset(outputs))

    def check_size(jobs: list[EncodeJob], colbert_returned: bool) -> None:
        """413 for a request over the token or response budget: after tokenising, before any model work."""
        tokens = sum(job.num_tokens for job in jobs)
        if tokens > limits.max_request_tokens:
            message = (
                f"request has {tokens} tokens after truncation; at most {limits.max_request_tokens} per request: "
                "split it into several requests or lower max_length"
            )
            raise ApiError(413, message, "too_many_tokens")
        if colbert_returned:
            values = sum(length - 1 for job in jobs for length in job.lengths) * served.hidden_size
            if values > limits.max_colbert_values:
                message = (
                    f"the ColBERT vectors asked for hold {values} floats; at most {limits.max_colbert_values} "
                    "per response: ask for fewer texts or lower max_length"
                )
                raise ApiError(413, message, "response_too_large", "return_colbert")

    async def run_job(job: EncodeJob) -> EncodedTexts:
        return merge_encoded([await encoder.encode(part) for part in split_job(job, limits.part_tokens)])

    async def run(*jobs: EncodeJob) -> list[EncodedTexts]:
        try:
            results = await asyncio.wait_for(asyncio.gather(*map(run_job, jobs)), limits.request_timeout_s)
        except M3Error as exc:
            raise api_error(exc) from None
        except TimeoutError:
            message = f"request not done within {limits.request_timeout_s} s; send fewer or shorter texts"
            raise ApiError(504, message, "timeout") from None
        for job in jobs:
            metrics.texts.inc(len(job.texts))
            metrics.tokens.inc(job.num_tokens)
        return list(results)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        req = await parse(request, EmbeddingsRequest)
        if req.dimensions is not None and req.dimensions != served.hidden_size:
            message = f"dimensions must be {served.hidden_size} (BGE-M3's dense vectors cannot be shortened)"
            raise ApiError(400, message, "invalid_value", "dimensions")
        outputs = _outputs(dense=True, sparse=req.return_sparse, colbert=req.return_colbert)
        max_length = check_length(req.max_length, served.passage_max_length, "max_length")
        rows = as_token_ids(req.input)
        if rows is not None:
            job = make_ids_job(rows, max_length, req.truncate, outputs)
        else:
            job = await make_job(as_texts(req.input), max_length, req.truncate, outputs, "input")
        check_size([job], req.return_colbert)
        (out,) = await run(job)
        data = []
        for i in range(len(job.texts)):
            item: dict[str, Any] = {
                "object": "embedding",
                "index": i,
                "embedding": vector(out.dense[i], req.encoding_format),
            }
            if out.sparse is not None:
                item["sparse"] = sparse(*out.sparse[i], "indices_values")
            if out.colbert is not None:
                item["colbert"] = matrix(out.colbert[i], req.encoding_format)
            data.append(item)
        return JSONResponse({"object": "list", "data": data, "model": served.name, "usage": _usage([job])})

    @app.post("/v1/encode")
    async def encode(request: Request) -> JSONResponse:
        req = await parse(request, EncodeRequest)
        outputs = _outputs(dense=req.return_dense, sparse=req.return_sparse, colbert=req.return_colbert)
        if not outputs:
            raise ApiError(400, "ask for at least one of return_dense, return_sparse, return_colbert", "no_output")
        max_length = check_length(req.max_length, served.passage_max_length, "max_length")
        job = await make_job(as_texts(req.input), max_length, req.truncate, outputs, "input")
        check_size([job], req.return_colbert)
        (out,) = await run(job)
        data = []
        for i in range(len(job.texts)):
            item: dict[str, Any] = {"index": i}
            if out.dense is not None:
                item["dense"] = vector(out.dense[i], req.encoding_format)
            if out.sparse is not None:
                item["sparse"] = sparse(*out.sparse[i], req.sparse_format)
            if out.colbert is not None:
                item["colbert"] = matrix(out.colbert[i], req.encoding_format)
            data.append(item)
        return JSONResponse({"object": "list", "data": data, "model": served.name, "usage": _usage([job])})

    def check_weights(weights: list[float] | None) -> list[float] | None:
        if weights is None:
            return None
        message = "weights [dense, sparse, colbert]: each, their sum and dense + sparse must be finite"
        not_finite = ApiError(400, message, "invalid_value", "weights")
        try:
            values = [float(w) for w in weights]
        except OverflowError:  # an integer past float's range
            raise not_finite from None
        total, dense_sparse = sum(values), values[0] + values[1]
        if not all(map(math.isfinite, (*values, total, dense_sparse))):
            raise not_finite
        if total == 0 or dense_sparse == 0:
            message = "weights [dense, sparse, colbert]: neither the sum nor dense + sparse may be 0"
            raise ApiError(400, message, "invalid_value", "weights")
        return values

    def weighted_scores(
        queries: EncodedTexts, passages: EncodedTexts, repeat: int | None, weights: list[float] | None
    ) -> dict[str, np.ndarray]:
        # Scores are float32: finite weights can still overflow them (past ~3.4e38) or divide by a near-0
        # sum; that is answered below rather than warned about.
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            scores = pair_scores(
                _flag_outputs(queries, repeat=repeat), _flag_outputs(passages), served.score_batch_size, weights
            )
        if weights is not None and not all(np.isfinite(values).all() for values in scores.values()):
            message = "weights [dense, sparse, colbert] give scores out of float32's range; scale them down"
            raise ApiError(400, message, "invalid_value", "weights")
        return scores

    everything = set(OUTPUTS)

    @app.post("/v1/rerank")
    async def rerank(request: Request) -> JSONResponse:
        req = await parse(request, RerankRequest)
        weights = check_weights(req.weights)
        q_len = check_length(req.max_query_length, served.query_max_length, "max_query_length")
        p_len = check_length(req.max_passage_length, served.passage_max_length, "max_passage_length")
        documents = req.document_texts()
        query_job = await make_job([req.query], q_len, True, everything, "query")
        docs_job = await make_job(documents, p_len, True, everything, "documents")
        check_size([query_job, docs_job], False)
        query, docs = await run(query_job, docs_job)
        scores = weighted_scores(query, docs, len(documents), weights)
        combined = scores["colbert+sparse+dense"]
        order = sorted(range(len(documents)), key=lambda i: (-combined[i], i))[: req.top_n]
        results = []
        for i in order:
            result: dict[str, Any] = {
                "index": i,
                "relevance_score": float(combined[i]),
                "scores": _score_dict(scores, i),
            }
            if req.return_documents:
                result["document"] = {"text": documents[i]}
            results.append(result)
        usage = _usage([query_job, docs_job])
        return JSONResponse({"object": "rerank", "model": served.name, "results": results, "usage": usage})

    @app.post("/v1/score")
    async def score(request: Request) -> JSONResponse:
        req = await parse(request, ScoreRequest)
        weights = check_weights(req.weights)
        q_len = check_length(req.max_query_length, served.query_max_length, "max_query_length")
        p_len = check_length(req.max_passage_length, served.passage_max_length, "max_passage_length")
        query_job = await make_job([p[0] for p in req.pairs], q_len, True, everything, "pairs")
        passage_job = await make_job([p[1] for p in req.pairs], p_len, True, everything, "pairs")
        check_size([query_job, passage_job], False)
        queries, passages = await run(query_job, passage_job)
        scores = weighted_scores(queries, passages, None, weights)
        data = [{"index": i, "scores": _score_dict(scores, i)} for i in range(len(req.pairs))]
        usage = _usage([query_job, passage_job])
        return JSONResponse({"object": "list", "model": served.name, "data": data, "usage": usage})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        info = {
            "hidden_size": served.hidden_size,
            "max_length": served.max_length,
            "query_max_length": served.query_max_length,
            "passage_max_length": served.passage_max_length,
            "outputs": list(OUTPUTS),
            **served.metadata,
        }
        card = {"id": served.name, "object": "model", "created": created, "owned_by": "m3rt", "m3rt": info}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def is_ready() -> JSONResponse:
        if ready is not None and not ready():
            return JSONResponse({"status": "loading"}, 503)
        return JSONResponse({"status": "ready", "model": served.name})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
