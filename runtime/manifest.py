"""The artifact format: `m3rt.json` and the files it lists.

The exporter writes it and the runtime reads it, so its names live here once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3rt.errors import ArtifactError
from m3rt.heads import HEAD_OUTPUTS, HEADS

MANIFEST_NAME = "m3rt.json"
FORMAT = "m3rt-artifact"
FORMAT_VERSION = 1

INPUT_NAMES = ("input_ids", "attention_mask")
# The graph outputs every graph has: one per registered head (`m3rt.heads`).
OUTPUT_NAMES = HEAD_OUTPUTS

_HASH_CHUNK = 16 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def graph_record(
    files: list[Path],
    precision: str,
    opset: int,
    hidden: int,
    colbert_dim: int,
    outputs_dtype: str = "float32",
    **extra: Any,
) -> dict[str, Any]:
    """A `graphs` entry as the exporter writes it (`GraphInfo` reads it back)."""
    return {
        "file": files[0].name,
        "files": [p.name for p in files],
        "precision": precision,
        "opset": opset,
        "inputs": {n: {"dtype": "int64", "shape": ["batch", "sequence"]} for n in INPUT_NAMES},
        "outputs": {h.output: {"dtype": outputs_dtype, "shape": h.shape(hidden, colbert_dim)} for h in HEADS},
        **extra,
    }


def engine_record(
    plan: Path, built_from: str, tensorrt_version: str, device: dict[str, str], profiles: list[dict], **extra: Any
) -> dict[str, Any]:
    """An `engines` entry as the exporter writes it (`EngineInfo` reads it back)."""
    return {
        "file": plan.name,
        "built_from": built_from,
        "tensorrt_version": tensorrt_version,
        **device,
        "profiles": profiles,
        **extra,
    }


@dataclass(frozen=True)
class ModelInfo:
    """The `model` section: the encoder's shape and limits."""

    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    max_length: int

    @classmethod
    def parse(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(**{f: int(data[f]) for f in ("hidden_size", "num_hidden_layers", "vocab_size", "max_length")})


@dataclass(frozen=True)
class GraphInfo:
    """One `graphs` entry: an ONNX graph of the artifact, what serves it and how it was checked."""

    name: str
    file: str
    files: tuple[str, ...]
    precision: str
    backends: tuple[str, ...] = ()
    # Set on graphs that only this ONNX Runtime provider runs (the CUDA-fused graph).
    execution_provider: str | None = None
    # "int8" or "uint8" for the ONNX Runtime CPU int8 graphs.
    weight_type: str | None = None
    # Against the PyTorch reference (fp32 graphs) and against the fp32 graph (variants).
    validation: dict[str, Any] | None = None
    fidelity: dict[str, Any] | None = None
    # The whole entry, for what only one kind of graph records (the fused graph's optimizer
    # settings, the Q/DQ graph's calibration, the fp16 graph's kept-fp32 operators, ...).
    details: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def parse(cls, name: str, data: dict[str, Any]) -> GraphInfo:
        return cls(
            name=name,
            file=data["file"],
            files=tuple(data.get("files", [data["file"]])),
            precision=data.get("precision", name.split("-")[0]),
            backends=tuple(data.get("backends", ())),
            execution_provider=data.get("execution_provider"),
            weight_type=data.get("weight_type"),
            validation=data.get("validation"),
            fidelity=data.get("fidelity"),
            details=dict(data),
        )

    @property
    def measured_on(self) -> dict[str, Any] | None:
        """Where and in what arithmetic the fidelity figures were measured (None: not recorded)."""
        measured = (self.fidelity or {}).get("measured_on")
        if isinstance(measured, str):  # older artifacts recorded a sentence
            return {"arithmetic": measured}
        return measured

    @property
    def flash_attention(self) -> bool:
        """Whether the graph never holds a layer's attention scores whole (ONNX Runtime's flash path)."""
        return self.details.get("attention") == "flash" or self.name.endswith("-flash")

    @property
    def gate(self) -> dict[str, float] | None:
        return (self.fidelity or {}).get("gate")


@dataclass(frozen=True)
class EngineInfo:
    """One `engines` entry: a TensorRT plan and what it was built for."""

    name: str
    file: str
    built_from: str
    tensorrt_version: str
    gpu: str
    compute_capability: str
    profiles: tuple[dict[str, Any], ...]

    @classmethod
    def parse(cls, name: str, data: dict[str, Any]) -> EngineInfo:
        return cls(
            name=name,
            file=data["file"],
            built_from=data.get("built_from", ""),
            tensorrt_version=str(data["tensorrt_version"]),
            gpu=str(data["gpu"]),
            compute_capability=str(data["compute_capability"]),
            profiles=tuple(data["profiles"]),
        )


@dataclass(frozen=True)
class Manifest:
    """A parsed, verified `m3rt.json`. `data` is the JSON as written; read it through the typed
    accessors (`model`, `graph`, `engine`, ...), which are the schema."""

    root: Path
    data: dict[str, Any]

    @property
    def model(self) -> ModelInfo:
        return ModelInfo.parse(self.data["model"])

    @property
    def max_length(self) -> int:
        return self.model.max_length

    @property
    def hidden_size(self) -> int:
        return self.model.hidden_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.data["special_tokens"].items()}

    @property
    def graph_names(self) -> tuple[str, ...]:
        return tuple(self.data["graphs"])

    def has_graph(self, name: str) -> bool:
        return name in self.data["graphs"]

    def graph(self, name: str) -> GraphInfo:
        if name not in self.data["graphs"]:
            raise ArtifactError(f"{self.root} has no {name!r} graph; it has: {', '.join(sorted(self.graph_names))}")
        return GraphInfo.parse(name, self.data["graphs"][name])

    def graph_path(self, name: str) -> Path:
        return self.root / self.graph(name).file

    @property
    def engine_names(self) -> tuple[str, ...]:
        return tuple(self.data.get("engines", {}))

    def engine(self, name: str) -> EngineInfo:
        return EngineInfo.parse(name, self.data.get("engines", {})[name])

    @property
    def source(self) -> dict[str, Any]:
        return self.data.get("source", {})

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """Every artifact file: {name: {"sha256", "size"}}."""
        return self.data["files"]

    @property
    def timings(self) -> dict[str, float]:
        return self.data.get("timings", {})

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
