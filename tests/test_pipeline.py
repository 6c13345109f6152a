"""The pipelined scheduler: input order, nothing lost, errors propagate, concurrent `encode` calls.

Fake *backends* and stages appear only to inject failures or observe concurrency; every result is
compared with the real ONNX Runtime backend's.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

import m3rt.pipeline
from m3rt import BackendError, InputError, InputTooLongError, M3Model
from m3rt.pipeline import Stages, TokenProgress, run_pipeline
from m3rt.postprocess import OutputCollector
from m3rt.scheduler import pad_batch, plan_batches, split_batch, token_lengths

import reference_rules
from fake_backend import FakeBackend
from parity import assert_outputs

ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
OUTPUTS = ["dense_vecs", "sparse_weights", "colbert_vecs"]


def pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("m3rt-")]


def assert_identical(got: dict, want: dict) -> None:
    """Bit-for-bit equal outputs (same batches ran, so nothing may differ)."""
    np.testing.assert_array_equal(got["dense_vecs"], want["dense_vecs"])
    assert len(got["lexical_weights"]) == len(want["lexical_weights"])
    for g, w in zip(got["lexical_weights"], want["lexical_weights"]):
        assert list(g.items()) == list(w.items())
    assert len(got["colbert_vecs"]) == len(want["colbert_vecs"])
    for g, w in zip(got["colbert_vecs"], want["colbert_vecs"]):
        np.testing.assert_array_equal(g, w)


@pytest.fixture
def threaded(monkeypatch):
    """Every multi-batch input goes through the threads, in chunks of 7 texts."""
    monkeypatch.setattr(m3rt.pipeline, "INLINE_MAX_TOKENS", 0)
    monkeypatch.setattr(m3rt.pipeline, "CHUNK_TEXTS", 7)


@pytest.fixture
def inline(monkeypatch):
    monkeypatch.setattr(m3rt.pipeline, "INLINE_MAX_TOKENS", 10**12)
    monkeypatch.setattr(m3rt.pipeline, "CHUNK_TEXTS", 10**6)


def _batches(model: M3Model, texts: list[str], batch_size: int = 4):
    ids = model.tokenizer.encode(texts, max_length=512).ids
    plan = plan_batches(token_lengths(ids), batch_size, model.token_budget)
    return [pad_batch(ids, positions, model.pad_id) for positions in plan]


# ---------------------------------------------------------------------- post-processing


def test_heads_follow_flag_embeddings_rules(tiny_model, texts):
    batch = _batches(tiny_model, texts)[0]
    values = tiny_model.backend.run(batch.input_ids, batch.attention_mask, OUTPUTS)
    post = tiny_model.postprocessor
    got = post.apply("sparse_weights", values["sparse_weights"], batch).to_dicts()
    for row, (weights, ids, mask) in enumerate(zip(values["sparse_weights"], batch.input_ids, batch.attention_mask)):
        n = int(mask.sum())
        want = reference_rules.lexical_weights(weights[:n], ids[:n], set(tiny_model.unused_ids))
        assert list(got[row]) == list(want)  # first-occurrence order
        assert all(np.float32(got[row][k]) == np.float32(w) for k, w in want.items())
    for row, vectors in enumerate(post.apply("colbert_vecs", values["colbert_vecs"], batch)):
        np.testing.assert_array_equal(
            vectors, reference_rules.colbert_rows(values["colbert_vecs"][row], batch.attention_mask[row])
        )


def test_collector_restores_input_order_whatever_the_arrival_order(tiny_model, texts):
    results = [(b, tiny_model.backend.run(b.input_ids, b.attention_mask, OUTPUTS)) for b in _batches(tiny_model, texts)]

    def collect(order):
        collector = OutputCollector(len(texts), tiny_model.manifest.hidden_size, OUTPUTS, tiny_model.postprocessor)
        for batch, values in order:
            collector.add(batch, values)
        dense, sparse, colbert = collector.finish()
        return {"dense_vecs": dense, "lexical_weights": sparse.to_dicts(), "colbert_vecs": colbert}

    in_order = collect(results)
    shuffled = results[:]
    random.Random(0).shuffle(shuffled)
    assert_identical(collect(shuffled), in_order)
    # ... and that order is the input order: the model's own answer, text by text.
    assert_outputs(in_order, tiny_model.encode(texts, max_length=512, **ALL))


def test_collector_refuses_duplicates_and_reports_lost_inputs(tiny_model, texts):
    batch = _batches(tiny_model, texts)[0]
    values = tiny_model.backend.run(batch.input_ids, batch.attention_mask, OUTPUTS)
    collector = OutputCollector(len(texts), tiny_model.manifest.hidden_size, OUTPUTS, tiny_model.postprocessor)
    collector.add(batch, values)
    with pytest.raises(RuntimeError, match="delivered twice"):
        collector.add(batch, values)
    with pytest.raises(RuntimeError, match="got no output"):
        collector.finish()


def test_split_batch_builds_what_pad_batch_builds():
    ids = [np.arange(n) + 5 for n in (9, 7, 7, 4, 3)]
    batch = pad_batch(ids, np.array([0, 1, 2, 3, 4]), pad_id=1, first_index=100)
    first, second = split_batch(batch)
    for part, rows in ((first, [0, 1]), (second, [2, 3, 4])):
        want = pad_batch(ids, np.array(rows), pad_id=1, first_index=100)
        assert part.indices.tolist() == want.indices.tolist() == [100 + r for r in rows]
        np.testing.assert_array_equal(part.input_ids, want.input_ids)
        np.testing.assert_array_equal(part.attention_mask, want.attention_mask)
        assert part.input_ids.flags.c_contiguous


# ---------------------------------------------------------------------- the pipeline


def test_threaded_and_inline_runs_give_identical_results(tiny_model, texts, monkeypatch):
    # One chunk, so both paths run exactly the same batches.
    monkeypatch.setattr(m3rt.pipeline, "INLINE_MAX_TOKENS", 10**12)
    want = tiny_model.encode(texts, batch_size=4, **ALL)
    monkeypatch.setattr(m3rt.pipeline, "INLINE_MAX_TOKENS", 0)
    assert_identical(tiny_model.encode(texts, batch_size=4, **ALL), want)


def test_chunked_runs_keep_input_order(tiny_model, texts, inline, monkeypatch):
    many = texts * 3 + texts[::-1]
    want = tiny_model.encode(many, batch_size=4, **ALL)
    monkeypatch.setattr(m3rt.pipeline, "INLINE_MAX_TOKENS", 0)
    monkeypatch.setattr(m3rt.pipeline, "CHUNK_TEXTS", 7)
    got = tiny_model.encode(many, batch_size=4, **ALL)
    # Chunks batch texts differently: float32 round-off may differ, order and counts may not.
    assert_outputs(got, want)
    for csr in (True, False):
        fmt = "csr" if csr else "dict"
        out = tiny_model.encode(many, batch_size=4, return_sparse=True, sparse_format=fmt)
        assert (out["lexical_weights"].num_rows if csr else len(out["lexical_weights"])) == len(many)
    assert not pipeline_threads()


def test_single_texts_and_small_inputs_start_no_threads(tiny_model, monkeypatch):
    started = []
    monkeypatch.setattr(m3rt.pipeline._ThreadedRun, "run", lambda *a: started.append(a))
    tiny_model.encode("one query", **ALL)
    tiny_model.encode(["a", "handful", "of", "short", "texts"], batch_size=2, **ALL)
    assert started == []


def _stages(fail_at: str, exc: BaseException, texts: list[str], chunk_failing: int = 2) -> Stages:
    """Trivial stages (ids are text lengths) that raise `exc` in one stage, after some work."""
    calls = {"tokenize": 0, "pad": 0, "infer": 0, "collect": 0}

    def step(name: str) -> None:
        calls[name] += 1
        if name == fail_at and calls[name] == chunk_failing:
            raise exc

    def tokenize(chunk, first_index):
        step("tokenize")
        return [np.arange(2 + len(t) % 5) for t in chunk]

    def pad(ids, positions, first_index):
        step("pad")
        return pad_batch(ids, positions, 1, first_index)

    def infer(batch):
        step("infer")
        time.sleep(0.001)
        return [(batch, {})]

    def collect(batch, values):
        step("collect")

    return Stages(tokenize, lambda ids: plan_batches(token_lengths(ids), 2, 64), pad, infer, collect)


@pytest.mark.parametrize("stage", ["tokenize", "pad", "infer", "collect"])
@pytest.mark.parametrize(
    "exc",
    [InputTooLongError("text 9 too long"), BackendError("provider exploded"), KeyError("bug"), KeyboardInterrupt()],
)
def test_a_failing_stage_stops_everything_and_raises_the_original_exception(stage, exc):
    texts = [f"text {i}" * (i % 7) for i in range(200)]
    done = threading.Event()
    raised: list[BaseException] = []

    def call():
        try:
            run_pipeline(texts, _stages(stage, exc, texts), TokenProgress(False), chunk_texts=10, inline_max_tokens=0)
        except BaseException as caught:  # KeyboardInterrupt included
            raised.append(caught)
        done.set()

    caller = threading.Thread(target=call)
    caller.start()
    assert done.wait(timeout=20), "the pipeline hung"
    caller.join()
    assert raised and raised[0] is exc
    assert not pipeline_threads(), "a pipeline thread outlived the call"


def test_errors_name_the_text_by_its_index_in_the_whole_input(tiny_model, threaded):
    texts = ["short"] * 20 + ["word " * 500] + ["short"] * 5
    with pytest.raises(InputTooLongError, match="text 20 "):
        tiny_model.encode(texts, max_length=64, truncate=False)
    assert not pipeline_threads()


def test_backend_errors_keep_their_type_through_the_threads(tiny_model, texts, threaded):
    model = M3Model(tiny_model.manifest, FakeBackend(tiny_model.backend, fail_on_call=3), tiny_model.tokenizer)
    with pytest.raises(BackendError, match="provider exploded"):
        model.encode(texts, batch_size=2, **ALL)
    assert not pipeline_threads()
    with pytest.raises(InputError, match=r"sentences\[2\]"):
        model.encode(["a", "b", 3])


def test_out_of_memory_batches_are_split_in_the_threaded_pipeline(tiny_model, texts, threaded):
    want = tiny_model.encode(texts, batch_size=8, **ALL)
    # Any one text fits; batches of several long ones do not.
    longest = int(token_lengths(tiny_model.tokenizer.encode(texts, max_length=8192).ids).max())
    backend = FakeBackend(tiny_model.backend, out_of_memory_above=lambda ids: ids.size > longest)
    got = M3Model(tiny_model.manifest, backend, tiny_model.tokenizer).encode(texts, batch_size=8, **ALL)
    assert backend.refused > 0
    # A split batch is re-padded to its own longest text: float32 round-off only.
    assert_outputs(got, want)


# ---------------------------------------------------------------------- concurrent encode


@pytest.mark.parametrize("declared_thread_safe", [False, True])
def test_concurrent_encode_calls_get_exactly_their_own_results(tiny_model, texts, monkeypatch, declared_thread_safe):
    monkeypatch.setattr(m3rt.pipeline, "CHUNK_TEXTS", 9)  # several chunks and threads per call
    backend = FakeBackend(tiny_model.backend, thread_safe=declared_thread_safe)
    model = M3Model(tiny_model.manifest, backend, tiny_model.tokenizer)
    rng = random.Random(1)
    jobs = []
    for k in range(6):
        subset = rng.sample(texts, k=rng.randint(1, len(texts)))
        # Different max_length per thread: the tokenizer's truncation setting is shared state.
        jobs.append((subset, (16, 64, 512)[k % 3], "csr" if k % 2 else "dict"))
    expected = [model.encode(t, batch_size=3, max_length=m, sparse_format=f, **ALL) for t, m, f in jobs]
    results: dict[tuple[int, int], dict] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def worker(k):
        subset, max_length, fmt = jobs[k]
        try:
            start.wait(timeout=30)
            for rep in range(3):
                results[k, rep] = model.encode(subset, batch_size=3, max_length=max_length, sparse_format=fmt, **ALL)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 3 * len(jobs)
    for (k, _rep), got in results.items():
        want = expected[k]
        if jobs[k][2] == "csr":
            for key in ("indptr", "indices", "values"):
                got_csr, want_csr = got["lexical_weights"], want["lexical_weights"]
                np.testing.assert_array_equal(getattr(got_csr, key), getattr(want_csr, key))
            got = {**got, "lexical_weights": []}
            want = {**want, "lexical_weights": []}
        assert_identical(got, want)
    assert not pipeline_threads()


@pytest.mark.parametrize("thread_safe", [False, True])
def test_backends_run_concurrently_only_when_they_say_they_are_thread_safe(tiny_model, thread_safe):
    backend = FakeBackend(tiny_model.backend, thread_safe=thread_safe, meet=True)
    model = M3Model(tiny_model.manifest, backend, tiny_model.tokenizer)
    threads = [threading.Thread(target=model.encode, args=(["one text"],)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert backend.most == (2 if thread_safe else 1)


# ---------------------------------------------------------------------- progress


def test_progress_bar_counts_every_real_token(tiny_model, texts, threaded, capsys):
    total = int(token_lengths(tiny_model.tokenizer.encode(texts, max_length=8192).ids).sum())
    tiny_model.encode(texts, batch_size=4, show_progress=True)
    assert f"{total}/{total}" in capsys.readouterr().err
    tiny_model.encode(texts, batch_size=4)  # small input: no bar unless asked
    assert "m3rt encode" not in capsys.readouterr().err


def test_batches_over_a_backends_row_limit_run_in_slices(tiny_model, texts):
    """What a TensorRT engine's profiles ask for: at most `max_rows(padded length)` rows per run."""
    want = tiny_model.encode(texts, batch_size=16, **ALL)
    limit = lambda sequence: 2 if sequence > 32 else 5  # noqa: E731 - a profile per length, as TensorRT's
    backend = FakeBackend(tiny_model.backend, thread_safe=False, max_rows=limit)
    got = M3Model(tiny_model.manifest, backend, tiny_model.tokenizer).encode(texts, batch_size=16, **ALL)
    assert all(rows <= limit(width) for rows, width in backend.calls)
    assert any(rows == 5 for rows, _ in backend.calls) and any(rows == 2 for rows, _ in backend.calls)
    assert_outputs(got, want)
