"""`precision="auto"` on the CPU: the fastest form of an artifact whose accuracy gate holds on this CPU.

The candidates are OpenVINO bf16 (the fp32 graph at bf16 inference precision), ONNX Runtime int8 (the
graph this CPU's int8 kernels serve) and fp32 (always kept: the reference). Each candidate is built as
`M3Model.load` would build it, so the same gates apply: an int8 graph measured in other arithmetic is
validated here first, bf16 is validated here unless its gate was measured on this CPU, and a form that
misses its gate, cannot run here or is not in the artifact is left out with the reason.

The survivors are timed on the same held-out texts (one warm-up pass, then the best of two), and the
choice is cached per CPU model and artifact (`M3RT_CACHE_DIR`, else `$XDG_CACHE_HOME/m3rt`, else
`~/.cache/m3rt`), so a process pays for the measurement once per CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from m3rt.errors import ArtifactError, M3Error
from m3rt.int8_kernel import cpu_model
from m3rt.manifest import Manifest

# In order of preference at equal speed.
CANDIDATES: tuple[tuple[str, str], ...] = (("openvino", "bf16"), ("onnxruntime", "int8"), ("onnxruntime", "fp32"))
# Texts timed per candidate: enough for a stable ratio, short at full size (~1k tokens).
TIMED_TEXTS = 24
CACHE_FILE = "auto-precision.json"


@dataclass(frozen=True)
class AutoChoice:
    """What `precision="auto"` picked here and why: tokens/s of each measured form, reasons of the rest."""

    engine: str
    precision: str
    cpu: str
    tokens_per_s: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    cached: bool = False

    def describe(self) -> str:
        speeds = ", ".join(f"{k} {v:.0f}" for k, v in self.tokens_per_s.items())
        left_out = "; ".join(f"{k}: {v}" for k, v in self.excluded.items())
        return (
            f"precision='auto' on {self.cpu}: {self.engine} {self.precision} ({'cached ' if self.cached else ''}"
            f"tokens/s: {speeds}{'; left out: ' + left_out if left_out else ''})"
        )


def cache_dir() -> Path:
    explicit = os.environ.get("M3RT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "m3rt"


def cache_key(manifest: Manifest) -> str:
    """This CPU and this artifact's files (their recorded sha256s, so nothing is re-read)."""
    files = json.dumps(manifest.files, sort_keys=True).encode()
    return f"{cpu_model()}|{hashlib.sha256(files).hexdigest()[:16]}"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or damaged: measured again and rewritten
    return data if isinstance(data, dict) else {}


def cached_choice(manifest: Manifest) -> AutoChoice | None:
    entry = _read_cache(cache_dir() / CACHE_FILE).get(cache_key(manifest))
    try:
        return AutoChoice(**{**entry, "cached": True}) if isinstance(entry, dict) else None
    except TypeError:
        return None


def _write_cache(manifest: Manifest, choice: AutoChoice) -> None:
    folder = cache_dir()
    path = folder / CACHE_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[cache_key(manifest)] = {k: v for k, v in asdict(choice).items() if k != "cached"}
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".auto-", suffix=".json")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2)
        os.replace(temporary, path)
    except OSError as exc:  # an unwritable cache costs a measurement next time, nothing else
        warnings.warn(f"m3rt: cannot cache the precision='auto' choice in {folder}: {exc}", stacklevel=3)


def _build(manifest: Manifest, engine: str, precision: str) -> Any:
    """The candidate's backend as `M3Model.load` builds it, gates included; M3Error when it is out."""
    from m3rt.placement import ENGINES, Device, create_backend, resolve
    from m3rt.validation import check_int8_on_this_cpu, gate_of

    reason = ENGINES[engine].unavailable(Device("cpu", 0)) if engine in ENGINES else f"no {engine} engine"
    if reason:
        raise M3Error(reason)
    placement = resolve(manifest, precision, "cpu", backend=engine)
    graph = placement.graph
    if precision == "int8":
        if graph.fidelity and not graph.fidelity.get("passed", True):
            failures = "; ".join(gate_of(graph).failures(graph.fidelity))
            raise M3Error(f"{graph.file} was kept below its gate at export ({failures})")
        if placement.int8_check:
            check_int8_on_this_cpu(manifest, graph.name, placement.int8_kernel)
    backend = create_backend(manifest, placement)
    if engine == "openvino" and precision == "bf16":
        from m3rt.bf16_gate import check_bf16_on_this_cpu

        check_bf16_on_this_cpu(manifest, backend)
    return backend


def tokens_per_second(manifest: Manifest, backend: Any) -> float:
    """Model throughput of `backend` on the first held-out texts (all three outputs), best of two."""
    from m3rt.tokenizer import M3Tokenizer
    from m3rt.validation import encode_texts, heldout_texts

    tokenizer = M3Tokenizer(manifest.tokenizer_path)
    texts = heldout_texts()[:TIMED_TEXTS]
    tokens = sum(len(ids) for ids in tokenizer.encode(texts, max_length=512, truncate=True).ids)
    encode_texts(manifest, backend, tokenizer, texts[:4])  # warm-up (first-run allocations, JIT)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        encode_texts(manifest, backend, tokenizer, texts)
        best = min(best, time.perf_counter() - start)
    return tokens / best


def measure_choice(manifest: Manifest, timer: Callable[[Manifest, Any], float] = tokens_per_second) -> AutoChoice:
    speeds: dict[str, float] = {}
    excluded: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the validations' announcements; their outcomes are recorded
        for engine, precision in CANDIDATES:
            name = f"{engine} {precision}"
            try:
                backend = _build(manifest, engine, precision)
            except M3Error as exc:
                excluded[name] = str(exc)
                continue
            try:
                speeds[name] = float(timer(manifest, backend))
            finally:
                close = getattr(backend, "close", None)
                if close is not None:
                    close()
    if not speeds:
        raise ArtifactError(f"precision='auto': no form of {manifest.root} runs here ({excluded})")
    order = {f"{e} {p}": i for i, (e, p) in enumerate(CANDIDATES)}
    best = max(speeds, key=lambda name: (speeds[name], -order[name]))
    engine, precision = best.split(" ")
    return AutoChoice(engine, precision, cpu_model(), speeds, excluded)


def choose(manifest: Manifest) -> AutoChoice:
    """This CPU's choice for `manifest`: from the cache, else measured now and cached."""
    from m3rt.placement import ENGINES, Device

    choice = cached_choice(manifest)
    if choice is not None and choice.engine in ENGINES and not ENGINES[choice.engine].unavailable(Device("cpu", 0)):
        return choice
    choice = measure_choice(manifest)
    _write_cache(manifest, choice)
    return choice


def resolve_auto(manifest: Manifest, device: str | None = None, backend: str = "auto") -> Any:
    """The placement of `precision="auto"`: the CPU's fastest form within its gates (`choose`), with
    `placement.auto` saying what was measured."""
    from dataclasses import replace

    from m3rt.placement import parse_device, resolve

    requested = parse_device(device) if device is not None else None
    if requested is not None and requested.kind != "cpu":
        raise ArtifactError(f"precision='auto' chooses among the CPU's forms; on {requested} pass 'fp32' or 'fp16'")
    if backend not in ("auto", "onnxruntime"):
        raise ArtifactError(f"precision='auto' chooses the engine too; pass backend='auto', not {backend!r}")
    choice = choose(manifest)
    return replace(resolve(manifest, choice.precision, "cpu", backend=choice.engine), auto=choice)
