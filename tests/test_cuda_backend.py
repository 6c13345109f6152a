"""The GPU serving path: the fused export, the ONNX Runtime CUDA backend's errors, its IOBinding path,
and the device branch of post-processing.

What runs here (no GPU, the CPU build of onnxruntime): the fused export on the tiny model, the real
errors of asking this onnxruntime for CUDA, the CUDA backend's IOBinding code on ONNX Runtime's CPU
provider (`tests/host_device.py`: real sessions, bindings and OrtValues on host memory), and the
post-processor's device path over host memory. The `gpu` tests (deselected by default; run
with `-m gpu` on a machine with onnxruntime-gpu and a GPU) compare ONNX Runtime CUDA with the CPU.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from m3rt import ArtifactError, BackendError, BackendOutOfMemory, M3Error, M3Model
from m3rt.backends.onnxruntime import OnnxRuntimeBackend, backend_error
from m3rt.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend, cuda_unavailable_reason
from m3rt.device_array import DeviceArray
from m3rt.export.artifact import ExportOptions, export_artifact
from m3rt.export.onnx_graph import export_graph
from m3rt.fidelity import DEFAULT_GATES, REFERENCE_GATE, compare_outputs
from m3rt.placement import parse_device, select_graph
from m3rt.postprocess import OutputCollector, PostProcessor
from m3rt.scheduler import pad_batch

import reference_rules
from fake_backend import FakeBackend
from host_device import HostArray, HostDevice, HostPointerKernels

ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)


@pytest.fixture(scope="module")
def fused(tiny, tmp_path_factory):
    """The tiny checkpoint exported with the plain fp16 and the fused fp16 graphs."""
    out = tmp_path_factory.mktemp("fused") / "artifact"
    export_artifact(ExportOptions(model=str(tiny[0]), output=out, fp16=True, fused=True))
    return out


def _assert_same(got: dict, want: dict, atol: float = 0.0) -> None:
    np.testing.assert_allclose(got["dense_vecs"], want["dense_vecs"], rtol=0, atol=atol)
    assert len(got["colbert_vecs"]) == len(want["colbert_vecs"])
    for g, w in zip(got["colbert_vecs"], want["colbert_vecs"]):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=0, atol=atol)
    for g, w in zip(got["lexical_weights"], want["lexical_weights"]):
        assert list(g) == list(w)  # same keys in the same order
        np.testing.assert_allclose([g[k] for k in w], [w[k] for k in w], rtol=0, atol=atol)


# ---------------------------------------------------------------------- export


def test_fused_graph_is_in_the_manifest_for_cuda_only(fused):
    data = json.loads((fused / "m3rt.json").read_text())
    entry = data["graphs"]["fp16-fused"]
    assert entry["file"] == "model.fp16.fused.onnx" and entry["precision"] == "fp16"
    assert entry["execution_provider"] == "CUDAExecutionProvider" and entry["backends"] == ["onnxruntime-cuda"]
    for file in entry["files"]:
        assert file in data["files"]
    # num_heads and hidden_size come from the checkpoint's config (tiny: 4 heads, 64 wide, 2 layers).
    assert entry["optimizer"]["num_heads"] == 4 and entry["optimizer"]["hidden_size"] == 64
    ops = entry["optimizer"]["fused_operators"]
    assert ops["Attention"] == 2 and ops["SkipLayerNormalization"] == 4 and ops["BiasGelu"] == 2
    assert entry["warnings"] == []
    # The fused fp32 graph was checked against PyTorch with the plain export's tolerance.
    assert not REFERENCE_GATE.failures(entry["validation"])
    assert entry["fidelity"]["passed"] and "gpu_check" in entry["fidelity"]["measured_on"]["arithmetic"]


def test_fused_file_is_fp16_with_the_fused_ops(fused):
    model = onnx.load(str(fused / "model.fp16.fused.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"Attention", "SkipLayerNormalization", "BiasGelu"} <= ops
    assert "Softmax" not in ops  # inside the fused Attention
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in model.graph.initializer if len(t.dims) == 2}
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)


def _with_one_attention_block_unfusable(export_graph):
    """The exporter, with one more node (x * 1) before the last layer's Softmax: the same model, but an
    attention subgraph the optimizer's pattern no longer matches (as a different exporter's would)."""
    from onnx import helper, numpy_helper

    def export(reference, out_path, **kwargs):
        files = export_graph(reference, out_path, **kwargs)
        model = onnx.load(str(out_path))
        softmax = [n for n in model.graph.node if n.op_type == "Softmax"][-1]
        model.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "test_one"))
        scale = helper.make_node("Mul", [softmax.input[0], "test_one"], ["test_scaled"], name="test_mul")
        softmax.input[0] = "test_scaled"
        model.graph.node.insert(list(model.graph.node).index(softmax), scale)
        onnx.save(model, str(out_path))
        return files

    return export


def test_an_attention_block_left_unfused_fails_the_export(tiny, tmp_path, monkeypatch):
    import m3rt.export.artifact as artifact_module
    from m3rt.export.fused import FusionError

    monkeypatch.setattr(artifact_module, "export_graph", _with_one_attention_block_unfusable(export_graph))
    out = tmp_path / "artifact"
    # The CPU flash-attention rewrite matches the exporter's attention pattern too: left out here.
    plain = dict(model=str(tiny[0]), output=out, flash_attention=False)
    with pytest.raises(FusionError, match=r"fused 1 of 2 attention blocks"):
        export_artifact(ExportOptions(**plain, fused=True, fused_cpu_fidelity=False))
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written is left to serve
    # Without --fused the same graph exports (it is a correct graph, only not fusable).
    export_artifact(ExportOptions(**plain))
    assert (out / "m3rt.json").is_file()


def test_the_cpu_never_runs_the_cuda_only_graph(fused):
    model = M3Model.load(fused, precision="fp16")
    assert model.backend.graph_path.name == "model.fp16.onnx"  # the plain fp16 graph
    with pytest.raises(ArtifactError, match="built for ONNX Runtime's CUDAExecutionProvider"):
        M3Model.load(fused, precision="fp16-fused")
    manifest = model.manifest
    assert select_graph(manifest, "fp16", "cpu") == "fp16"
    assert select_graph(manifest, "fp16", "cuda") == "fp16-fused"
    assert select_graph(manifest, "fp32", "cuda") == "fp32"


def test_artifacts_without_a_fused_graph_still_load(tiny):
    model = M3Model.load(tiny[1])
    assert not model.manifest.has_graph("fp16-fused")
    assert select_graph(model.manifest, "fp32", "cuda") == "fp32"
    with pytest.raises(ArtifactError, match="no 'fp16' graph"):
        select_graph(model.manifest, "fp16", "cuda")


def test_device_strings():
    assert parse_device(None) == ("cpu", 0)
    assert parse_device("cuda:2") == ("cuda", 2)
    assert parse_device(None, [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]) == ("cuda", 1)
    with pytest.raises(ArtifactError, match="expected 'cpu', 'cuda' or 'cuda:N'"):
        parse_device("gpu")


# ---------------------------------------------------------------------- errors (for real, on this machine)

needs_cpu_build = pytest.mark.skipif(
    "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
    reason="this onnxruntime has the CUDA provider",
)


@needs_cpu_build
@pytest.mark.parametrize(
    "kwargs", [dict(device="cuda"), dict(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])]
)
def test_asking_the_cpu_build_for_cuda_says_which_package_to_install(fused, kwargs):
    with pytest.raises(BackendError) as info:
        M3Model.load(fused, precision="fp16", **kwargs)
    text = str(info.value)
    assert "the installed onnxruntime is the CPU build" in text
    assert "pip uninstall onnxruntime && pip install 'm3rt[gpu]'" in text


@needs_cpu_build
def test_no_visible_gpu_is_named(monkeypatch):
    # onnxruntime-gpu on a machine without a GPU lists the CUDA provider; the GPU check must then
    # say that no GPU is visible (cudaGetDeviceCount, for real, through cuda-python).
    pytest.importorskip("cuda.bindings")
    from m3rt.kernels.cuda_api import gpu_unavailable_reason

    if gpu_unavailable_reason() is None:
        pytest.skip("a GPU is visible here")
    import onnxruntime

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    reason = cuda_unavailable_reason()
    assert reason is not None and "no CUDA GPU is visible" in reason


@pytest.mark.parametrize(
    "message",
    [
        # ONNX Runtime's BFC arena and CUDA allocator, cuBLAS workspace, the CPU allocator.
        "Failed to allocate memory for requested buffer of size 4294967296",
        "CUDA failure 2: out of memory ; GPU=0 ; hostname=h ; file=cuda_allocator.cc",
        "CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED",
        "std::bad_alloc",
    ],
)
def test_onnxruntime_out_of_memory_errors_are_typed_so_the_batch_is_split(message):
    error = backend_error(RuntimeError(message), (8, 512))
    assert isinstance(error, BackendOutOfMemory) and "out of memory" in str(error)
    other = backend_error(RuntimeError("Non-zero status code returned while running Gather node"), (8, 512))
    assert isinstance(other, BackendError) and not isinstance(other, BackendOutOfMemory)


def test_cuda_allocation_failures_are_typed_whatever_their_text():
    """What TensorRT's backend and the device kernels see: cuda-python's (error code, values) tuples,
    with each API's own codes (cuda-python's enums are the reference: NVRTC's out of memory is 1, its 2
    is a program creation failure)."""
    pytest.importorskip("cuda.bindings")
    from cuda.bindings import driver, nvrtc, runtime

    from m3rt.kernels.cuda_api import check, check_driver
    from m3rt.kernels.device import _nvrtc_call

    with pytest.raises(BackendOutOfMemory, match="cudaErrorMemoryAllocation"):
        check((runtime.cudaError_t.cudaErrorMemoryAllocation, None))
    with pytest.raises(BackendOutOfMemory, match="CUDA_ERROR_OUT_OF_MEMORY"):
        check_driver((driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY, None))
    with pytest.raises(BackendOutOfMemory, match="NVRTC_ERROR_OUT_OF_MEMORY"):
        _nvrtc_call(nvrtc, (nvrtc.nvrtcResult.NVRTC_ERROR_OUT_OF_MEMORY, None), "nvrtcCompileProgram")
    for failure in (
        lambda: _nvrtc_call(nvrtc, (nvrtc.nvrtcResult.NVRTC_ERROR_PROGRAM_CREATION_FAILURE, None), "create"),
        lambda: check((runtime.cudaError_t.cudaErrorIllegalAddress, None)),
    ):
        with pytest.raises(BackendError) as raised:
            failure()
        assert not isinstance(raised.value, BackendOutOfMemory), raised.value
    assert check((runtime.cudaError_t.cudaSuccess, 42)) == 42


def test_an_out_of_memory_batch_is_split_and_nothing_is_lost(tiny_model, texts):
    backend = FakeBackend(tiny_model.backend, thread_safe=False, out_of_memory_above=lambda ids: len(ids) > 3)
    model = M3Model(tiny_model.manifest, backend, tiny_model.tokenizer)
    got = model.encode(texts, batch_size=16, **ALL)
    rows = [n for n, _ in backend.calls]
    assert max(rows) == 16 and any(n <= 3 for n in rows)
    want = tiny_model.encode(texts, batch_size=3, **ALL)
    _assert_same(got, want, atol=1e-6)


# ---------------------------------------------------------------------- the IOBinding path on ORT CPU


def _host_kernels(model: M3Model, **options) -> PostProcessor:
    """The post-processor with `HostPointerKernels` as the device kernels of every "GPU"."""
    kernels = HostPointerKernels()
    return PostProcessor(model.unused_ids, device_kernels=lambda device: kernels, **options)


@pytest.fixture(scope="module")
def iobinding_models(fused):
    """The CUDA backend's IOBinding code on ONNX Runtime CPU vs plain session.run, same graph."""
    reference = M3Model.load(fused)
    graph = fused / "model.fp16.fused.onnx"  # the CPU provider runs the contrib ops too
    backend = OnnxRuntimeCudaBackend(graph, device=HostDevice(), pad_id=reference.pad_id, graph_buckets=(8, 16, 32))
    bound = M3Model(reference.manifest, backend, reference.tokenizer, postprocessor=_host_kernels(reference))
    plain = M3Model(reference.manifest, OnnxRuntimeBackend(graph), reference.tokenizer)
    yield bound, plain
    bound.close()  # its graph worker thread


