"""One GEMM through the int8 forms, against float64: shared by the native and emulated-CPU tests."""

from pathlib import Path

import numpy as np
import onnx

# Integer MatMuls of the CPU graphs: (index of the weight input, index of its zero point).
_INTEGER_MATMULS = {"MatMulInteger": (1, 3), "MatMulIntegerToFloat": (1, 5), "DynamicQuantizeMatMul": (1, 3)}


def single_matmul(weight: np.ndarray) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def integer_weights(model: onnx.ModelProto) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight, weight zero point) of each integer MatMul, in graph order."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    return [
        (numpy_helper.to_array(inits[n.input[w]]), numpy_helper.to_array(inits[n.input[z]]))
        for n in model.graph.node
        for w, z in [_INTEGER_MATMULS.get(n.op_type, (None, None))]
        if w is not None
    ]


def gemm_errors(tmp_path: Path) -> dict[str, float]:
    """Relative error vs float64 of one GEMM: plain dynamic int8, two-term int8, and two-term int8
    with uint8 weights (the same integer products, summed without saturation on every CPU)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from m3rt.export.variants import two_term_int8, u8_weight_twin

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((256, 128)) * 0.02).astype(np.float32)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[::7] *= 8  # a few loud rows widen the per-tensor activation range, as real text does
    exact = x.astype(np.float64) @ weight.astype(np.float64)

    def error(model: onnx.ModelProto) -> float:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return float(np.linalg.norm(session.run(None, {"x": x})[0] - exact) / np.linalg.norm(exact))

    onnx.save(single_matmul(weight), tmp_path / "fp32.onnx")
    quantize_dynamic(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", weight_type=QuantType.QInt8, per_channel=True)
    two_term = single_matmul(weight)
    assert two_term_int8(two_term, ["mm"]) == 1
    assert {n.op_type for n in two_term.graph.node} >= {"MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
    errors = {"plain": error(onnx.load(tmp_path / "int8.onnx")), "two_term": error(two_term)}
    assert u8_weight_twin(two_term) == 3  # w1, w2 and their shared zero point
    errors["two_term_u8"] = error(two_term)
    return errors
