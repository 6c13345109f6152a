"""The CUDA serving graph: ONNX Runtime's transformer optimizer fused graph, converted to FP16.

`onnxruntime.transformers.optimizer.optimize_model(model_type="bert")` rewrites the TorchScript
export's attention (MatMul/Softmax), residual LayerNorms and GELUs into the contrib ops `Attention`,
`SkipLayerNormalization` and `BiasGelu`, whose CUDA kernels (fused multi-head attention, fp16 with
fp32 accumulation) ran the full model 1.5-5.9x faster than the plain graph on an H100 (80 GB,
ONNX Runtime 1.31: 573k vs 392k tok/s at 128 x 128 tokens, 273k vs 46k at 2 x 8192).
`opt_level=0`: only the optimizer's Python fusions, no ONNX Runtime graph optimizations baked in for
one provider.

Checks at export: the fused fp32 graph against the PyTorch reference (parity, same tolerance as the
plain export: the fusion must not change the model), then the fp16 file's fidelity against the fp32
graph on ONNX Runtime CPU (which runs these contrib ops, fp16 included, on the CPU too). The CUDA
kernels' own deviation can only be measured on a GPU: `benchmarks/gpu_check.py` does that.

The manifest marks the graph `execution_provider: CUDAExecutionProvider`; the runtime uses it for
fp16 on CUDA and never on the CPU (`m3rt.placement.select_graph`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from m3rt.export.onnx_graph import save_model
from m3rt.export.reference import M3Reference
from m3rt.export.samples import sample_texts
from m3rt.export.validate import REFERENCE_GATE, check_reference, compare_with_reference
from m3rt.fidelity import Gate

GRAPH_KEY = "fp16-fused"
FILE_NAME = "model.fp16.fused.onnx"
EXECUTION_PROVIDER = "CUDAExecutionProvider"
# As the plain fp16 graph (export/variants.py, measured there): the embeddings' LayerNormalization and
# the heads' ReduceL2 (normalisation) stay fp32; Softmax only survives outside fused attention. The
# fused ops stay fp16: their CUDA kernels accumulate in fp32 (SkipLayerNormalization's mean and
# variance, Attention's softmax), and casting around each of them would cost two kernels per layer.
KEEP_FP32 = ("LayerNormalization", "Softmax", "ReduceL2")


@dataclass
class FusedGraph:
    """What `build_fused_fp16` wrote and measured, for the manifest."""

    files: list[Path]
    num_heads: int
    hidden_size: int
    fused_operators: dict[str, int]
    validation: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def manifest_fields(self) -> dict[str, Any]:
        import onnxruntime

        return {
            "execution_provider": EXECUTION_PROVIDER,
            "backends": ["onnxruntime-cuda"],
            "optimizer": {
                "tool": "onnxruntime.transformers.optimizer.optimize_model",
                "model_type": "bert",
                "num_heads": self.num_heads,
                "hidden_size": self.hidden_size,
                "opt_level": 0,
                "embed_layer_norm_fusion": False,
                "onnxruntime": onnxruntime.__version__,
                "fused_operators": self.fused_operators,
            },
            "kept_fp32": list(KEEP_FP32),
            "validation": self.validation,
            "warnings": self.warnings,
        }


def fuse(src: Path, num_heads: int, hidden_size: int) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The optimizer's fused fp32 model (in memory) and the count of each fused operator."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    # EmbedLayerNormalization computes BERT's position ids (0..S-1); XLM-R's are cumsum(ids != pad) + pad,
    # so the embeddings must stay as exported.
    options.enable_embed_layer_norm = False
    optimized = optimize_model(
        str(src),
        model_type="bert",
        num_heads=num_heads,
        hidden_size=hidden_size,
        optimization_options=options,
        opt_level=0,
    )
    stats = optimized.get_fused_operator_statistics()
    return optimized.model, {k: int(v) for k, v in stats.items() if v}


class FusionError(RuntimeError):
    """The optimizer left attention blocks unfused: the graph would serve, but without the reason it exists."""


def check_attention_fused(counts: dict[str, int], layers: int) -> None:
    """Every layer's attention must be one fused `Attention` op. An unfused block materialises its
    [B, heads, S, S] scores (2 GiB per 8192-token text per layer in fp32), so a partly fused graph is
    refused rather than served. The usual cause is an exporter or transformers version whose
    attention subgraph the optimizer's pattern does not match."""
    fused = counts.get("Attention", 0)
    if fused != layers:
        import onnxruntime
        import transformers

        raise FusionError(
            f"ONNX Runtime's transformer optimizer fused {fused} of {layers} attention blocks into Attention "
            f"(onnxruntime {onnxruntime.__version__}, transformers {transformers.__version__}; all fused: "
            f"{dict(sorted(counts.items()))}); export without --fused, or with the versions in constraints.txt"
        )