def test_iobinding_path_matches_session_run(iobinding_models, texts):
    bound, plain = iobinding_models
    for batch_size in (1, 4, 64):
        _assert_same(
            bound.encode(texts, batch_size=batch_size, **ALL), plain.encode(texts, batch_size=batch_size, **ALL)
        )
    csr = bound.encode(texts, batch_size=4, sparse_format="csr", **ALL)["lexical_weights"]
    want = plain.encode(texts, batch_size=4, sparse_format="csr", **ALL)["lexical_weights"]
    assert np.array_equal(csr.indptr, want.indptr) and np.array_equal(csr.indices, want.indices)


def test_padded_buckets_give_the_unpadded_outputs(iobinding_models):
    bound, plain = iobinding_models
    backend = bound.backend
    before = backend.graph_buckets
    for text in ("hi", "BGE-M3 is an embedding model", "word " * 12, "word " * 40):
        _assert_same(bound.encode([text], **ALL), plain.encode([text], **ALL))
    ran = {k: runs - before[k] for k, runs in backend.graph_buckets.items()}
    assert ran[8] >= 1 and ran[16] >= 1 and ran[32] >= 1  # each bucket served one query; the longest none


def test_outputs_are_device_arrays_that_outlive_later_runs(iobinding_models):
    bound, _ = iobinding_models
    backend = bound.backend
    ids = np.array([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]], dtype=np.int64)
    mask = (ids != 1).astype(np.int64)
    first = backend.run(ids, mask, ("dense_vecs", "sparse_weights", "colbert_vecs"))
    assert all(isinstance(v, DeviceArray) for v in first.values())  # raw: nothing reduced by the backend
    assert first["dense_vecs"].shape == (2, 64)
    assert first["sparse_weights"].shape == (2, 5) and first["colbert_vecs"].shape[:2] == (2, 4)
    snapshot = first["colbert_vecs"].to_host()
    assert np.array_equal(first["sparse_weights"].batch_inputs[0].to_host(), ids)
    for _ in range(3):  # later batches get their own buffers: the first results stay intact
        backend.run(ids[:, ::-1].copy(), mask, ("dense_vecs", "sparse_weights", "colbert_vecs"))
    assert np.array_equal(first["colbert_vecs"].to_host(), snapshot)
    assert np.array_equal(first["sparse_weights"].batch_inputs[0].to_host(), ids)


