"""FP16 and INT8 variants on the tiny model: they run on ONNX Runtime CPU within their gates."""

import json

import numpy as np
import onnx
import pytest

from m3rt import ArtifactError, M3Model
from m3rt.export.artifact import ExportOptions, GateError, export_artifact
from m3rt.fidelity import Gate, compare_outputs

ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)


@pytest.fixture(scope="module")
def variants(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("variants") / "artifact"
    # The tiny model has 2 layers: quantise them all plainly (the default treats layers 0-1 as sensitive).
    export_artifact(ExportOptions(model=str(tiny[0]), output=out, fp16=True, int8=True, int8_sensitive_layers=()))
    return out


def test_manifest_describes_each_variant(variants):
    data = json.loads((variants / "m3rt.json").read_text())
    graphs = data["graphs"]
    assert set(graphs) == {"fp32", "fp16", "int8", "int8-qdq"}
    assert graphs["fp16"]["kept_fp32"] == ["LayerNormalization", "Softmax", "ReduceL2"]
    assert graphs["int8"]["backends"] == ["onnxruntime-cpu"] and graphs["int8-qdq"]["backends"] == ["tensorrt"]
    assert graphs["int8-qdq"]["calibration"]["texts"] > 20
    assert graphs["int8-qdq"]["calibration"]["method"] == "Percentile"
    for name in ("fp16", "int8", "int8-qdq"):
        fidelity = graphs[name]["fidelity"]
        assert fidelity["passed"] and fidelity["texts"] == 47
        assert set(fidelity) >= {
            "dense_cos_min",
            "dense_cos_mean",
            "colbert_cos_min",
            "colbert_cos_mean",
            "sparse_top10_overlap",
            "sparse_jaccard",
            "sparse_weight_max_abs_err",
        }
        for file in graphs[name]["files"]:
            assert file in data["files"]
    assert "engines" not in data  # no TensorRT here: nothing is claimed


def test_same_io_names_and_output_types(variants):
    for file, out_type in [
        ("model.fp16.onnx", onnx.TensorProto.FLOAT),
        ("model.int8.onnx", onnx.TensorProto.FLOAT),
        ("model.int8.qdq.onnx", onnx.TensorProto.FLOAT),
    ]:
        model = onnx.load(str(variants / file), load_external_data=False)
        assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
        assert [o.name for o in model.graph.output] == ["dense_vecs", "sparse_weights", "colbert_vecs"]
        assert all(o.type.tensor_type.elem_type == out_type for o in model.graph.output)


def test_fp16_graph_really_is_fp16_except_the_kept_ops(variants):
    model = onnx.load(str(variants / "model.fp16.onnx"))
    types = {t.data_type for t in model.graph.initializer if len(t.dims) == 2}
    assert onnx.TensorProto.FLOAT16 in types
    assert any(n.op_type == "Cast" for n in model.graph.node)


def test_int8_graphs_quantize_weights_but_not_attention(variants):
    cpu = onnx.load(str(variants / "model.int8.onnx"))
    assert sum(n.op_type == "MatMulInteger" for n in cpu.graph.node) >= 2 * 6
    qdq = onnx.load(str(variants / "model.int8.qdq.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in qdq.graph.node)
    # Attention MatMuls (two activations) keep float inputs in both graphs.
    for model in (cpu, qdq):
        producers = {o: n.op_type for n in model.graph.node for o in n.output}
        inits = {t.name for t in model.graph.initializer}
        attention = [
            n
            for n in model.graph.node
            if n.op_type == "MatMul" and not set(n.input) & inits and "attention/self/MatMul" in n.name
        ]
        assert attention and all(producers.get(i) != "DequantizeLinear" for n in attention for i in n.input)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_runtime_loads_each_precision_within_its_gate(variants, precision, texts):
    reference = M3Model.load(variants).encode(texts, **ALL)
    got = M3Model.load(variants, precision=precision).encode(texts, **ALL)
    figures = compare_outputs(got, reference)
    gate = Gate(dense_cos_min=0.999) if precision == "fp16" else Gate(0.99, 0.98, 0.9)
    assert not gate.failures(figures), figures
    assert got["dense_vecs"].dtype == np.float32 and len(got["colbert_vecs"]) == len(texts)


def test_fp16_outputs_option(tiny, tmp_path):
    out = tmp_path / "a"
    manifest = export_artifact(ExportOptions(model=str(tiny[0]), output=out, fp16=True, fp16_outputs=True))
    assert manifest["graphs"]["fp16"]["outputs"]["dense_vecs"]["dtype"] == "float16"
    model = onnx.load(str(out / "model.fp16.onnx"))
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for o in model.graph.output)
    dense = M3Model.load(out, precision="fp16").encode(["hello"])["dense_vecs"]
    assert dense.dtype == np.float32  # the runtime returns float32 whatever the graph emits


def test_gate_failure_is_loud_unless_degraded_is_allowed(tiny, tmp_path):
    impossible = {"int8": Gate(dense_cos_min=1.01)}
    with pytest.raises(GateError, match=r"model.int8.onnx misses its accuracy gate: dense_cos_min"):
        export_artifact(ExportOptions(model=str(tiny[0]), output=tmp_path / "a", int8=True, gates=impossible))
    assert not (tmp_path / "a").exists()
    manifest = export_artifact(
        ExportOptions(model=str(tiny[0]), output=tmp_path / "b", int8=True, gates=impossible, allow_degraded=True)
    )
    assert manifest["graphs"]["int8"]["fidelity"]["passed"] is False


def test_calibration_file(tiny, tmp_path):
    calibration = tmp_path / "cal.txt"
    calibration.write_text("first calibration line\n\nsecond one, a little longer than the first\n")
    manifest = export_artifact(
        ExportOptions(
            model=str(tiny[0]), output=tmp_path / "a", int8=True, calibration=calibration, allow_degraded=True
        )
    )
    assert manifest["graphs"]["int8-qdq"]["calibration"]["texts"] == 2
    assert manifest["graphs"]["int8-qdq"]["calibration"]["source"].startswith("cal.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no text lines"):
        export_artifact(
            ExportOptions(model=str(tiny[0]), output=tmp_path / "b", int8=True, calibration=tmp_path / "empty.txt")
        )


def test_missing_variant_or_engine_is_a_clear_error(tiny):
    with pytest.raises(ArtifactError, match="no 'int8' graph"):
        M3Model.load(tiny[1], precision="int8")
    with pytest.raises(ArtifactError, match="no fp16 TensorRT engine.*m3-export --engine"):
        M3Model.load(tiny[1], backend="tensorrt", precision="fp16")


def test_auto_backend_falls_back_to_onnxruntime_without_tensorrt(variants):
    assert M3Model.load(variants, backend="auto", precision="int8").backend.name == "onnxruntime"


def test_int8_gives_sensitive_layers_higher_precision(tiny, tmp_path):
    manifest = export_artifact(
        ExportOptions(model=str(tiny[0]), output=tmp_path / "a", int8=True, int8_sensitive_layers=(1,))
    )
    assert "Q/K/V/FFN-in MatMuls of encoder layers [1] as two-term int8 (~16-bit)" in (
        manifest["graphs"]["int8"]["kept_higher_precision"]
    )
    assert "weight MatMuls of encoder layers [1] in fp32" in manifest["graphs"]["int8-qdq"]["kept_higher_precision"]

    cpu = onnx.load(str(tmp_path / "a" / "model.int8.onnx"))
    plain = {n.name for n in cpu.graph.node if n.op_type == "MatMulInteger"}
    two_term = {n.name for n in cpu.graph.node if "/two_term/" in n.name}
    weights = {t.name for t in cpu.graph.initializer}
    fp32_weight_matmuls = [n.name for n in cpu.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert any("layer.0/" in name for name in plain)
    assert any("layer.1/" in name for name in two_term) and not any("layer.0/" in name for name in two_term)
    for part in ("query", "key", "value", "intermediate"):  # in layer 1: two-term, not plain int8
        assert any("layer.1/" in n and part in n for n in two_term)
        assert not any("layer.1/" in n and part in n for n in plain)
    for part in ("attention/output", "layer.1/output"):  # fed by attention / GELU: plain int8
        assert any("layer.1/" in n and part in n for n in plain)
    assert fp32_weight_matmuls == []

    qdq = onnx.load(str(tmp_path / "a" / "model.int8.qdq.onnx"))
    producers = {o: n for n in qdq.graph.node for o in n.output}
    # MatMuls whose weight input comes through a DequantizeLinear
    quantized = {
        n.name
        for n in qdq.graph.node
        if n.op_type == "MatMul"
        and any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input[1:])
    }
    assert any("layer.0/" in name for name in quantized)
    assert not any("layer.1/" in name for name in quantized)


def _single_matmul(weight: np.ndarray) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_two_term_int8_is_near_fp32_where_plain_int8_is_not(tmp_path):
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from m3rt.export.variants import two_term_int8

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((256, 128)) * 0.02).astype(np.float32)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[::7] *= 8  # a few loud rows widen the per-tensor activation range, as real text does
    exact = x.astype(np.float64) @ weight.astype(np.float64)

    def error(model: onnx.ModelProto) -> float:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return float(np.linalg.norm(session.run(None, {"x": x})[0] - exact) / np.linalg.norm(exact))

    onnx.save(_single_matmul(weight), tmp_path / "fp32.onnx")
    quantize_dynamic(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", weight_type=QuantType.QInt8, per_channel=True)
    two_term = _single_matmul(weight)
    assert two_term_int8(two_term, ["mm"]) == 1
    assert {n.op_type for n in two_term.graph.node} >= {"MatMulIntegerToFloat", "DynamicQuantizeMatMul"}

    plain_error, two_term_error = error(onnx.load(tmp_path / "int8.onnx")), error(two_term)
    assert plain_error > 3e-3  # what plain dynamic int8 loses here
    assert two_term_error < plain_error / 50 and two_term_error < 5e-4


def test_inspect_lists_variants(variants, capsys):
    from m3rt.cli import main

    assert main(["inspect", str(variants)]) == 0
    out = capsys.readouterr().out
    assert "graph    int8: model.int8.onnx for onnxruntime-cpu; vs fp32: dense cos min" in out
    assert "graph    fp16: model.fp16.onnx for tensorrt, onnxruntime-cuda" in out


def test_engine_request_without_tensorrt_is_a_clear_error(tiny, tmp_path, capsys):
    from m3rt.export.cli import main

    assert main(["--model", str(tiny[0]), "--output", str(tmp_path / "a"), "--fp16", "--engine"]) == 1
    err = capsys.readouterr().err
    assert "--engine was requested but TensorRT is not importable" in err and "tensorrt-cu1" in err
    assert not (tmp_path / "a").exists()
    # Without --engine the export goes on and says why no engine was built.
    assert main(["--model", str(tiny[0]), "--output", str(tmp_path / "b"), "--fp16"]) == 0
    assert "no TensorRT engines built: TensorRT is not importable" in capsys.readouterr().err


def test_int8_forms_can_be_chosen(tiny, tmp_path):
    manifest = export_artifact(ExportOptions(model=str(tiny[0]), output=tmp_path / "a", int8=True, int8_forms=("cpu",)))
    assert "int8" in manifest["graphs"] and "int8-qdq" not in manifest["graphs"]
    assert not (tmp_path / "a" / "model.int8.qdq.onnx").exists()
