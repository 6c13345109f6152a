"""PyTorch reference -> one ONNX graph with all three heads.

Exporter path: the TorchScript exporter (`dynamo=False`) over the eager-attention encoder. Its
MatMul/Softmax attention pattern is what ONNX Runtime's transformer optimizer fuses into its
Attention/SkipLayerNorm/BiasGelu kernels (the dynamo/SDPA export is not fused by it), and what
TensorRT's ONNX parser fuses into its MHA kernels, so one plain-ONNX graph serves both.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from m3rt.export.reference import M3Reference
from m3rt.manifest import INPUT_NAMES, OUTPUT_NAMES

DEFAULT_OPSET = 17
# Protobuf cannot hold a single message over 2 GiB; above this the weights go to one side file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _trace_inputs(pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A padded batch, so that nothing mask-dependent can be specialised away during tracing.
    ids = torch.tensor([[0, 10, 20, 30, 40, 50, 2], [0, 10, 20, 2, pad_id, pad_id, pad_id]])
    mask = (ids != pad_id).to(torch.int64)
    return ids, mask


def export_graph(reference: M3Reference, out_path: Path, opset: int = DEFAULT_OPSET, pad_id: int = 1) -> list[Path]:
    """Write `out_path` (plus `out_path.data` when large); returns the files written."""
    ids, mask = _trace_inputs(pad_id)
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="m3rt-onnx-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                reference,
                (ids, mask),
                str(raw),
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "sequence"},
                    "dense_vecs": {0: "batch"},
                    "sparse_weights": {0: "batch", 1: "sequence"},
                    "colbert_vecs": {0: "batch", 1: "sequence_minus_1"},
                },
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        model = onnx.load(str(raw), load_external_data=True)
    inline_initializer_aliases(model)
    return save_model(model, out_path)


def inline_initializer_aliases(model: onnx.ModelProto) -> None:
    """Replace `Identity(initializer)` aliases by their own copy of the initializer.

    The exporter shares identical tensors (e.g. LayerNorm weights that are all ones) through
    Identity nodes; a weight read by both a kept-fp32 LayerNorm and an fp16 node would then
    need two types at once, and quantizers expect each MatMul to own its weight.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    aliases = [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in initializers]
    for node in aliases:
        copy = onnx.TensorProto()
        copy.CopyFrom(initializers[node.input[0]])
        copy.name = node.output[0]
        model.graph.initializer.append(copy)
        model.graph.node.remove(node)


def save_model(model: onnx.ModelProto, out_path: Path, external: bool = False) -> list[Path]:
    """`external`: weights in `<file>.data` whatever their size (a flash-attention twin shares that file)."""
    data_path = out_path.with_name(out_path.name + ".data")
    for stale in (out_path, data_path):
        stale.unlink(missing_ok=True)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if external or weight_bytes > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model,
            str(out_path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_path.name,
            size_threshold=1024,
        )
        return [out_path, data_path]
    onnx.save_model(model, str(out_path))
    return [out_path]
