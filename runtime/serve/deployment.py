"""The Ray Serve deployment of the API, its application builder, and the server behind `m3rt serve`.

Each replica loads the artifact once and answers through `m3rt.serve.app`; requests' encode jobs are
batched across requests by Serve's `@serve.batch`, sized in padded tokens, one `encode` per batch.
`serve run m3rt.serve.deployment:build_app artifact=/path/to/artifact` (or an `import_path` in a
`serve deploy` / KubeRay config) builds the same application that `m3rt serve` runs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from ray import serve

from m3rt.errors import M3Error
from m3rt.ray_loopback import keep_ray_on_loopback
from m3rt.serve.app import Admission, Limits, ServedModel, create_app
from m3rt.serve.batching import Coalescer, EncodedTexts, EncodeJob, batch_size, encode_jobs, padded_tokens
from m3rt.serve.drain import drain, report_forever, start_gate
from m3rt.serve.loopback import is_loopback, listening_off_loopback
from m3rt.serve.metrics import Metrics

APP_NAME = "m3rt"
LOOPBACK = "127.0.0.1"
# Requests a replica takes beyond those its app admits: the ones it is answering 503 at that moment.
_REFUSAL_HEADROOM = 64
# Requests Serve's proxy holds while every replica is at its limit.
_PROXY_QUEUE = 4096
# How often a loopback server checks again what its processes listen on.
_LOOPBACK_CHECK_S = 5.0


class ServeConfig(BaseModel):
    """Settings of the application (the `args` of a Serve config; strings are converted)."""

    model_config = ConfigDict(extra="forbid")

    artifact: str
    model_name: str = "bge-m3"
    backend: str = "onnxruntime"
    precision: str = "fp32"
    device: str | None = None
    verify: bool = True
    intra_op_threads: int | None = Field(default=None, ge=1)
    # Padded tokens (rows x longest row) one batched encode may take from several requests.
    max_batch_tokens: int = Field(default=16384, ge=1)
    batch_wait_timeout_s: float = Field(default=0.005, ge=0)
    num_replicas: int = Field(default=1, ge=1)
    # Either both or neither: Serve autoscales between them on ongoing requests per replica.
    min_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int | None = Field(default=None, ge=1)
    target_ongoing_requests: float = Field(default=16, gt=0)
    num_cpus: float = Field(default=1, ge=0)
    num_gpus: float = Field(default=0, ge=0)
    # Past these Serve answers 503: requests in progress per replica, then queued at the proxy.
    max_ongoing_requests: int = Field(default=64, ge=1)
    max_queued_requests: int = Field(default=512, ge=-1)
    max_body_bytes: int = Field(default=Limits.max_body_bytes, ge=1)
    max_inputs: int = Field(default=Limits.max_inputs, ge=1)
    max_request_tokens: int = Field(default=Limits.max_request_tokens, ge=2)
    max_colbert_values: int = Field(default=Limits.max_colbert_values, ge=0)
    request_timeout_s: float = Field(default=Limits.request_timeout_s, gt=0)
    # The Bearer key of every route but /health and /ready (None: no key), kept out of reprs and logs.
    api_key: SecretStr | None = None
    cors_origins: list[str] = Field(default_factory=list)
    # The named actor replicas report to and learn from whether to drain (set by `m3rt serve`).
    drain_gate: str | None = None
    # Serve's log line per request (its replica log and the driver's console).
    access_log: bool = True

    def admitted(self) -> int | None:
        """Requests one replica's app takes at once before answering 503 itself (None: unbounded)."""
        if self.max_queued_requests < 0:
            return None
        return self.max_ongoing_requests + self.max_queued_requests

    def deployment_options(self) -> dict[str, Any]:
        # Overload is answered by the app (OpenAI's error JSON, 503, Retry-After), not by Serve, whose
        # answer is plain text: a replica accepts more requests than the app admits, so the app's
        # refusal comes first, and the proxy's queue is far past any load the replicas can refuse
        # quickly (past it Serve still answers 503 with Retry-After, in plain text).
        admitted = self.admitted()
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests if admitted is None else admitted + _REFUSAL_HEADROOM,
            "max_queued_requests": -1 if admitted is None else _PROXY_QUEUE,
            "backpressure_config": {"status_code": 503, "retry_after_s": 1},
            "logging_config": {"enable_access_log": self.access_log},
        }
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both min_replicas and max_replicas to autoscale, or neither")
        if self.min_replicas is not None:
            if self.min_replicas > self.max_replicas:
                raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = self.num_replicas
        return options


