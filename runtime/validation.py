"""A precision variant measured against the artifact's fp32 graph on the held-out built-in samples.

The export measures every variant this way and records the figures with its gate; the runtime does
the same on the serving CPU when an int8 graph would otherwise be served in an arithmetic its gate was
not measured in (`check_int8_on_this_cpu`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from m3rt.errors import ArtifactError
from m3rt.fidelity import Gate, compare_outputs, gate_for
from m3rt.int8_kernel import Int8Kernel, int8_kernel
from m3rt.manifest import GraphInfo, Manifest
from m3rt.tokenizer import M3Tokenizer

ALL_OUTPUTS = {"return_dense": True, "return_sparse": True, "return_colbert_vecs": True}


def heldout_texts() -> list[str]:
    from m3rt.export.samples import sample_texts  # package data only: no export dependency is imported

    return sample_texts()


class HeldoutComparison:
    """Encodes the held-out samples with the reference graph once, then measures graphs against it."""

    def __init__(self, manifest: Manifest, reference: Path, texts: Sequence[str] | None = None) -> None:
        self.manifest = manifest
        self.tokenizer = M3Tokenizer(manifest.tokenizer_path)
        self.texts = list(heldout_texts() if texts is None else texts)
        self.reference = self.encode(reference)

    def encode(self, graph: Path, session_config: Mapping[str, str] | None = None) -> dict[str, Any]:
        from m3rt.backends.onnxruntime import OnnxRuntimeBackend
        from m3rt.model import M3Model

        backend = OnnxRuntimeBackend(graph, session_config=session_config)
        model = M3Model(self.manifest, backend, self.tokenizer)
        return model.encode(self.texts, batch_size=8, max_length=512, **ALL_OUTPUTS)

    def figures(self, graph: Path, session_config: Mapping[str, str] | None = None) -> dict[str, Any]:
        return compare_outputs(self.encode(graph, session_config), self.reference)


def gate_of(graph: GraphInfo) -> Gate:
    """The gate a graph records (what its export was held to), else the default for its precision."""
    return Gate(graph.gate) if graph.gate else gate_for(graph.precision)


def int8_graph_for(manifest: Manifest, kernel: Int8Kernel) -> str:
    """The CPU int8 graph to serve: int8 weights where u8 x s8 sums are exact, else the uint8 twin."""
    if not kernel.u8s8_exact and manifest.has_graph("int8-u8"):
        return "int8-u8"
    if manifest.has_graph("int8"):
        return "int8"
    if manifest.has_graph("int8-u8"):
        return "int8-u8"
    raise ArtifactError(f"{manifest.root} has no 'int8' graph; it has: {', '.join(sorted(manifest.graph_names))}")


def served_as_measured(graph: GraphInfo, kernel: Int8Kernel) -> bool:
    """Whether this CPU computes the graph's integer products exactly, as its recorded gate was measured.

    A gate measured with exact (int32) sums holds wherever the sums are exact again: uint8 weights
    everywhere, int8 weights where this CPU's u8 x s8 kernel does not saturate.
    """
    measured = graph.measured_on
    if not measured or not measured.get("exact"):
        return False
    if graph.weight_type == "uint8":
        return True
    return kernel.u8s8_exact


def check_int8_on_this_cpu(manifest: Manifest, name: str, kernel: Int8Kernel | None = None) -> str | None:
    """None when the int8 graph `name` is served in the arithmetic its gate was measured in; otherwise
    measures it here against the fp32 graph, raises ArtifactError below its gate, and returns a note.
    """
    kernel = kernel or int8_kernel()
    graph = manifest.graph(name)
    if served_as_measured(graph, kernel):
        return None
    gate = gate_of(graph)
    measured = graph.measured_on
    why = (
        f"its gate was measured with {measured.get('kernel', 'other')} arithmetic"
        if measured
        else "its manifest does not say how its gate was measured"
    )
    warnings.warn(
        f"m3rt: {graph.file} runs here with {kernel.describe()} arithmetic and {why}; validating it on "
        f"this CPU against the fp32 graph first ({len(heldout_texts())} held-out texts)",
        stacklevel=3,
    )
    comparison = HeldoutComparison(manifest, manifest.graph_path("fp32"))
    figures = comparison.figures(manifest.graph_path(name))
    failures = gate.failures(figures)
    if failures:
        hint = (
            "re-export with m3-export --int8, which adds model.int8.u8.onnx for CPUs like this one"
            if not manifest.has_graph("int8-u8")
            else "use precision='fp32'"
        )
        raise ArtifactError(
            f"{graph.file} misses its accuracy gate on this CPU ({kernel.cpu}; {kernel.describe()}): "
            f"{'; '.join(failures)}. Not serving it: {hint}"
        )
    return (
        f"{graph.file} validated on this CPU at load ({kernel.describe()}): dense cos min "
        f"{figures['dense_cos_min']:.4f}, ColBERT mean {figures['colbert_cos_mean']:.4f}, sparse top-10 "
        f"{figures['sparse_top10_overlap']:.3f} (gate {gate.as_record()})"
    )
