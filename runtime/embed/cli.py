"""`m3rt embed ARTIFACT INPUT... OUTPUT`: the options of the verb and its exit status."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from m3rt.errors import InputError

EXIT_ROWS_IN_ERRORS = 3
EXIT_VERIFY_FAILED = 4


def add_embed_parser(sub: Any) -> None:
    """The `embed` verb of `m3rt` (`sub`: the subparsers object of `argparse.ArgumentParser.add_subparsers`)."""
    emb = sub.add_parser(
        "embed",
        help="embed a corpus into Parquet shards, resumable, here or on a Ray cluster (m3rt[embed])",
        description="Exit status: 0 every row embedded; 3 finished, some rows in OUTPUT/_errors.jsonl; "
        "4 --verify found a mismatch; 1 an error (rerun the same command to resume).",
    )
    emb.add_argument("artifact", type=Path)
    emb.add_argument("inputs", nargs="+", metavar="INPUT", help="JSON lines, Parquet or text files, folders or globs")
    emb.add_argument(
        "output", type=Path, metavar="OUTPUT", help="folder of Parquet shards (created; resumed if it exists)"
    )
    emb.add_argument("--format", choices=["jsonl", "parquet", "text"], help="input format (default: by file suffix)")
    emb.add_argument("--text-field", default="text", help="JSON field / Parquet column of the text (default text)")
    emb.add_argument("--id-field", help="JSON field / Parquet column of the id (default: the line number)")
    emb.add_argument(
        "--outputs", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse", "colbert"],
        help="what to write (default dense sparse)",
    )  # fmt: skip
    emb.add_argument("--dense-dtype", default="float32", choices=["float32", "float16"])
    emb.add_argument("--max-length", type=int, help="tokens per text, specials included (default: the model's)")
    emb.add_argument("--no-truncate", action="store_true", help="longer texts go to the errors file, not truncated")
    emb.add_argument("--backend", default="onnxruntime", help="onnxruntime, tensorrt or auto")
    emb.add_argument("--precision", default="fp32", help="fp32, fp16 or int8")
    emb.add_argument("--device", help="cpu (default) or cuda / cuda:N")
    emb.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads per model")
    emb.add_argument("--token-budget", type=int, default=16384, help="padded tokens per batch (default 16384)")
    emb.add_argument(
        "--shard-rows", type=int, help="input rows per shard (default 10000; 1000 with colbert, whose vectors are big)"
    )
    emb.add_argument("--address", help="run on this Ray cluster (auto, ray://head:10001); default: here, no Ray")
    emb.add_argument("--node-ip-address", help="this driver's Ray node address (e.g. 127.0.0.1)")
    emb.add_argument("--actors", type=int, help="model actors on the cluster (default: as many as fit)")
    emb.add_argument("--num-cpus", type=float, default=1, help="CPUs per actor (default 1)")
    emb.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor (default 0)")
    emb.add_argument("--verify", type=int, default=0, metavar="N", help="re-encode N random output rows and compare")
    emb.add_argument("--no-progress", action="store_true", help="no progress bar")
    emb.add_argument("--summary-json", type=Path, help="also write the summary to this file as JSON")
    emb.add_argument("--no-verify-artifact", action="store_true", help="skip the sha256 check of the artifact")
    emb.set_defaults(func=embed)


def embed(args: argparse.Namespace) -> int:
    try:
        from m3rt.embed.runner import ClusterOptions, run_embed
        from m3rt.embed.worker import EmbedSettings
    except ImportError as exc:
        raise InputError(f"m3rt embed needs pyarrow: pip install 'm3rt[embed]' ({exc})") from None
    if args.address is None and (args.actors is not None or args.num_gpus):
        raise InputError("--actors and --num-gpus apply to a Ray cluster: add --address")
    for name in ("threads", "token_budget", "shard_rows", "actors", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.num_cpus < 0 or args.num_gpus < 0 or args.verify < 0:
        raise InputError("--num-cpus, --num-gpus and --verify must not be negative")
    settings = EmbedSettings(
        artifact=str(args.artifact.resolve()),
        outputs=tuple(args.outputs),
        dense_dtype=args.dense_dtype,
        max_length=args.max_length,
        truncate=not args.no_truncate,
        text_field=args.text_field,
        id_field=args.id_field,
        backend=args.backend,
        precision=args.precision,
        device=args.device,
        threads=args.threads,
        token_budget=args.token_budget,
        verify_artifact=not args.no_verify_artifact,
        rows_per_unit=args.shard_rows or (1000 if "colbert" in args.outputs else 10_000),
    )
    cluster = None
    if args.address is not None:
        cluster = ClusterOptions(args.address, args.node_ip_address, args.actors, args.num_cpus, args.num_gpus)
    summary = run_embed(
        settings,
        args.inputs,
        args.output,
        input_format=args.format,
        cluster=cluster,
        progress=not args.no_progress,
        verify_rows=args.verify,
    )
    for line in summary.lines():
        print(line, file=sys.stderr)
    if summary.verification is not None:
        print(summary.verification.line(), file=sys.stderr)
        for mismatch in summary.verification.mismatches[:20]:
            print(f"  {mismatch}", file=sys.stderr)
    if args.summary_json is not None:
        args.summary_json.write_text(json.dumps(summary.as_dict(), indent=2))
    if summary.verification is not None and not summary.verification.ok:
        return EXIT_VERIFY_FAILED
    return EXIT_ROWS_IN_ERRORS if summary.total_errors else 0