def _bind_replica_grpc_to(node_ip: str) -> None:
    """Ray Serve's replica binds its inter-deployment gRPC server to `[::]` (every interface) with no
    setting to change it, while Ray's own servers bind the node's address: bind it there too, so a
    server on 127.0.0.1 listens on nothing else. Must run in the replica before Serve starts it."""
    from ray.serve._private import replica as replica_module

    add_port = getattr(replica_module, "add_port_to_grpc_server", None)
    if add_port is None or getattr(add_port, "bound_to", None) is not None:
        return

    def add_port_on_node(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            host = f"[{node_ip}]" if ":" in node_ip else node_ip
            address = f"{host}:{address[len('[::]:') :]}"
        return add_port(server, address)

    add_port_on_node.bound_to = node_ip
    replica_module.add_port_to_grpc_server = add_port_on_node


class _NotATokenBudget(logging.Filter):
    """Serve warns that max_batch_size exceeds max_ongoing_requests, counting requests; here the batch
    size is a padded-token budget, so the warning is wrong and is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`max_batch_size`" not in record.getMessage()


@serve.deployment(name="M3Encoder")
@serve.ingress()
class M3Deployment:
    """One replica: the model, its batch queue, and the FastAPI app built around them."""

    def __init__(self, config: ServeConfig) -> None:
        import ray

        from m3rt.model import M3Model

        self.config = config
        _bind_replica_grpc_to(ray.util.get_node_ip_address())
        logging.getLogger("ray.serve").addFilter(_NotATokenBudget())
        self.model = M3Model.load(
            config.artifact,
            backend=config.backend,
            precision=config.precision,
            device=config.device,
            verify=config.verify,
            intra_op_threads=config.intra_op_threads,
        )
        self.model.encode(["warm up"], return_dense=True, return_sparse=True, return_colbert_vecs=True)
        self.metrics = Metrics(cluster=True)
        self._encode_batch.set_max_batch_size(config.max_batch_tokens)
        self._encode_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self._coalescer = Coalescer(self._run_jobs, config.max_batch_tokens)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.admission = Admission()
        if config.drain_gate:
            report_forever(config.drain_gate, self.replica_id, self.admission)

    def __serve_build_asgi_app__(self):
        metadata = {
            "backend": self.model.backend.name,
            "precision": self.config.precision,
            "device": self.config.device or "cpu",
            "node_id": self.node_id,
            "replica_id": self.replica_id,
            "max_batch_tokens": self.config.max_batch_tokens,
        }
        return create_app(
            ServedModel.of(self.model, self.config.model_name, metadata),
            self,
            limits=Limits(
                self.config.max_body_bytes,
                self.config.max_inputs,
                self.config.admitted() or 1 << 62,
                max_request_tokens=self.config.max_request_tokens,
                max_colbert_values=self.config.max_colbert_values,
                part_tokens=self.config.max_batch_tokens,
                request_timeout_s=self.config.request_timeout_s,
            ),
            metrics=self.metrics,
            headers={"x-m3rt-node": self.node_id, "x-m3rt-replica": self.replica_id},
            api_key=self.config.api_key.get_secret_value() if self.config.api_key else None,
            cors_origins=self.config.cors_origins,
            admission=self.admission,
        )

    async def encode(self, job: EncodeJob) -> EncodedTexts:
        result = await self._encode_batch(job)
        if isinstance(result, Exception):
            raise result
        return result

    # Several batches may be handed over at once: the coalescer merges those that wait for the model.
    @serve.batch(max_batch_size=16384, batch_wait_timeout_s=0.005, max_concurrent_batches=16, batch_size_fn=batch_size)
    async def _encode_batch(self, jobs: list[EncodeJob]) -> list[EncodedTexts | Exception]:
        return await self._coalescer(jobs)

    def _run_jobs(self, jobs: list[EncodeJob]) -> list[EncodedTexts | Exception]:
        self.metrics.batch_jobs.observe(len(jobs))
        self.metrics.batch_tokens.observe(padded_tokens(jobs))
        started = time.perf_counter()
        try:
            return encode_jobs(self.model, jobs)
        finally:
            self.metrics.inference_seconds.observe(time.perf_counter() - started)

    def __del__(self) -> None:
        model = getattr(self, "model", None)
        if model is not None:
            model.close()


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder: `serve run m3rt.serve.deployment:build_app artifact=DIR [key=value ...]`
    or `import_path: m3rt.serve.deployment:build_app` with `args:` (the fields of `ServeConfig`)."""
    config = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args)
    return M3Deployment.options(**config.deployment_options()).bind(config)


