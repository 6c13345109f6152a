"""What `m3-bench` times: m3rt on each backend/precision present, and the PyTorch reference.

A runner encodes texts end to end (text in, FlagEmbedding-format outputs out) and runs one padded
batch model-only; the reference runs the way FlagEmbedding runs BGE-M3 (fp16 + SDPA on a GPU,
fp32 on a CPU), through FlagEmbedding itself when it is importable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from m3rt.core import Capabilities
from m3rt.manifest import OUTPUT_NAMES
from m3rt.model import M3Model
from m3rt.scheduler import plan_batches

ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)


@dataclass
class Runner:
    name: str
    device: str  # "cpu" or "cuda"
    precision: str
    encode: Callable[[list[str], int], dict[str, Any]]
    forward: Callable[[np.ndarray, np.ndarray], Any]
    padded_tokens: Callable[[np.ndarray], int]
    is_reference: bool = False
    device_peak_bytes: Callable[[], int | None] = lambda: None


def _sorted_chunks_padding(lengths: np.ndarray, batch_size: int) -> int:
    """FlagEmbedding: sort by length, fixed chunks of batch_size, each padded to its longest."""
    ordered = np.sort(lengths)[::-1]
    return int(sum(len(c) * c[0] for c in (ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size))))


def m3rt_runners(
    artifact: Path, batch_size: int, token_budget: int
) -> tuple[list[tuple[str, Callable[[], Runner]]], list[str]]:
    """(name, build) per (backend, precision) usable here, built lazily so that each runner's
    memory is measured alone; notes say what was skipped and why."""
    from m3rt.manifest import load_manifest
    from m3rt.placement import ENGINES, Device

    manifest = load_manifest(artifact, verify=False)
    notes = []
    # precision="int8" serves model.int8.onnx or its uint8 twin, whichever this CPU computes exactly
    cpu_graphs = set(manifest.graph_names) | ({"int8"} if manifest.has_graph("int8-u8") else set())
    combos = [("onnxruntime", p, "cpu") for p in ("fp32", "int8") if p in cpu_graphs]
    openvino_missing = ENGINES["openvino"].unavailable(Device("cpu", 0))
    if openvino_missing is None:
        from m3rt.backends.openvino import bf16_unsupported_reason

        combos.append(("openvino", "fp32", "cpu"))
        bf16_missing = bf16_unsupported_reason()
        combos += [("openvino", "bf16", "cpu")] if bf16_missing is None else []
        notes += [f"OpenVINO bf16: skipped ({bf16_missing})"] if bf16_missing else []
    else:
        notes.append(f"OpenVINO: skipped ({openvino_missing})")
    if ENGINES["onnxruntime"].unavailable(Device("cuda", 0)) is None:
        # fp16 on CUDA runs the fused graph when the artifact has one (m3rt.placement.select_graph).
        graphs = set(manifest.graph_names) | ({"fp16"} if manifest.has_graph("fp16-fused") else set())
        combos += [("onnxruntime", p, "cuda") for p in ("fp32", "fp16") if p in graphs]
    else:
        notes.append("ONNX Runtime CUDA: skipped (no onnxruntime-gpu with a visible GPU)")
    if not manifest.engine_names:
        notes.append("TensorRT: skipped (the artifact has no engines)")
    elif ENGINES["tensorrt"].unavailable(Device("cuda", 0)) is None:
        combos += [("tensorrt", p, "cuda") for p in manifest.engine_names]
    else:
        notes.append("TensorRT: skipped (engines present but TensorRT or a GPU is not)")

    def build(backend: str, precision: str, device: str) -> Runner:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else None
        model = M3Model.load(
            artifact, backend=backend, precision=precision, verify=False, providers=providers, token_budget=token_budget
        )

        def padded_tokens(lengths: np.ndarray) -> int:
            return int(sum(len(b) * lengths[b].max() for b in plan_batches(lengths, batch_size, model.token_budget)))

        return Runner(
            name=f"m3rt {backend} {device} {precision}",
            device=device,
            precision=precision,
            encode=lambda texts, max_length: model.encode(texts, batch_size=batch_size, max_length=max_length, **ALL),
            forward=lambda ids, mask: model.backend.run(ids, mask, OUTPUT_NAMES),
            padded_tokens=padded_tokens,
        )

    named = [(f"m3rt {b} {d} {p}", partial(build, b, p, d)) for b, p, d in combos]
    return named, notes


def reference_unavailable(checkpoint: Path | None) -> str | None:
    """Why the reference column cannot run here, or None. It is skipped, never invented."""
    if checkpoint is None or not Path(checkpoint).is_dir():
        return f"PyTorch reference: skipped (source checkpoint {checkpoint} not available; pass --checkpoint DIR)"
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"PyTorch reference: skipped (torch/transformers not importable: {exc}; pip install 'm3rt[export]')"
    return None


class TorchBackend:
    """The PyTorch model behind m3rt's backend interface, for when FlagEmbedding is not installed:
    fp16 + SDPA on a GPU, fp32 on a CPU, as FlagEmbedding would run it (`fp16=False` on a GPU: the
    fp32 reference that accuracy is measured against)."""

    name = "pytorch"
    capabilities = Capabilities(thread_safe=False)

    def __init__(self, checkpoint: Path, device: str, fp16: bool | None = None) -> None:
        import torch

        from m3rt.export.checkpoint import load_reference

        self._torch, self._device = torch, device
        self.fp16 = device.startswith("cuda") if fp16 is None else fp16
        module = load_reference(Path(checkpoint), attn_implementation="sdpa")
        self._module = (module.half() if self.fp16 else module).to(device).eval()

    def close(self) -> None:
        """Release the model's weights (GBs on the GPU) now rather than at garbage collection."""
        self._module = None
        if self._device.startswith("cuda"):
            self._torch.cuda.empty_cache()

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            values = self._module(
                torch.from_numpy(input_ids).to(self._device), torch.from_numpy(attention_mask).to(self._device)
            )
            named = dict(zip(OUTPUT_NAMES, values))
            # One copy per output, as FlagEmbedding's .cpu() calls (which also synchronize the device).
            return {name: named[name].float().cpu().numpy() for name in outputs}


