"""FP16 and INT8 variants of the fp32 graph (same input and output names).

Which file serves which backend:
- `model.fp16.onnx`: TensorRT (strongly typed: precision comes from the graph) and ONNX Runtime CUDA.
- `model.int8.qdq.onnx`: TensorRT. Explicit symmetric int8 QuantizeLinear/DequantizeLinear on the
  weight MatMuls, calibrated on real text; attention, LayerNorm and the heads' normalisation stay
  in higher precision.
- `model.int8.onnx`: ONNX Runtime CPU with VNNI or AMX. Per-channel int8 weights with dynamically
  quantised activations (MatMulInteger); a static QDQ graph runs there too but through slower S8S8
  kernels. The sensitive first layers run as two-term int8 (`two_term_int8`): near-fp32 accuracy at
  int8 kernel speed.
- `model.int8.u8.onnx`: the same integer products with uint8 weights (`u8_weight_twin`), for CPUs
  whose u8 x s8 kernels add pairs of products in saturating int16 (AVX2, AVX-512 without VNNI;
  `m3rt.int8_kernel`).
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
# entering the first encoder layers is carried through all later ones, so their weight MatMuls get
# higher precision (two-term int8 in the CPU form, fp32 in the Q/DQ form); giving it to the last
# layers or the heads did not help.
INT8_SENSITIVE_LAYERS = (0, 1)


def layer_matmuls(model: onnx.ModelProto, layers: Sequence[int]) -> list[str]:
    """Weight MatMuls of the given encoder layers (node names of the TorchScript export)."""
    attention = set(attention_matmuls(model))
    prefixes = tuple(f"/encoder/encoder/layer.{i}/" for i in layers)
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and n.name.startswith(prefixes) and n.name not in attention
    ]


# The MatMuls that read a LayerNorm output (Q, K, V and the FFN's first): two-term int8 on these
# alone measured the same dense cosine as on all six of a layer, at a third of the extra GEMMs
# (RESULTS.md, "int8 rework, second session").
_LAYERNORM_FED = ("/attention/self/query/", "/attention/self/key/", "/attention/self/value/", "/intermediate/dense/")


def layernorm_fed_matmuls(model: onnx.ModelProto, layers: Sequence[int]) -> list[str]:
    return [name for name in layer_matmuls(model, layers) if any(part in name for part in _LAYERNORM_FED)]


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


def _int8_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-column symmetric int8: (int8 values, float32 scales)."""
    scale = np.maximum(np.abs(weight).max(axis=0), np.finfo(np.float32).tiny) / 127
    return np.clip(np.round(weight / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def two_term_int8(model: onnx.ModelProto, node_names: Sequence[str]) -> int:
    """Rewrite the named fp32 weight MatMuls `x @ W` as three int8 GEMMs; returns how many.

    ONNX Runtime's int8 kernels quantise activations per tensor; that noise entering the first layers
    is amplified by every later one, so they need more precision than int8. Writing x = q(x) + r (r the
    rounding residual, itself quantised) and W = W1 + W2 the same way gives
    x @ W ~ q(x) @ W1 + q(r) @ W1 + q(x) @ W2: about 16-bit inputs from int8 GEMMs, which run
    several times faster than one fp32 GEMM here (RESULTS.md). The dropped q(r) @ W2 is
    second-order (each factor is ~1/255 of the first).
    """
    from onnx import helper, numpy_helper

    wanted = set(node_names)
    initializers = {t.name: t for t in model.graph.initializer}
    nodes, added, count = [], [], 0
    for node in model.graph.node:
        if node.name not in wanted or node.op_type != "MatMul" or node.input[1] not in initializers:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
        w1, s1 = _int8_columns(weight)
        w2, s2 = _int8_columns(weight - w1 * s1.astype(np.float64))
        p = f"{node.name}/two_term/"
        added += [
            numpy_helper.from_array(w1, p + "w1"),
            numpy_helper.from_array(s1, p + "w1_scale"),
            numpy_helper.from_array(w2, p + "w2"),
            numpy_helper.from_array(s2, p + "w2_scale"),
            numpy_helper.from_array(np.zeros(weight.shape[1], np.int8), p + "w_zero"),
        ]
        x, y = node.input[0], node.output[0]
        ms = "com.microsoft"
        nodes += [
            helper.make_node("DynamicQuantizeLinear", [x], [p + "xq", p + "xs", p + "xz"], name=p + "quantize"),
            helper.make_node("DequantizeLinear", [p + "xq", p + "xs", p + "xz"], [p + "xd"], name=p + "dequantize"),
            helper.make_node("Sub", [x, p + "xd"], [p + "r"], name=p + "residual"),
            helper.make_node(
                "MatMulIntegerToFloat",
                [p + "xq", p + "w1", p + "xs", p + "w1_scale", p + "xz", p + "w_zero"],
                [p + "y1"],
                name=p + "x_w1",
                domain=ms,
            ),
            helper.make_node(
                "MatMulIntegerToFloat",
                [p + "xq", p + "w2", p + "xs", p + "w2_scale", p + "xz", p + "w_zero"],
                [p + "y2"],
                name=p + "x_w2",
                domain=ms,
            ),
            helper.make_node(
                "DynamicQuantizeMatMul",
                [p + "r", p + "w1", p + "w1_scale", p + "w_zero"],
                [p + "y3"],
                name=p + "r_w1",
                domain=ms,
            ),
            helper.make_node("Add", [p + "y1", p + "y2"], [p + "y12"], name=p + "sum1"),
            helper.make_node("Add", [p + "y12", p + "y3"], [y], name=p + "sum2"),
        ]
        count += 1
    used = {name for n in nodes for name in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + added)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if count and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count


def quantize_int8_cpu(
    src: Path, dst: Path, sensitive_layers: Sequence[int] = INT8_SENSITIVE_LAYERS, external: bool = False
) -> list[Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src), load_external_data=False)
    sensitive = layernorm_fed_matmuls(model, sensitive_layers)
    with tempfile.TemporaryDirectory(prefix="m3rt-int8-") as tmp:
        raw = Path(tmp) / "int8.onnx"
        quantize_dynamic(
            str(src),
            str(raw),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=attention_matmuls(model) + sensitive,
            use_external_data_format=True,
        )
        quantized = onnx.load(str(raw), load_external_data=True)
    two_term_int8(quantized, sensitive)
    return save_model(quantized, dst, external=external)


# Integer MatMuls of the CPU graphs: (index of the weight input, index of its zero point).
_INTEGER_MATMULS = {"MatMulInteger": (1, 3), "MatMulIntegerToFloat": (1, 5), "DynamicQuantizeMatMul": (1, 3)}


def u8_weight_twin(model: onnx.ModelProto) -> int:
    """Rewrite int8 weights w (zero point 0) as uint8 w + 128 with zero point 128, in place.

    The integer products are the same, but ONNX Runtime multiplies u8 x u8 by widening both to 16
    bits (`vpmaddwd`), which no x86 CPU saturates, where its u8 x s8 kernels without VNNI add pairs of
    products in int16 (`vpmaddubsw`) and clip them. Returns how many tensors changed.
    """
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    changed: set[str] = set()
    for node in model.graph.node:
        for index in _INTEGER_MATMULS.get(node.op_type, ()):
            tensor = initializers.get(node.input[index]) if index < len(node.input) else None
            if tensor is None or tensor.name in changed or tensor.data_type != onnx.TensorProto.INT8:
                continue
            values = numpy_helper.to_array(tensor).astype(np.int16) + 128
            tensor.CopyFrom(numpy_helper.from_array(values.astype(np.uint8), tensor.name))
            changed.add(tensor.name)
    return len(changed)


def write_u8_weight_twin(src: Path, dst: Path, external: bool = False) -> list[Path]:
    """`model.int8.u8.onnx` from `model.int8.onnx`."""
    model = onnx.load(str(src), load_external_data=True)
    if not u8_weight_twin(model):
        raise ValueError(f"{src} has no int8 weights of integer MatMuls to rewrite")
    return save_model(model, dst, external=external)


class _CalibrationReader:
    """Feeds tokenised calibration texts to ONNX Runtime's calibrator, one text per batch.

    Every batch has the same shape (padded to the longest text): the histogram calibrator stacks the
    outputs it collects and fails on ragged shapes.
    """

    def __init__(self, tokenizer: M3Tokenizer, texts: Sequence[str], pad_id: int, max_length: int = 512) -> None:
        ids = tokenizer.encode(list(texts), max_length=max_length).ids
        width = max(len(x) for x in ids)
        self._batches: Iterator = (pad_batch(ids, np.array([i]), pad_id, width=width) for i in range(len(ids)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


# Measured on the full-size model (RESULTS.md, "Static, calibrated Q/DQ"): the 99.99th percentile
# of |activation| beat MinMax (dense cosine min 0.985 vs 0.978) and the 99.9th (0.982).
QDQ_CALIBRATION = {"method": "Percentile", "percentile": 99.99}


def quantize_int8_qdq(
    src: Path,
    dst: Path,
    tokenizer: M3Tokenizer,
    calibration: Sequence[str],
    pad_id: int,
    fp32_layers: Sequence[int] = INT8_SENSITIVE_LAYERS,
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
            calibrate_method=CalibrationMethod.Percentile,
            use_external_data_format=True,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "CalibPercentile": QDQ_CALIBRATION["percentile"],
                "CalibTensorRangeSymmetric": True,
                # Fold histograms every few texts instead of keeping every activation of every
                # calibration text in memory (which ran a 24 GiB machine out of memory).
                "CalibMaxIntermediateOutputs": 4,
            },
        )
        return save_model(onnx.load(str(raw), load_external_data=True), dst)
