"""Export-time validation: the ONNX graph against the PyTorch reference on padded batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from m3rt.backends.onnxruntime import OnnxRuntimeBackend
from m3rt.errors import ExportError
from m3rt.export.reference import M3Reference
from m3rt.fidelity import REFERENCE_GATE, Gate, HeadStats
from m3rt.manifest import OUTPUT_NAMES
from m3rt.scheduler import pad_batch
from m3rt.tokenizer import M3Tokenizer


class ValidationError(ExportError):
    """The exported graph deviates from the reference beyond its gate."""


def compare_with_reference(
    reference: M3Reference,
    graph_path: Path,
    tokenizer_path: Path,
    texts: list[str],
    pad_id: int,
    max_length: int = 512,
    batch_size: int = 4,
) -> dict[str, object]:
    """Per-head max abs difference and min cosine over real (unpadded) positions.

    Texts run in input order in batches of `batch_size`, so most rows are padded.
    """
    backend = OnnxRuntimeBackend(graph_path)
    ids = M3Tokenizer(tokenizer_path).encode(texts, max_length=max_length).ids
    stats = {name: HeadStats() for name in OUTPUT_NAMES}
    for start in tqdm(range(0, len(ids), batch_size), desc="validate vs PyTorch", leave=False):
        batch = pad_batch(ids, np.arange(start, min(start + batch_size, len(ids))), pad_id)
        got = backend.run(batch.input_ids, batch.attention_mask, OUTPUT_NAMES)
        with torch.no_grad():
            want = reference(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask))
        want = dict(zip(OUTPUT_NAMES, (w.numpy() for w in want)))
        for row, n in enumerate(batch.attention_mask.sum(1)):
            real = {
                "dense_vecs": np.s_[row : row + 1],
                "sparse_weights": np.s_[row : row + 1, :n],
                "colbert_vecs": np.s_[row, : n - 1],
            }
            for name, where in real.items():
                stats[name].add(got[name][where], want[name][where])
    return {
        "texts": len(texts),
        "max_tokens": int(max(len(x) for x in ids)),
        "batch_size": batch_size,
        "heads": {name: s.as_dict() for name, s in stats.items()},
    }


def check_reference(figures: dict[str, object], gate: Gate, what: str) -> None:
    """ValidationError naming every figure of `compare_with_reference` outside `gate`."""
    failures = gate.failures(figures)
    if failures:
        raise ValidationError(f"{what} deviates from the PyTorch reference:\n  " + "\n  ".join(failures))


__all__ = ["REFERENCE_GATE", "ValidationError", "check_reference", "compare_with_reference"]
