"""ONNX Runtime CUDA on the full-size model: accuracy against the PyTorch fp32 reference, and the
device paths against the host paths on the very same outputs (`pytest -m gpu`).

benchmarks/gpu_check.py exports the full-size synthetic model (BGE-M3's shape, the real XLM-R
tokenizer) and points these tests at it: M3RT_GPU_ARTIFACT (the artifact, with the fused fp16 graph)
and M3RT_GPU_CHECKPOINT (its source checkpoint, for the reference). With M3RT_GPU_FIGURES set to a
folder, each test also writes the figures it asserted on there, for the GPU check's report.
The same checks on the tiny model run in tests/test_cuda_backend.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from m3rt import M3Model
from m3rt.fidelity import DEFAULT_GATES, compare_outputs
from m3rt.manifest import OUTPUT_NAMES
from m3rt.postprocess import OutputCollector, PostProcessor
from m3rt.scheduler import pad_batch

pytestmark = pytest.mark.gpu
ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)


def _record(name: str, figures: dict) -> None:
    folder = os.environ.get("M3RT_GPU_FIGURES")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.json").write_text(json.dumps(figures, indent=2, default=float) + "\n")


@pytest.fixture(scope="module")
def full():
    artifact, checkpoint = os.environ.get("M3RT_GPU_ARTIFACT"), os.environ.get("M3RT_GPU_CHECKPOINT")
    if not artifact or not checkpoint:
        pytest.skip("M3RT_GPU_ARTIFACT / M3RT_GPU_CHECKPOINT not set (benchmarks/gpu_check.py sets them)")
    from m3rt.backends.onnxruntime_cuda import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    model = M3Model.load(artifact, precision="fp16", device="cuda", verify=False, token_budget=16384)
    yield model, Path(checkpoint)
    model.close()


@pytest.fixture(scope="module")
def texts(full):
    from m3rt.benchmarks.texts import TextFactory
    from m3rt.export.samples import sample_texts

    model, _ = full
    factory = TextFactory(model.tokenizer, seed=0)
    return sample_texts() + [factory.at_least(2048), factory.at_least(8190)]


def _collect(model: M3Model, batch, values, post: PostProcessor):
    collector = OutputCollector(len(batch.indices), model.manifest.hidden_size, OUTPUT_NAMES, post)
    collector.add(batch, values)
    return collector.finish()


def _identical(first, second) -> bool:
    (d1, s1, c1), (d2, s2, c2) = first, second
    return bool(
        np.array_equal(d1, d2)
        and np.array_equal(s1.indptr, s2.indptr)
        and np.array_equal(s1.indices, s2.indices)
        and np.array_equal(s1.values.view(np.uint32), s2.values.view(np.uint32))
        and all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(c1, c2))
    )


# The full-size gate of the fused fp16 graph against PyTorch fp32, all three outputs (the tiny model's
# in tests/test_cuda_backend.py): dense and ColBERT as the project's goal (cosine >= 0.999), each
# ColBERT vector not far off, sparse top-10 tokens and the kept tokens themselves mostly the same (a
# weight near zero may flip sides of the ReLU under fp16).
FULL_MODEL_LIMITS = {
    "dense_cos_min": 0.999,
    "colbert_cos_mean": 0.999,
    "colbert_cos_min": 0.99,
    "sparse_top10_overlap": 0.9,
    "sparse_jaccard": 0.95,
}


def below_limits(figures: dict, limits: dict = FULL_MODEL_LIMITS) -> list[str]:
    return [f"{name} {figures[name]:.5f} < {limit}" for name, limit in limits.items() if figures[name] < limit]


def test_fused_fp16_is_within_the_fp16_gates_of_pytorch_fp32(full, texts):
    from m3rt.benchmarks.runners import TorchBackend

    model, checkpoint = full
    assert model.backend.graph_path.name == "model.fp16.fused.onnx"
    reference = M3Model(model.manifest, TorchBackend(checkpoint, "cuda", fp16=False), model.tokenizer)
    try:
        want = reference.encode(texts, batch_size=8, max_length=8192, **ALL)
    finally:
        reference.close()  # its 2 GB of fp32 weights, before the next test loads more
    got = model.encode(texts, batch_size=8, max_length=8192, **ALL)
    # What is gated is what users get: reduced by the device kernels.
    device_reduced = model.postprocessor.active_devices == [model.backend.device_id]
    figures = compare_outputs(got, want)
    gate = DEFAULT_GATES["fp16"]
    _record(
        "fused_fp16_vs_pytorch_fp32",
        {
            **figures,
            "texts": len(texts),
            "gate": gate.as_record(),
            "limits": FULL_MODEL_LIMITS,
            "device_postprocess": device_reduced,
        },
    )
    assert device_reduced, model.postprocessor.notes
    assert not gate.failures(figures), figures
    assert not below_limits(figures), (below_limits(figures), figures)


def test_device_post_processing_equals_host_post_processing(full, texts):
    """The device kernels against the host kernels on the very same raw outputs (exact), and the whole
    device path against an independent run: the same graph through ONNX Runtime CUDA's plain
    `session.run` (host arrays, no IOBinding, no buffers of ours) reduced on the host."""
    from m3rt.backends.onnxruntime import OnnxRuntimeBackend

    model, _ = full
    ids = model.tokenizer.encode(texts[:16], max_length=512).ids
    batch = pad_batch(ids, np.arange(len(ids)), model.pad_id)
    with model.backend.graphs_off():
        values = model.backend.run(batch.input_ids, batch.attention_mask, OUTPUT_NAMES)
    on_device = _collect(model, batch, values, model.postprocessor)
    assert model.postprocessor.active_devices == [model.backend.device_id], model.postprocessor.notes
    host = {name: value.to_host() for name, value in values.items()}
    host_post = PostProcessor(model.unused_ids, device_postprocess=False)
    on_host = _collect(model, batch, host, host_post)
    cuda = [("CUDAExecutionProvider", {"device_id": str(model.backend.device_id)}), "CPUExecutionProvider"]
    independent = OnnxRuntimeBackend(model.backend.graph_path, providers=cuda)
    assert "CUDAExecutionProvider" in independent.providers, independent.providers
    plain = _collect(model, batch, independent.run(batch.input_ids, batch.attention_mask, OUTPUT_NAMES), host_post)
    figures = compare_outputs(_as_encoded(on_device), _as_encoded(plain))
    _record("device_vs_host_postprocess", {"exact": _identical(on_device, on_host), "vs_session_run": figures})
    assert _identical(on_device, on_host)
    assert figures["dense_cos_min"] > 0.99999 and figures["colbert_cos_min"] > 0.9999, figures
    assert figures["sparse_jaccard"] > 0.99 and figures["sparse_weight_max_abs_err"] < 1e-2, figures


def _as_encoded(collected) -> dict:
    dense, sparse, colbert = collected
    return {"dense_vecs": dense, "lexical_weights": sparse.to_dicts(), "colbert_vecs": colbert}


def test_cuda_graph_buckets_match_plain_runs(full):
    from m3rt.benchmarks.texts import TextFactory

    model, _ = full
    assert model.backend.cuda_graph, model.backend.notes
    factory = TextFactory(model.tokenizer, seed=1)
    lengths = (5, 16, 30, 60)
    queries = [factory.at_least(n) for n in lengths]
    before = dict(model.backend.graph_buckets)
    graph_out = [model.encode(q, max_length=n, **ALL) for q, n in zip(queries, lengths)]
    assert sum(model.backend.graph_buckets.values()) - sum(before.values()) == len(queries)
    with model.backend.graphs_off():
        plain_out = [model.encode(q, max_length=n, **ALL) for q, n in zip(queries, lengths)]

    def pack(outs):
        return {
            "dense_vecs": np.stack([o["dense_vecs"] for o in outs]),
            "colbert_vecs": [o["colbert_vecs"] for o in outs],
            "lexical_weights": [o["lexical_weights"] for o in outs],
        }

    figures = compare_outputs(pack(graph_out), pack(plain_out))
    _record("graph_vs_plain_batch1", figures)
    assert figures["dense_cos_min"] > 0.9999 and figures["colbert_cos_min"] > 0.999, figures


def test_held_outputs_survive_bucket_replays(full, texts):
    """A plain batch's outputs wait on the device for post-processing while batch-1 queries replay
    their CUDA graphs: the replays must not write where the held outputs live."""
    from m3rt.benchmarks.texts import TextFactory

    model, _ = full
    ids = model.tokenizer.encode(texts[:16], max_length=512).ids
    batch = pad_batch(ids, np.arange(len(ids)), model.pad_id)
    held = model.backend.run(batch.input_ids, batch.attention_mask, OUTPUT_NAMES)
    snapshot = {name: value.to_host() for name, value in held.items()}
    factory = TextFactory(model.tokenizer, seed=2)
    for n in (5, 16, 30, 60):
        model.encode(factory.at_least(n), max_length=n, **ALL)
    raw_intact = all(np.array_equal(held[name].to_host(), snapshot[name]) for name in held)
    post = _identical(
        _collect(model, batch, held, model.postprocessor),
        _collect(model, batch, snapshot, PostProcessor(model.unused_ids, device_postprocess=False)),
    )
    _record("held_outputs_across_replays", {"raw_intact": raw_intact, "postprocessed_identically": post})
    assert raw_intact and post
