"""`resolve`: which engine runs which record on which device, decided once and kept by the model."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from m3rt import M3Model
from m3rt.errors import ArtifactError, InputError
from m3rt.manifest import Manifest, load_manifest
from m3rt.memory import MemoryModel, budget_rows
from m3rt.placement import ENGINES, Device, create_backend, resolve


def _with_engine(manifest: Manifest, precision: str = "fp32") -> Manifest:
    """The manifest as if a TensorRT plan of `precision` had been built from its fp32 graph."""
    data = copy.deepcopy(manifest.data)
    data["engines"] = {
        precision: {
            "file": f"model.{precision}.plan",
            "built_from": data["graphs"]["fp32"]["file"],
            "tensorrt_version": "10.14",
            "gpu": "a GPU",
            "compute_capability": "9.0",
            "profiles": [{"name": "p", "min": [1, 2], "opt": [8, 128], "max": [16, 512]}],
        }
    }
    return Manifest(root=manifest.root, data=data)


@pytest.fixture
def tensorrt_here(monkeypatch):
    """TensorRT and a GPU as if present; the backends it builds are recorded, not run."""
    import m3rt.backends.tensorrt as tensorrt_module

    made = []

    class Recorded:
        name = "tensorrt"

        def __init__(self, plan_path, info, device=0):
            made.append((plan_path.name, device))

    monkeypatch.setitem(ENGINES, "tensorrt", dataclasses.replace(ENGINES["tensorrt"], unavailable=lambda d: None))
    monkeypatch.setattr(tensorrt_module, "TensorRTBackend", Recorded)
    return made


def test_auto_with_device_cpu_never_lands_on_tensorrt(tiny, tensorrt_here):
    manifest = _with_engine(load_manifest(tiny[1]))
    assert resolve(manifest, "fp32", backend="auto").engine == "tensorrt"  # no device asked: the GPU engine
    on_cpu = resolve(manifest, "fp32", "cpu", backend="auto")
    assert (on_cpu.engine, on_cpu.device, on_cpu.graph.name, on_cpu.plan) == ("onnxruntime", ("cpu", 0), "fp32", None)
    assert create_backend(manifest, on_cpu).name == "onnxruntime" and not tensorrt_here


def test_tensorrt_runs_on_the_gpu_it_was_asked_for(tiny, tensorrt_here):
    manifest = _with_engine(load_manifest(tiny[1]))
    for backend in ("tensorrt", "auto"):
        placement = resolve(manifest, "fp32", "cuda:1", backend=backend)
        assert (placement.engine, placement.device) == ("tensorrt", Device("cuda", 1))
        assert placement.graph.name == "fp32" and placement.plan.file == "model.fp32.plan"
        create_backend(manifest, placement)
    assert tensorrt_here == [("model.fp32.plan", 1), ("model.fp32.plan", 1)]


def test_refused_placements_say_why(tiny):
    manifest = load_manifest(tiny[1])
    with pytest.raises(ArtifactError, match="unknown backend 'torch'"):
        resolve(manifest, backend="torch")
    with pytest.raises(ArtifactError, match="runs on cuda, not on cpu"):
        resolve(manifest, device="cpu", backend="tensorrt")
    with pytest.raises(ArtifactError, match="no fp32 TensorRT engine"):
        resolve(manifest, device="cuda", backend="tensorrt")
    with pytest.raises(ArtifactError, match="expected 'cpu', 'cuda' or 'cuda:N'"):
        resolve(manifest, device="cuda:x")
    with pytest.raises(ArtifactError, match="no 'fp64' graph"):
        resolve(manifest, "fp64")
    with pytest.raises(ArtifactError, match="expected 'cpu', 'cuda' or 'cuda:N'"):
        M3Model.load(tiny[1], device=3)


def test_the_model_keeps_its_placement(tiny_model):
    placement = tiny_model.placement
    assert (placement.engine, placement.device, placement.precision) == ("onnxruntime", ("cpu", 0), "fp32")
    assert placement.graph.file == tiny_model.backend.graph_path.name == "model.onnx"
    assert placement.int8_kernel is None
    # The default export writes the flash-attention twin, which the backend runs long batches on.
    assert placement.long_document_graph.file == tiny_model.backend.long_graph_path.name == "model.flash.onnx"
    assert placement.quadratic_attention and "dense_vecs" in placement.outputs()


def test_the_memory_budget_reads_the_placement(tiny):
    manifest = load_manifest(tiny[1])
    data = copy.deepcopy(manifest.data)
    data["graphs"]["fp32-flash"] = {**data["graphs"]["fp32"], "attention": "flash"}
    both = resolve(Manifest(root=manifest.root, data=data))
    plain_data = copy.deepcopy(data)
    del plain_data["graphs"]["fp32-flash"]
    plain = resolve(Manifest(root=manifest.root, data=plain_data))
    assert both.graph.name == "fp32" and both.long_document_graph.name == "fp32-flash"
    assert plain.long_document_graph is None
    heads = int(manifest.data["model"]["num_attention_heads"])
    budget, length = 2**30, 1024
    # A batch's cost counts the [heads, length, length] scores only where its graph holds them whole:
    # with both graphs, from the backend's crossover on the batch runs on the flash graph.
    for placement, crossover, quadratic in ((both, 1024, False), (both, 2048, True), (plain, 1024, True)):
        cost = MemoryModel(manifest.hidden_size, heads, quadratic)
        want = budget // (length * 24 * manifest.hidden_size * 4 + quadratic * 2 * heads * length * length * 4)
        assert budget_rows(manifest, placement, budget, crossover)(length) == want == cost.max_rows(length, budget)


def test_run_ids_refuses_what_the_graph_cannot_take(tiny_model):
    good = tiny_model.tokenizer.encode(["a b c"], 512).ids
    for bad, message in [
        ("a b c", "sequence of 1-D"),
        ([np.zeros((2, 3), dtype=np.int64)], "1-D array of integer"),
        ([np.array([0.0, 2.0])], "1-D array of integer"),
        ([np.array([], dtype=np.int64)], "has 0 ids"),
        ([np.zeros(tiny_model.max_length + 1, dtype=np.int64)], "1..8192"),
        ([np.array([0, tiny_model.manifest.model.vocab_size, 2])], "outside this model's vocabulary"),
        ([np.array([0, -1, 2])], "outside this model's vocabulary"),
    ]:
        with pytest.raises(InputError, match=message):
            tiny_model.run_ids(bad, ["dense_vecs"])
    dense, sparse, colbert = tiny_model.run_ids(good, ["dense_vecs"])
    assert sparse is None and colbert is None
    np.testing.assert_array_equal(dense, tiny_model.encode(["a b c"])["dense_vecs"])


def test_auto_moves_to_cuda_only_when_nothing_says_where(tiny, monkeypatch):
    manifest = load_manifest(tiny[1])
    onnxruntime = ENGINES["onnxruntime"]
    monkeypatch.setitem(ENGINES, "onnxruntime", dataclasses.replace(onnxruntime, unavailable=lambda d: None))
    assert resolve(manifest, backend="auto").device == ("cuda", 0)
    assert resolve(manifest, backend="auto", providers=["CPUExecutionProvider"]).device == ("cpu", 0)
    assert resolve(manifest, backend="auto", providers=[("CUDAExecutionProvider", {"device_id": 2})]).device == (
        "cuda",
        2,
    )
    monkeypatch.setitem(
        ENGINES, "onnxruntime", dataclasses.replace(onnxruntime, unavailable=lambda d: f"no {d.kind} here")
    )
    with pytest.raises(ArtifactError, match=r"no engine can run fp32 here \(onnxruntime on cuda:0: no cuda here; "):
        resolve(manifest, backend="auto")
