"""Resolve a BGE-M3 checkpoint (local dir, hub id, or `synthetic:SIZE`) and load the reference."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m3rt.errors import ExportError
from m3rt.export.reference import M3Reference
from m3rt.manifest import file_record

HEAD_FILES = ("colbert_linear.pt", "sparse_linear.pt")
WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
HUB_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin", "*.pt", "sentencepiece.bpe.model"]


class CheckpointError(ExportError):
    """The checkpoint cannot be used (missing files, not found offline, ...)."""


@dataclass
class Checkpoint:
    path: Path
    source: dict[str, Any] = field(default_factory=dict)


def resolve_checkpoint(spec: str, workdir: Path, tokenizer: str | None = None, seed: int = 0) -> Checkpoint:
    """`synthetic:tiny|small|full` is generated into `workdir`; an existing dir is used; else a hub id."""
    if spec.startswith("synthetic:"):
        from m3rt.export.synthetic import write_synthetic_checkpoint

        size = spec.split(":", 1)[1]
        path = write_synthetic_checkpoint(workdir / f"synthetic-{size}", size=size, seed=seed, tokenizer=tokenizer)
        origin = (path / "TOKENIZER_SOURCE").read_text(encoding="utf-8").strip()
        source = {"model": spec, "kind": "synthetic", "seed": seed, "tokenizer": origin}
    elif Path(spec).exists():
        path = Path(spec)
        source = {"model": str(path.resolve()), "kind": "local"}
    else:
        path, revision = _from_hub(spec)
        source = {"model": spec, "kind": "hub", "revision": revision}
    check_layout(path)
    source["files"] = {
        p.name: file_record(p) for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")
    }
    return Checkpoint(path=path, source=source)


def _from_hub(repo_id: str) -> tuple[Path, str | None]:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - part of the export extra
        raise CheckpointError("hub ids need huggingface_hub: pip install 'm3rt[export]'") from exc
    last_error: Exception | None = None
    for local_only in (False, True):
        try:
            path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=local_only))
            return path, path.name  # snapshot folders are named by commit hash
        except Exception as exc:  # network errors, offline mode, missing cache all land here
            last_error = exc
    raise CheckpointError(
        f"{repo_id!r} is neither a local directory nor a hub id available offline "
        f"(not in the Hugging Face cache): {last_error}"
    )


def check_layout(path: Path) -> None:
    """BAAI/bge-m3's layout; missing heads are an error (FlagEmbedding would randomise them)."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append("encoder weights (model.safetensors or pytorch_model.bin)")
    missing += [name for name in HEAD_FILES if not (path / name).is_file()]
    if not (path / "tokenizer.json").is_file() and not (path / "sentencepiece.bpe.model").is_file():
        missing.append("tokenizer.json")
    if missing:
        raise CheckpointError(
            f"{path} is not a complete BGE-M3 checkpoint; missing: {', '.join(missing)}. "
            "The ColBERT and sparse heads must be present: without them the outputs would be random."
        )
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") not in ("xlm-roberta", "roberta"):
        raise CheckpointError(f"{path}/config.json has model_type {config.get('model_type')!r}, not xlm-roberta")


def ensure_tokenizer_json(path: Path, target: Path) -> None:
    """Copy the fast tokenizer file, converting a SentencePiece-only checkpoint if needed."""
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, use_fast=True).backend_tokenizer
    tok.no_truncation()
    tok.no_padding()
    tok.save(str(target))


def _load_head(path: Path, hidden: int, out_features: int | None) -> nn.Linear:
    state = torch.load(path, map_location="cpu", weights_only=True)
    weight = state["weight"]
    linear = nn.Linear(hidden, out_features or weight.shape[0])
    linear.load_state_dict({k: v.float() for k, v in state.items()})
    return linear


def load_reference(path: Path, attn_implementation: str = "eager") -> M3Reference:
    """Encoder in fp32; eager attention by default, the form the exporter traces and fuses."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(path, attn_implementation=attn_implementation).float().eval()
    encoder.pooler = None  # unused by BGE-M3; keeps it out of the graph
    hidden = encoder.config.hidden_size
    colbert = _load_head(path / "colbert_linear.pt", hidden, None)
    sparse = _load_head(path / "sparse_linear.pt", hidden, 1)
    return M3Reference(encoder, colbert, sparse).eval()