def test_a_graph_enabled_session_runs_on_one_thread_whoever_calls(fused, iobinding_models, texts, monkeypatch):
    # ONNX Runtime keeps CUDA graphs per thread: every run must come from the backend's own worker.
    import threading

    class RecordingDevice(HostDevice):
        """Records the thread of every run (the backend activates its device first thing in a run)."""

        seen: set[str] = set()

        def activate(self) -> None:
            self.seen.add(threading.current_thread().name)

    bound, _ = iobinding_models
    backend = OnnxRuntimeCudaBackend(fused / "model.fp16.fused.onnx", device=RecordingDevice(), graph_buckets=(8,))
    model = M3Model(bound.manifest, backend, bound.tokenizer, postprocessor=_host_kernels(bound))
    monkeypatch.setattr("m3rt.pipeline.CHUNK_TEXTS", 9)  # the threaded pipeline: a backend thread per call
    threads = [threading.Thread(target=model.encode, args=(texts,), kwargs=dict(batch_size=2, **ALL)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    model.encode("a query", **ALL)
    model.close()
    seen = RecordingDevice.seen
    assert len(seen) == 1 and next(iter(seen)).startswith("m3rt-onnxruntime")


def test_host_post_processing_when_device_post_processing_is_off(fused, iobinding_models, texts):
    bound, plain = iobinding_models
    kernels = HostPointerKernels()
    post = PostProcessor(bound.unused_ids, device_postprocess=False, device_kernels=lambda device: kernels)
    backend = OnnxRuntimeCudaBackend(fused / "model.fp16.fused.onnx", device=HostDevice(), cuda_graph=False)
    assert backend.graph_buckets == {}
    model = M3Model(bound.manifest, backend, bound.tokenizer, postprocessor=post)
    _assert_same(model.encode(texts, batch_size=4, **ALL), plain.encode(texts, batch_size=4, **ALL))
    assert kernels.calls == {"aggregate_sparse": 0, "compact_colbert": 0}


@pytest.mark.parametrize("device_postprocess", [True, False])
def test_colbert_fp16_is_float16_on_every_path(fused, iobinding_models, device_postprocess):
    bound, plain = iobinding_models
    post = _host_kernels(bound, colbert_fp16=True, device_postprocess=device_postprocess)
    model = M3Model(bound.manifest, bound.backend, bound.tokenizer, postprocessor=post)
    texts = ["a short query", "word " * 80, "x"]
    bucketed = model.encode(texts[0], return_colbert_vecs=True)["colbert_vecs"]
    batched = model.encode(texts[1:], return_colbert_vecs=True)["colbert_vecs"]
    assert bucketed.dtype == np.float16 and all(v.dtype == np.float16 for v in batched)
    want = plain.encode(texts, return_colbert_vecs=True)["colbert_vecs"]
    for got, full in zip([bucketed, *batched], want):
        assert np.array_equal(got, full.astype(np.float16))  # one rounding, as numpy's


def test_close_releases_the_device_and_the_kernels(fused, iobinding_models, texts):
    bound, _ = iobinding_models
    kernels = HostPointerKernels()
    device = HostDevice()
    backend = OnnxRuntimeCudaBackend(fused / "model.fp16.fused.onnx", device=device, graph_buckets=(8,))
    post = PostProcessor(bound.unused_ids, device_kernels=lambda d: kernels)
    with M3Model(bound.manifest, backend, bound.tokenizer, postprocessor=post) as model:
        model.encode(texts, batch_size=4, **ALL)
        assert kernels.calls["aggregate_sparse"] > 0
    assert device.closed and kernels.closed


# ---------------------------------------------------------------------- the post-processing seam


def _host_device_array(array: np.ndarray, batch_inputs: tuple | None = None) -> HostArray:
    array = np.ascontiguousarray(array)
    return HostArray(array.ctypes.data, array.shape, array.dtype, 0, owner=array, batch_inputs=batch_inputs)


def _seam_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = [7, 3, 5, 1]
    ids = [np.concatenate(([0], rng.integers(3, 40, n - 2), [2])) if n > 1 else np.array([0]) for n in lengths]
    batch = pad_batch(ids, np.arange(len(ids)), pad_id=1)
    shape = batch.input_ids.shape
    sparse = rng.standard_normal(shape).astype(np.float32)
    colbert = rng.standard_normal((shape[0], shape[1] - 1, 6)).astype(np.float32)
    dense = rng.standard_normal((shape[0], 6)).astype(np.float32)
    return lengths, batch, dense, sparse, colbert


def _collect(batch, values, post: PostProcessor):
    collector = OutputCollector(len(batch.indices), 6, ("dense_vecs", "sparse_weights", "colbert_vecs"), post)
    collector.add(batch, values)
    return collector.finish()


@pytest.mark.parametrize("colbert_fp16", [False, True])
def test_device_arrays_go_to_the_kernels_numpy_arrays_to_the_cpu_path(colbert_fp16):
    lengths, batch, dense, sparse, colbert = _seam_case()
    kernels = HostPointerKernels()
    post = PostProcessor((0, 1, 2, 3), colbert_fp16=colbert_fp16, device_kernels=lambda device: kernels)
    inputs = (_host_device_array(batch.input_ids), _host_device_array(batch.attention_mask))
    on_device = {
        "dense_vecs": _host_device_array(dense, inputs),
        "sparse_weights": _host_device_array(sparse, inputs),
        "colbert_vecs": _host_device_array(colbert, inputs),
    }
    d1, s1, c1 = _collect(batch, on_device, post)
    assert kernels.calls == {"aggregate_sparse": 1, "compact_colbert": 1}  # reduced by the kernels
    d2, s2, c2 = _collect(batch, {"dense_vecs": dense, "sparse_weights": sparse, "colbert_vecs": colbert}, post)
    assert kernels.calls == {"aggregate_sparse": 1, "compact_colbert": 1}  # host arrays never reach them
    assert np.array_equal(d1, dense) and np.array_equal(d2, dense)
    # Both paths against FlagEmbedding's rules written out independently (tests/reference_rules.py).
    dtype = np.float16 if colbert_fp16 else np.float32
    for row, n in enumerate(lengths):
        want = reference_rules.lexical_weights(sparse[row, :n], batch.input_ids[row, :n], {0, 1, 2, 3})
        for got in (s1.to_dicts()[row], s2.to_dicts()[row]):
            assert list(got) == list(want) and all(np.float32(got[k]) == np.float32(w) for k, w in want.items())
        rows = reference_rules.colbert_rows(colbert[row], batch.attention_mask[row])
        assert c1[row].dtype == dtype and c2[row].dtype == dtype
        assert np.array_equal(c1[row], rows.astype(dtype)) and np.array_equal(c2[row], rows.astype(dtype))


def test_outputs_the_kernels_cannot_read_are_reduced_on_the_host():
    """Outputs without their batch's device inputs, outputs padded past the batch (a fixed-shape run)
    and float16 outputs all go through the host heads, with the host heads' results."""
    lengths, batch, dense, sparse, colbert = _seam_case(1)
    kernels = HostPointerKernels()
    post = PostProcessor((0, 1, 2, 3), device_kernels=lambda device: kernels)
    _, want_sparse, want_colbert = _collect(
        batch, {"dense_vecs": dense, "sparse_weights": sparse, "colbert_vecs": colbert}, post
    )
    inputs = (_host_device_array(batch.input_ids), _host_device_array(batch.attention_mask))
    # Positions past the batch's length hold what a padded run would; they must never be read.
    pad = len(lengths), 5
    padded_sparse = np.concatenate([sparse, np.full(pad, 9.0, np.float32)], axis=1)
    padded_colbert = np.concatenate([colbert, np.full((*pad, 6), 9.0, np.float32)], axis=1)
    cases = {
        "no device inputs": (_host_device_array(sparse), _host_device_array(colbert)),
        "padded, host": (padded_sparse, padded_colbert),
        "padded, device": (_host_device_array(padded_sparse, inputs), _host_device_array(padded_colbert, inputs)),
    }
    for case, (sparse_values, colbert_values) in cases.items():
        _, got_sparse, got_colbert = _collect(
            batch, {"dense_vecs": dense, "sparse_weights": sparse_values, "colbert_vecs": colbert_values}, post
        )
        assert got_sparse.to_dicts() == want_sparse.to_dicts(), case
        assert all(np.array_equal(g, w) for g, w in zip(got_colbert, want_colbert)), case
    half = {
        "dense_vecs": dense,
        "sparse_weights": sparse.astype(np.float16),
        "colbert_vecs": colbert.astype(np.float16),
    }
    on_device = {k: _host_device_array(v, inputs) for k, v in half.items()}
    widened = {k: v.astype(np.float32) for k, v in half.items()}
    (_, s16, c16), (_, s32, c32) = _collect(batch, on_device, post), _collect(batch, widened, post)
    assert s16.to_dicts() == s32.to_dicts() and all(np.array_equal(g, w) for g, w in zip(c16, c32))
    assert kernels.calls == {"aggregate_sparse": 0, "compact_colbert": 0}


class _ScarceMemoryKernels(HostPointerKernels):
    """Device kernels whose scratch fits at most `max_rows` rows, and never for outputs at `never`."""

    def __init__(self, max_rows: int, never: set[int]) -> None:
        super().__init__()
        self.max_rows, self.never, self.rows_seen = max_rows, never, []

    def _fits(self, ptr: int, rows: int) -> None:
        self.rows_seen.append(rows)
        if rows > self.max_rows or ptr in self.never:
            raise BackendOutOfMemory("CUDA error 2 (cudaErrorMemoryAllocation)")

    def aggregate_sparse(self, weights_ptr, input_ids_ptr, attention_mask_ptr, shape, special_ids, stream=None):
        self._fits(weights_ptr, int(shape[0]))
        return super().aggregate_sparse(weights_ptr, input_ids_ptr, attention_mask_ptr, shape, special_ids, stream)

    def compact_colbert(self, colbert_ptr, shape, counts, stream=None, fp16=False):
        self._fits(colbert_ptr, int(shape[0]))
        return super().compact_colbert(colbert_ptr, shape, counts, stream, fp16)


def test_device_scratch_out_of_memory_splits_the_rows_and_loses_nothing():
    lengths, batch, dense, sparse, colbert = _seam_case(2)
    inputs = (_host_device_array(batch.input_ids), _host_device_array(batch.attention_mask))
    on_device = {
        "dense_vecs": _host_device_array(dense, inputs),
        "sparse_weights": _host_device_array(sparse, inputs),
        "colbert_vecs": _host_device_array(colbert, inputs),
    }
    # Row 3 never fits (its halves end at one row): it is reduced on the host, the rest on the "device".
    never = {on_device["sparse_weights"].rows(3, 4).ptr, on_device["colbert_vecs"].rows(3, 4).ptr}
    kernels = _ScarceMemoryKernels(max_rows=1, never=never)
    post = PostProcessor((0, 1, 2, 3), device_kernels=lambda device: kernels)
    _, got_sparse, got_colbert = _collect(batch, on_device, post)
    assert sorted(set(kernels.rows_seen)) == [1, 2, 4]
    for row, n in enumerate(lengths):  # FlagEmbedding's rules, written out independently
        want = reference_rules.lexical_weights(sparse[row, :n], batch.input_ids[row, :n], {0, 1, 2, 3})
        got = got_sparse.to_dicts()[row]
        assert list(got) == list(want) and all(np.float32(got[k]) == np.float32(w) for k, w in want.items())
        assert np.array_equal(got_colbert[row], reference_rules.colbert_rows(colbert[row], batch.attention_mask[row]))


def test_device_rows_are_views_of_the_same_memory():
    source = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    ids = np.arange(12, dtype=np.int64).reshape(4, 3)
    device = _host_device_array(source, (_host_device_array(ids), _host_device_array(ids)))
    part = device.rows(1, 3)
    assert part.shape == (2, 3, 2) and np.array_equal(part.to_host(), source[1:3])
    assert np.array_equal(part.batch_inputs[0].to_host(), ids[1:3]) and part.owner is device.owner
    assert device.rows(3, 9).shape == (1, 3, 2) and device.rows(4, 4).shape == (0, 3, 2)


@pytest.mark.parametrize("failure", [AttributeError("module 'cuda.bindings.driver' has no attribute 'cuLaunchKernel'"),
                                     BackendError("libnvrtc was not found")])  # fmt: skip
def test_any_device_kernel_setup_failure_falls_back_to_host_post_processing(fused, iobinding_models, texts, failure):
    bound, plain = iobinding_models

    def broken(device: int):
        raise failure

    backend = OnnxRuntimeCudaBackend(fused / "model.fp16.fused.onnx", device=HostDevice(), cuda_graph=False)
    post = PostProcessor(bound.unused_ids, device_kernels=broken)
    with M3Model(bound.manifest, backend, bound.tokenizer, postprocessor=post) as model:  # load does not abort
        assert any(type(failure).__name__ in note and "copied to the host" in note for note in model.notes)
        _assert_same(model.encode(texts, batch_size=4, **ALL), plain.encode(texts, batch_size=4, **ALL))
        assert post.active_devices == []


def test_a_device_array_converts_by_copying():
    source = np.arange(6, dtype=np.float32).reshape(2, 3)
    device = _host_device_array(source)
    copied = np.asarray(device)
    assert np.array_equal(copied, source) and copied.ctypes.data != source.ctypes.data
    assert device.nbytes == 24


# ---------------------------------------------------------------------- on a GPU (-m gpu)

gpu = pytest.mark.gpu


def _cuda_or_skip():
    reason = cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@gpu
def test_cuda_fused_fp16_within_the_fp16_gates_of_cpu_fp32(fused, texts):
    _cuda_or_skip()
    cuda = M3Model.load(fused, precision="fp16", device="cuda")
    assert cuda.backend.graph_path.name == "model.fp16.fused.onnx"
    assert "CUDAExecutionProvider" in cuda.backend.providers
    cpu = M3Model.load(fused)
    got, want = cuda.encode(texts, batch_size=8, **ALL), cpu.encode(texts, batch_size=8, **ALL)
    figures = compare_outputs(got, want)
    assert not DEFAULT_GATES["fp16"].failures(figures), figures
    assert figures["colbert_cos_mean"] > 0.999 and figures["sparse_top10_overlap"] > 0.9


@gpu
def test_cuda_graph_buckets_match_the_plain_cuda_path(fused):
    _cuda_or_skip()
    graphs = M3Model.load(fused, precision="fp16", device="cuda", backend_options={"cuda_graph": True})
    plain = M3Model.load(fused, precision="fp16", device="cuda", backend_options={"cuda_graph": False})
    assert graphs.backend.cuda_graph, graphs.backend.notes
    queries = ["hi", "BGE-M3 is an embedding model", "word " * 40, "word " * 200]
    captured = sum(graphs.backend.graph_buckets.values())  # the graphs were captured at load
    assert captured == 3 * len(graphs.backend.graph_buckets)
    for _ in range(4):  # replays
        got = graphs.encode(queries, batch_size=1, **ALL)
    lengths = [len(x) for x in graphs.tokenizer.encode(queries, max_length=8192).ids]
    assert sum(graphs.backend.graph_buckets.values()) - captured == 4 * sum(n <= 64 for n in lengths)
    figures = compare_outputs(got, plain.encode(queries, batch_size=1, **ALL))
    assert figures["dense_cos_min"] > 0.9999 and figures["colbert_cos_min"] > 0.999, figures


@gpu
@pytest.mark.parametrize("colbert_fp16", [False, True])
def test_device_post_processing_equals_host_post_processing_of_the_same_outputs(fused, texts, colbert_fp16):
    _cuda_or_skip()
    model = M3Model.load(
        fused, precision="fp16", device="cuda", colbert_fp16=colbert_fp16, backend_options={"cuda_graph": False}
    )
    ids = model.tokenizer.encode(texts, max_length=512).ids
    batch = pad_batch(ids, np.arange(len(ids)), model.pad_id)
    outputs = ("dense_vecs", "sparse_weights", "colbert_vecs")
    values = model.backend.run(batch.input_ids, batch.attention_mask, outputs)
    assert isinstance(values["sparse_weights"], DeviceArray) and isinstance(values["colbert_vecs"], DeviceArray)
    host = {k: v.to_host() for k, v in values.items()}
    on_host = PostProcessor(model.unused_ids, colbert_fp16=colbert_fp16, device_postprocess=False)
    results = []
    for vals, post in ((values, model.postprocessor), (host, on_host)):
        collector = OutputCollector(len(ids), model.manifest.hidden_size, outputs, post)
        collector.add(batch, vals)
        results.append(collector.finish())
    assert model.postprocessor.kernels_for(0) is not None, model.postprocessor.notes
    (d1, s1, c1), (d2, s2, c2) = results
    assert np.array_equal(d1, d2)
    assert np.array_equal(s1.indptr, s2.indptr) and np.array_equal(s1.indices, s2.indices)
    assert np.array_equal(s1.values.view(np.uint32), s2.values.view(np.uint32))
    for a, b in zip(c1, c2):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@gpu
def test_cuda_fp32_plain_graph_matches_cpu_fp32(fused, texts):
    _cuda_or_skip()
    cuda = M3Model.load(
        fused,
        device="cuda",
        providers=[("CUDAExecutionProvider", {"use_tf32": 0})],
        backend_options={"cuda_graph": False},
    )
    figures = compare_outputs(
        cuda.encode(texts, batch_size=8, **ALL), M3Model.load(fused).encode(texts, batch_size=8, **ALL)
    )
    assert figures["dense_cos_min"] > 0.99999 and figures["colbert_cos_min"] > 0.9999


# ---------------------------------------------------------------------- memory safety of the bound path


def _backend_on(device: str, graph, pad_id: int, **options):
    if device == "cpu":
        return OnnxRuntimeCudaBackend(graph, device=HostDevice(), pad_id=pad_id, **options)
    _cuda_or_skip()
    return OnnxRuntimeCudaBackend(graph, pad_id=pad_id, **options)


def _postprocessor_on(device: str, **options) -> PostProcessor:
    if device == "cpu":
        kernels = HostPointerKernels()
        return PostProcessor((0, 1, 2, 3), device_kernels=lambda d: kernels, **options)
    return PostProcessor((0, 1, 2, 3), **options)


def _padded(lengths, pad_id: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [np.concatenate(([0], rng.integers(5, 200, n - 2), [2])) for n in lengths]
    return pad_batch(ids, np.arange(len(ids)), pad_id)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_held_outputs_of_a_plain_batch_survive_bucket_replays(fused, device):
    """A plain batch's device outputs wait for post-processing while later batch-1 queries replay
    their CUDA graphs: the replays must not write where the held outputs live."""
    from m3rt.manifest import OUTPUT_NAMES, load_manifest

    manifest = load_manifest(fused)
    pad_id = manifest.special_tokens["pad"]
    backend = _backend_on(device, manifest.graph_path("fp16-fused"), pad_id, graph_buckets=(16, 32, 64))
    batch = _padded([41, 37, 29, 12], pad_id)
    held = backend.run(batch.input_ids, batch.attention_mask, OUTPUT_NAMES)
    snapshot = {name: np.array(value) for name, value in held.items()}
    for n in (9, 20, 31, 60):  # every bucket replays at least once
        query = _padded([n], pad_id, seed=n)
        backend.run(query.input_ids, query.attention_mask, OUTPUT_NAMES)
    for name, value in held.items():
        assert np.array_equal(np.array(value), snapshot[name]), name
    # ...and post-processing the held outputs gives what the snapshot gives on the host.
    collected = OutputCollector(4, manifest.hidden_size, OUTPUT_NAMES, _postprocessor_on(device))
    collected.add(batch, held)
    expected = OutputCollector(
        4, manifest.hidden_size, OUTPUT_NAMES, _postprocessor_on(device, device_postprocess=False)
    )
    expected.add(batch, snapshot)
    (d1, s1, c1), (d2, s2, c2) = collected.finish(), expected.finish()
    assert np.array_equal(d1, d2) and s1.to_dicts() == s2.to_dicts()
    assert all(np.array_equal(a, b) for a, b in zip(c1, c2))
    backend.close()


@pytest.mark.parametrize("rows,length", [(1, 7), (3, 5), (2, 64)])
def test_both_bound_inputs_are_256_byte_aligned_apart(fused, rows, length):
    from m3rt.manifest import OUTPUT_NAMES, load_manifest

    manifest = load_manifest(fused)
    pad_id = manifest.special_tokens["pad"]
    backend = _backend_on("cpu", manifest.graph_path("fp16-fused"), pad_id, cuda_graph=False)
    batch = _padded([length] * rows, pad_id)
    outputs = backend.run(batch.input_ids, batch.attention_mask, OUTPUT_NAMES)
    input_ids, attention_mask = outputs["sparse_weights"].batch_inputs
    assert (attention_mask.ptr - input_ids.ptr) % 256 == 0
    assert np.array_equal(input_ids.to_host(), batch.input_ids)
    assert np.array_equal(attention_mask.to_host(), batch.attention_mask)


@pytest.mark.parametrize("gpu_visible", [True, False])
def test_auto_backend_picks_onnxruntime_cuda_when_it_can_run(fused, monkeypatch, gpu_visible):
    import m3rt.backends.onnxruntime_cuda as ort_backends
    from m3rt.manifest import load_manifest
    from m3rt.placement import create_backend, resolve

    manifest = load_manifest(fused)
    made = []

    class Recorded:
        def __init__(self, graph, **kwargs):
            made.append((graph.name, kwargs["device_id"]))

    monkeypatch.setattr(ort_backends, "cuda_unavailable_reason", lambda: None if gpu_visible else "no GPU")
    monkeypatch.setattr(ort_backends, "OnnxRuntimeCudaBackend", Recorded)
    backend = create_backend(manifest, resolve(manifest, "fp16", backend="auto"))
    if gpu_visible:
        assert isinstance(backend, Recorded) and made == [("model.fp16.fused.onnx", 0)]
    else:
        assert backend.name == "onnxruntime" and backend.graph_path.name == "model.fp16.onnx" and not made
    # An explicit device wins, and "onnxruntime" never moves to the GPU by itself.
    on_cpu = resolve(manifest, "fp16", "cpu", backend="auto")
    assert create_backend(manifest, on_cpu).graph_path.name == "model.fp16.onnx"
    assert create_backend(manifest, resolve(manifest, "fp16")).graph_path.name == "model.fp16.onnx"


def test_capture_gate_keeps_cuda_work_and_captures_apart():
    import threading

    from m3rt.kernels.cuda_api import CaptureGate

    gate, events = CaptureGate(), []
    release_capture = threading.Event()

    def capture():
        with gate.exclusive():
            events.append("capture starts")
            release_capture.wait(5)
            events.append("capture ends")

    def late_work():
        with gate.shared():
            events.append("late work")

    with gate.shared():
        capturer = threading.Thread(target=capture)
        capturer.start()
        capturer.join(timeout=0.1)
        assert events == []  # the capture waits for CUDA work already running
        late = threading.Thread(target=late_work)
        late.start()
        late.join(timeout=0.1)
        assert events == []  # ...and new work waits behind the waiting capture
    capturer.join(timeout=0.1)
    assert events == ["capture starts"]  # no work runs while capturing
    release_capture.set()
    capturer.join(timeout=5)
    late.join(timeout=5)
    assert events == ["capture starts", "capture ends", "late work"]


def test_a_bad_option_at_load_releases_the_backend(fused, monkeypatch):
    import m3rt.backends.onnxruntime_cuda as ort_backends

    devices = []

    def host_backend(graph, **kwargs):
        devices.append(HostDevice())
        return OnnxRuntimeCudaBackend(graph, device=devices[-1], cuda_graph=False, pad_id=kwargs["pad_id"])

    monkeypatch.setattr(ort_backends, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(ort_backends, "OnnxRuntimeCudaBackend", host_backend)
    for bad in (dict(batch_size=0), dict(memory_budget="lots")):
        with pytest.raises(M3Error):
            M3Model.load(fused, precision="fp16", device="cuda", **bad)
        assert devices[-1].closed
