"""`m3rt serve ARTIFACT`: the options of the verb, and the server it runs (Ray is imported only then)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from m3rt.errors import InputError


def add_serve_parser(sub: Any) -> None:
    """The `serve` verb of `m3rt`."""
    srv = sub.add_parser("serve", help="serve dense, sparse and ColBERT over HTTP on Ray Serve (m3rt[serve])")
    srv.add_argument("artifact", type=Path)
    srv.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--address", help="an existing Ray cluster (e.g. auto, ray://head:10001); default: a local one")
    srv.add_argument("--node-ip-address", help="this node's Ray address (default 127.0.0.1 for a local Ray)")
    srv.add_argument("--proxy-location", default="HeadOnly", choices=["HeadOnly", "EveryNode", "Disabled"])
    srv.add_argument("--model-name", default="bge-m3", help="the `model` clients ask for")
    srv.add_argument("--backend", default="onnxruntime", help="onnxruntime, tensorrt or auto")
    srv.add_argument("--precision", default="fp32", help="fp32, fp16 or int8")
    srv.add_argument("--device", help="cpu (default) or cuda / cuda:N")
    srv.add_argument("--replicas", type=int, default=1, help="fixed number of replicas")
    srv.add_argument("--min-replicas", type=int, help="autoscale from (with --max-replicas)")
    srv.add_argument("--max-replicas", type=int, help="autoscale up to (with --min-replicas)")
    srv.add_argument("--num-cpus", type=float, default=1, help="CPUs reserved per replica")
    srv.add_argument("--num-gpus", type=float, default=0, help="GPUs reserved per replica")
    srv.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads per replica")
    srv.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens per batched encode")
    srv.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    srv.add_argument("--max-ongoing", type=int, default=64, help="requests in progress per replica")
    srv.add_argument("--max-queued", type=int, default=512, help="requests queued before 503 (-1: unbounded)")
    srv.add_argument(
        "--max-request-tokens", type=int, default=262144, help="tokens per request after truncation, else 413"
    )
    srv.add_argument("--max-colbert-values", type=int, default=1 << 24, help="ColBERT floats per response, else 413")
    srv.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request, else 504")
    srv.add_argument(
        "--api-key",
        default=os.environ.get("M3RT_API_KEY"),
        help="require Authorization: Bearer KEY on every route but /health and /ready "
        "(default: $M3RT_API_KEY; prefer it, a command line is visible to every user of the machine)",
    )
    srv.add_argument(
        "--cors-origin", action="append", default=[], help="a browser origin allowed to call the API (repeatable)"
    )
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests in progress")
    srv.add_argument("--no-access-log", action="store_true", help="no log line per request")
    srv.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact")
    srv.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    try:
        from m3rt.serve.deployment import ServeConfig, run_server
    except ImportError as exc:
        raise InputError(f"m3rt serve needs Ray Serve: pip install 'm3rt[serve]' ({exc})") from None
    from pydantic import ValidationError

    try:
        config = ServeConfig(
            artifact=str(args.artifact.resolve()),
            model_name=args.model_name,
            backend=args.backend,
            precision=args.precision,
            device=args.device,
            verify=not args.no_verify,
            intra_op_threads=args.threads,
            max_batch_tokens=args.max_batch_tokens,
            batch_wait_timeout_s=args.batch_wait_ms / 1000,
            num_replicas=args.replicas,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            max_ongoing_requests=args.max_ongoing,
            max_queued_requests=args.max_queued,
            access_log=not args.no_access_log,
            max_request_tokens=args.max_request_tokens,
            max_colbert_values=args.max_colbert_values,
            request_timeout_s=args.request_timeout,
            api_key=args.api_key or None,
            cors_origins=args.cors_origin,
        )
        config.deployment_options()
    except (ValidationError, ValueError) as exc:
        raise InputError(f"serve options: {exc}") from None
    from m3rt.manifest import load_manifest

    load_manifest(args.artifact, verify=False)  # not an artifact: fail here, not in every replica
    run_server(
        config,
        address=args.address,
        host=args.host,
        port=args.port,
        proxy_location=args.proxy_location,
        node_ip_address=args.node_ip_address,
        drain_timeout_s=args.drain_timeout,
    )
    return 0