def _pytorch_in_m3rt_pipeline(checkpoint: Path, artifact: Path, batch_size: int, device: str) -> Runner:
    import torch

    from m3rt.manifest import load_manifest
    from m3rt.tokenizer import M3Tokenizer

    manifest = load_manifest(artifact, verify=False)
    model = M3Model(manifest, TorchBackend(checkpoint, device), M3Tokenizer(manifest.tokenizer_path))
    fp16 = device == "cuda"
    return Runner(
        name=f"PyTorch (m3rt pipeline) {device} {'fp16' if fp16 else 'fp32'}",
        device=device,
        precision="fp16" if fp16 else "fp32",
        encode=lambda texts, max_length: model.encode(texts, batch_size=batch_size, max_length=max_length, **ALL),
        forward=lambda ids, mask: model.backend.run(ids, mask, OUTPUT_NAMES),
        padded_tokens=lambda lengths: int(
            sum(len(b) * lengths[b].max() for b in plan_batches(lengths, batch_size, model.token_budget))
        ),
        is_reference=True,
        device_peak_bytes=(lambda: int(torch.cuda.max_memory_allocated())) if fp16 else (lambda: None),
    )


def reference_runner(checkpoint: Path, artifact: Path, batch_size: int, device: str) -> Runner:
    """FlagEmbedding's BGEM3FlagModel on the source checkpoint; without FlagEmbedding, the same
    PyTorch model in m3rt's pipeline (tokeniser, scheduler and post-processing)."""
    import torch

    try:
        from FlagEmbedding import BGEM3FlagModel
    except ImportError:
        return _pytorch_in_m3rt_pipeline(checkpoint, artifact, batch_size, device)

    fp16 = device == "cuda"
    model = BGEM3FlagModel(str(checkpoint), use_fp16=fp16, devices=device)

    def forward(ids: np.ndarray, mask: np.ndarray) -> Any:
        inputs = {"input_ids": torch.from_numpy(ids).to(device), "attention_mask": torch.from_numpy(mask).to(device)}
        with torch.no_grad():
            out = model.model(inputs, return_dense=True, return_sparse=True, return_colbert_vecs=True)
        if fp16:
            torch.cuda.synchronize()
        return out

    def encode(texts: list[str], max_length: int) -> dict[str, Any]:
        return model.encode(texts, batch_size=batch_size, max_length=max_length, **ALL)

    peak = (lambda: int(torch.cuda.max_memory_allocated())) if fp16 else (lambda: None)
    return Runner(
        name=f"FlagEmbedding PyTorch {device} {'fp16' if fp16 else 'fp32'}",
        device=device,
        precision="fp16" if fp16 else "fp32",
        encode=encode,
        forward=forward,
        padded_tokens=lambda lengths: _sorted_chunks_padding(lengths, batch_size),
        is_reference=True,
        device_peak_bytes=peak,
    )