def convert_fused_fp16(model: onnx.ModelProto, weightless: onnx.ModelProto, keep_fp32: Sequence[str] = KEEP_FP32):
    """FP16 weights and activations, float32 inputs/outputs (keep_io_types).

    Types for the converter's casts come from symbolic shape inference, which knows the contrib ops
    (ONNX's own inference does not, and cannot serialise a graph over 2 GB); it runs on the graph
    without its weight data (`weightless`: same graph, external data not loaded), dims suffice.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        typed = SymbolicShapeInference.infer_shapes(weightless, auto_merge=True)
    except Exception:  # noqa: BLE001 - partial types still let the converter place most casts
        typed = onnx.shape_inference.infer_shapes(weightless)
    outputs = {o.name for o in model.graph.output}
    del model.graph.value_info[:]
    model.graph.value_info.extend(v for v in typed.graph.value_info if v.name not in outputs)
    return convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_fp32), disable_shape_infer=True)


def build_fused_fp16(
    reference: M3Reference,
    staging: Path,
    pad_id: int,
    tolerance: Gate | None = None,
    texts: list[str] | None = None,
) -> FusedGraph:
    """Fuse `staging/model.onnx`, check the fused fp32 graph against PyTorch, write the fp16 file.

    The fused fp32 graph lives in a temporary directory only (it serves no backend: the CPU runs the
    plain graph about as fast: 256 vs 260 tok/s on a 2-core EPYC, benchmarks/RESULTS.md).
    """
    config = reference.encoder.config
    num_heads, hidden_size = int(config.num_attention_heads), int(config.hidden_size)
    layers = int(config.num_hidden_layers)
    fused, counts = fuse(staging / "model.onnx", num_heads, hidden_size)
    check_attention_fused(counts, layers)
    warnings = []
    for op, want in {"SkipLayerNormalization": 2 * layers, "BiasGelu": layers}.items():
        if counts.get(op, 0) != want:
            # Still a correct graph (checked below), only slower: say so rather than fail.
            warnings.append(f"{op}: fused {counts.get(op, 0)} of {want} (the rest runs unfused)")
    with tempfile.TemporaryDirectory(prefix="m3rt-fused-", dir=staging.parent) as tmp:
        fused32 = Path(tmp) / "model.fused.fp32.onnx"
        save_model(fused, fused32)
        validation = compare_with_reference(
            reference, fused32, staging / "tokenizer.json", texts or sample_texts(), pad_id
        )
        check_reference(validation, tolerance or REFERENCE_GATE, "the transformer-optimizer-fused fp32 graph")
        weightless = onnx.load(str(fused32), load_external_data=False)
        model16 = convert_fused_fp16(fused, weightless)
    files = save_model(model16, staging / FILE_NAME)
    validation = {
        "graph": "fused fp32, before the fp16 conversion",
        "against": "PyTorch reference (fp32, eager)",
        **validation,
    }
    return FusedGraph(files, num_heads, hidden_size, counts, validation, warnings)
