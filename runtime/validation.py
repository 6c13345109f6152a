"""A precision variant measured against the artifact's fp32 graph on the held-out built-in samples.

The export measures every variant this way and records the figures with its gate; the runtime does
the same on the serving CPU when an int8 graph would otherwise be served in an arithmetic its gate was
not measured in (`check_int8_on_this_cpu`, which `M3Model.load` runs). Graphs are encoded here with
the runtime core (backend, batches, heads), not through `M3Model`, so that the loader can use this.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from m3rt.core import BatchRunner
from m3rt.errors import ArtifactError
from m3rt.fidelity import Gate, compare_outputs, gate_for
from m3rt.heads import HEAD_OUTPUTS, HEADS, OUTPUT_SPARSE, unused_token_ids
from m3rt.int8_kernel import Int8Kernel, int8_kernel
from m3rt.manifest import GraphInfo, Manifest
from m3rt.placement import served_as_measured
from m3rt.postprocess import OutputCollector, PostProcessor
from m3rt.samples import sample_texts
from m3rt.scheduler import pad_batch, plan_batches, token_lengths
from m3rt.tokenizer import M3Tokenizer

# How the held-out texts are encoded: `encode`'s batching at these settings, so the figures are
# those of `M3Model.encode(texts, batch_size=8, max_length=512)`.
HELDOUT_BATCH_SIZE = 8
HELDOUT_MAX_LENGTH = 512
HELDOUT_TOKEN_BUDGET = 8192


def heldout_texts() -> list[str]:
    return sample_texts()


def encode_texts(manifest: Manifest, backend: Any, tokenizer: M3Tokenizer, texts: Sequence[str]) -> dict[str, Any]:
    """All three outputs of `texts` through `backend`, in `encode`'s format (lexical weights as dicts)."""
    ids = tokenizer.encode(list(texts), max_length=HELDOUT_MAX_LENGTH, truncate=True).ids
    collector = OutputCollector(
        len(ids), manifest.hidden_size, HEAD_OUTPUTS, PostProcessor(unused_token_ids(manifest.special_tokens))
    )
    runner = BatchRunner(backend)
    pad = manifest.special_tokens["pad"]
    for positions in plan_batches(token_lengths(ids), HELDOUT_BATCH_SIZE, HELDOUT_TOKEN_BUDGET):
        for batch, values in runner.run(pad_batch(ids, positions, pad), HEAD_OUTPUTS):
            collector.add(batch, values)
    results = collector.results()
    return {h.api: results[h.output].to_dicts() if h.output == OUTPUT_SPARSE else results[h.output] for h in HEADS}


class HeldoutComparison:
    """Encodes the held-out samples with the reference graph once, then measures graphs against it."""

    def __init__(self, manifest: Manifest, reference: Path, texts: Sequence[str] | None = None) -> None:
        self.manifest = manifest
        self.tokenizer = M3Tokenizer(manifest.tokenizer_path)
        self.texts = list(heldout_texts() if texts is None else texts)
        self.reference = self.encode(reference)

    def encode(self, graph: Path, session_config: Mapping[str, str] | None = None) -> dict[str, Any]:
        from m3rt.backends.onnxruntime import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(graph, session_config=session_config)
        return encode_texts(self.manifest, backend, self.tokenizer, self.texts)

    def figures(self, graph: Path, session_config: Mapping[str, str] | None = None) -> dict[str, Any]:
        return compare_outputs(self.encode(graph, session_config), self.reference)


def gate_of(graph: GraphInfo) -> Gate:
    """The gate a graph records (what its export was held to), else the default for its precision."""
    return Gate(graph.gate) if graph.gate else gate_for(graph.precision)


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
