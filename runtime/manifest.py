"""The artifact format: `m3rt.json` and the files it lists.

The exporter writes it and the runtime reads it, so its names live here once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3rt.errors import ArtifactError

MANIFEST_NAME = "m3rt.json"
FORMAT = "m3rt-artifact"
FORMAT_VERSION = 1

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("dense_vecs", "sparse_weights", "colbert_vecs")

_HASH_CHUNK = 16 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


@dataclass(frozen=True)
class Manifest:
    """A parsed, verified `m3rt.json`."""

    root: Path
    data: dict[str, Any]

    @property
    def max_length(self) -> int:
        return int(self.data["model"]["max_length"])

    @property
    def hidden_size(self) -> int:
        return int(self.data["model"]["hidden_size"])

    @property
    def special_tokens(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.data["special_tokens"].items()}

    @property
    def graphs(self) -> dict[str, dict[str, Any]]:
        return self.data["graphs"]

    @property
    def engines(self) -> dict[str, dict[str, Any]]:
        return self.data.get("engines", {})

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.data["tokenizer"]["file"]


def load_manifest(root: str | Path, verify: bool = True) -> Manifest:
    """Read `root/m3rt.json`; with `verify`, check every listed file's size and sha256.

    Verification reads every byte (about a second per GB); a truncated or altered model file is
    caught here with its name instead of deep inside ONNX Runtime.
    """
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a directory (expected an m3rt artifact made by m3-export)")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{root} is not an m3rt artifact: {MANIFEST_NAME} is missing (create one with m3-export)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an m3rt manifest (format field is not {FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {data.get('format_version')!r}; this m3rt reads {FORMAT_VERSION}. "
            "Re-export the model with this m3rt version."
        )
    for key in ("files", "graphs", "model", "special_tokens", "tokenizer"):
        if key not in data:
            raise ArtifactError(f"{path} lacks the {key!r} section")
    if verify:
        verify_files(root, data["files"])
    return Manifest(root=root, data=data)


def verify_files(root: Path, files: dict[str, dict[str, Any]]) -> None:
    for name, record in files.items():
        path = root / name
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in {MANIFEST_NAME} but missing")
        size = path.stat().st_size
        if size != record["size"]:
            raise ArtifactError(
                f"{path} is {size} bytes but {MANIFEST_NAME} records {record['size']}: "
                "the file is truncated or was replaced; re-export or copy it again"
            )
        if sha256_file(path) != record["sha256"]:
            raise ArtifactError(
                f"{path} does not match the sha256 in {MANIFEST_NAME}: the file is corrupted or was replaced"
            )
