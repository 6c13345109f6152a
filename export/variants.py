"""FP16 and INT8 variants of the fp32 graph (same input and output names).

Which file serves which backend:
- `model.fp16.onnx`: TensorRT (strongly typed: precision comes from the graph) and ONNX Runtime CUDA.
- `model.int8.qdq.onnx`: TensorRT. Explicit symmetric int8 QuantizeLinear/DequantizeLinear on the
  weight MatMuls, calibrated on real text; attention, LayerNorm and the heads' normalisation stay
  in higher precision.
- `model.int8.onnx`: ONNX Runtime CPU. Per-channel int8 weights with dynamically quantised
  activations (MatMulInteger), the form that runs on the VNNI/AMX int8 kernels; a static QDQ graph
  runs there too but through slower S8S8 kernels.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from m3rt.export.onnx_graph import save_model
from m3rt.scheduler import pad_batch
from m3rt.tokenizer import M3Tokenizer

# Measured (benchmarks/RESULTS.md, "fp16 block list"): these keep fp32 in the fp16 graph.
# LayerNormalization and Softmax reduce over 1024 features / up to 8192 keys; ReduceL2 (with the
# Clip/Div of F.normalize) squares values whose sum can pass fp16's 65504.
FP16_KEEP_FP32 = ("LayerNormalization", "Softmax", "ReduceL2")


def attention_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls of two activations (QK^T, softmax x V): attention stays in higher precision."""
    initializers = {t.name for t in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and not any(i in initializers for i in node.input)
    ]


# Measured on the full-size model (benchmarks/RESULTS.md, "int8 sensitivity"): quantisation noise
# entering the first encoder layers is carried through all later ones, so their weight MatMuls
# stay fp32; keeping the last layers or the heads in fp32 did not help.
INT8_FP32_LAYERS = (0, 1)


def layer_matmuls(model: onnx.ModelProto, layers: Sequence[int]) -> list[str]:
    """Weight MatMuls of the given encoder layers (node names of the TorchScript export)."""
    attention = set(attention_matmuls(model))
    prefixes = tuple(f"/encoder/encoder/layer.{i}/" for i in layers)
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and n.name.startswith(prefixes) and n.name not in attention
    ]


def convert_fp16(
    src: Path, dst: Path, fp16_outputs: bool = False, keep_fp32: Sequence[str] = FP16_KEEP_FP32
) -> list[Path]:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src), load_external_data=True)
    # The converter places Casts around kept-fp32 nodes from value_info types. Shape inference
    # cannot serialise a >2 GB graph, so it runs on the graph without weight data (dims suffice).
    typed = onnx.shape_inference.infer_shapes(onnx.load(str(src), load_external_data=False))
    model.graph.value_info.extend(typed.graph.value_info)
    model16 = convert_float_to_float16(
        model, keep_io_types=not fp16_outputs, op_block_list=list(keep_fp32), disable_shape_infer=True
    )
    return save_model(model16, dst)


def quantize_int8_cpu(src: Path, dst: Path, fp32_layers: Sequence[int] = INT8_FP32_LAYERS) -> list[Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src), load_external_data=False)
    dst.unlink(missing_ok=True)
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=attention_matmuls(model) + layer_matmuls(model, fp32_layers),
    )
    return [dst]


class _CalibrationReader:
    """Feeds tokenised calibration texts in padded batches to ONNX Runtime's calibrator."""

    def __init__(
        self, tokenizer: M3Tokenizer, texts: Sequence[str], pad_id: int, max_length: int = 512, batch_size: int = 8
    ) -> None:
        ids = tokenizer.encode(list(texts), max_length=max_length).ids
        order = np.argsort([-len(x) for x in ids], kind="stable")
        self._batches: Iterator = iter(
            pad_batch(ids, order[i : i + batch_size], pad_id) for i in range(0, len(order), batch_size)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


def quantize_int8_qdq(
    src: Path,
    dst: Path,
    tokenizer: M3Tokenizer,
    calibration: Sequence[str],
    pad_id: int,
    fp32_layers: Sequence[int] = INT8_FP32_LAYERS,
) -> list[Path]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src), load_external_data=False)
    with tempfile.TemporaryDirectory(prefix="m3rt-qdq-") as tmp:
        raw = Path(tmp) / "qdq.onnx"
        quantize_static(
            str(src),
            str(raw),
            _CalibrationReader(tokenizer, calibration, pad_id),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=attention_matmuls(model) + layer_matmuls(model, fp32_layers),
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=True,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
        return save_model(onnx.load(str(raw), load_external_data=True), dst)