def run_server(
    config: ServeConfig,
    *,
    address: str | None = None,
    host: str = LOOPBACK,
    port: int = 8000,
    proxy_location: str = "HeadOnly",
    node_ip_address: str | None = None,
    drain_timeout_s: float = 30.0,
) -> None:
    """Deploy on a new local Ray instance (address None: every Ray service on 127.0.0.1, no dashboard,
    no usage statistics) or on the cluster at `address` (this driver on `node_ip_address` if given);
    serve until SIGINT / SIGTERM, then drain (new requests 503, those in progress finished, at most
    `drain_timeout_s`; a second signal cuts it short), remove the application (and stop the local
    instance)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    node_ip = node_ip_address or (LOOPBACK if address is None else None)
    if node_ip in ("127.0.0.1", "localhost", "::1"):
        keep_ray_on_loopback()
    config = config.model_copy(update={"drain_gate": f"drain-{uuid.uuid4().hex}"})
    app = build_app(config)  # bad settings fail before Ray starts
    if address is None:
        ray.init(_node_ip_address=node_ip, include_dashboard=False, num_cpus=_local_cpus(config))
    else:
        ray.init(address=address, **({"_node_ip_address": node_ip} if node_ip else {}))

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    gate = None
    try:
        gate = start_gate(config.drain_gate)
        serve.start(proxy_location=proxy_location, http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        check_loopback = is_loopback(host)
        if check_loopback:
            _refuse_off_loopback(host)
        print(f"m3rt serve: {config.model_name} ready at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(_LOOPBACK_CHECK_S if check_loopback else 3600)
            if check_loopback:
                _refuse_off_loopback(host)
    except KeyboardInterrupt:
        print(f"m3rt serve: draining (at most {drain_timeout_s} s)", file=sys.stderr, flush=True)
        try:
            drained = gate is not None and drain(gate, drain_timeout_s)
        except KeyboardInterrupt:
            drained = False
        print(f"m3rt serve: {'drained' if drained else 'not drained'}, shutting down", file=sys.stderr, flush=True)
    finally:
        try:
            if address is None:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()


class OffLoopbackError(M3Error):
    """A server asked to stay on loopback has a process listening elsewhere."""


def _refuse_off_loopback(host: str) -> None:
    """Raise (the server then stops Ray and exits non-zero) if any process of this server's tree
    listens off loopback while `--host` is a loopback address."""
    found = listening_off_loopback(os.getpid())
    if found:
        sockets = ", ".join(f"{name} (pid {pid}) on {ip}:{port}" for pid, name, ip, port in found)
        raise OffLoopbackError(f"--host {host} is loopback, but these listen off loopback: {sockets}; refusing to run")


def _local_cpus(config: ServeConfig) -> int:
    """CPUs the local Ray instance offers: the machine's, or enough for the replicas asked for."""
    replicas = config.max_replicas if config.max_replicas is not None else config.num_replicas
    return max(os.cpu_count() or 1, int(replicas * config.num_cpus + 0.999))
