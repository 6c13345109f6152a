"""Pipelined encoding: the stages of one `encode` call overlap in threads joined by bounded queues.

    texts -> [tokenise] -chunks-> [plan + pad] -batches-> [backend] -outputs-> caller's thread: collect

While the backend runs batch k, the padder prepares batch k+1 (and the tokeniser the next chunk),
and the caller's thread post-processes batch k-1. HF tokenizers and ONNX Runtime release the GIL
while they work, so the threads run in parallel for real.

Texts are tokenised in chunks of `CHUNK_TEXTS` so that the backend starts after the first chunk, not
after the whole input; token-budget batches are planned (sorted by length) within each chunk. Every
batch carries its texts' indices in the caller's input, and the collector puts results back in input
order whatever order they arrive in.

Small inputs run inline in the caller's thread: with a single batch nothing can overlap, and below
`INLINE_MAX_TOKENS` the threads' start-up and hand-offs cost more than the overlap gains.

Failure: the first exception in any stage stops every stage; the caller gets that exception object
(its type and traceback intact) once all threads have ended, which is after the stage that was busy
finishes its current step (a running backend batch cannot be interrupted). Nothing is left running.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from m3rt.scheduler import Batch

# Texts per tokenisation chunk: thousands, so that length sorting inside a chunk pads about as little
# as sorting the whole input, while the backend waits only for the first chunk.
CHUNK_TEXTS = 2048
# Up to this many real tokens in a single chunk run inline. Measured on the 2-core CI machine
# (`run_pipeline` with the real tokenizer and collector, 1024-d outputs): starting and joining the
# three threads plus the queue hand-offs cost ~0.7 ms per call, and more per batch when stages
# contend for the GIL. With a backend that releases the GIL like a GPU does (10 us/token), threads
# were even at ~2k tokens (+2%) and ahead from ~9k (-7%; -16% at 36k). On a CPU backend that keeps
# every core busy (ONNX Runtime CPU) there is nothing to overlap with; large inputs measure even.
INLINE_MAX_TOKENS = 4096
# Queue bounds. Tokenised chunks: one waiting, so the tokeniser works at most two chunks ahead.
CHUNK_QUEUE = 1
# Padded batches: a few, so the backend never waits while the padder plans the next chunk; they are
# small (at most token_budget x 16 bytes).
BATCH_QUEUE = 4
# Backend outputs waiting for post-processing: few, each can be large (ColBERT: tokens x 1024 floats).
OUTPUT_QUEUE = 2
# How often a thread blocked on a queue checks whether the run was stopped.
_POLL_S = 0.05


@dataclass(frozen=True)
class Stages:
    """What the pipeline runs; the pipeline itself knows nothing of models or backends."""

    tokenize: Callable[[Sequence[str], int], list[np.ndarray]]
    """(texts, index of texts[0] in the input) -> token ids per text."""
    plan: Callable[[list[np.ndarray]], list[np.ndarray]]
    """token ids -> batches, each an array of positions in those ids."""
    pad: Callable[[list[np.ndarray], np.ndarray, int], Batch]
    """(ids, positions, index of ids[0] in the input) -> a padded batch indexed by input position."""
    infer: Callable[[Batch], Iterable[tuple[Batch, Mapping[str, Any]]]]
    """batch -> (batch, outputs) pairs: more than one when the batch had to be split."""
    collect: Callable[[Batch, Mapping[str, Any]], None]
    """post-process one batch's outputs (runs in the caller's thread)."""


class TokenProgress:
    """A tqdm bar over real tokens whose total grows as chunks are tokenised.

    `show=None` shows it once the input reaches `auto_tokens` tokens (as before chunking: only for
    large inputs); True always; False never.
    """

    def __init__(self, show: bool | None, auto_tokens: int = 100_000) -> None:
        self._show, self._auto_tokens = show, auto_tokens
        self._bar: Any = None
        self.total = 0
        self.done = 0

    def add_total(self, tokens: int) -> None:
        self.total += tokens
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()
        elif self._show or (self._show is None and self.total >= self._auto_tokens):
            self._bar = tqdm(total=self.total, initial=self.done, unit="tok", desc="m3rt encode")

    def advance(self, tokens: int) -> None:
        self.done += tokens
        if self._bar is not None:
            self._bar.update(tokens)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> TokenProgress:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def run_pipeline(
    texts: Sequence[str],
    stages: Stages,
    progress: TokenProgress,
    *,
    chunk_texts: int | None = None,
    inline_max_tokens: int | None = None,
) -> None:
    """Tokenise, batch, run and collect every text; returns when every batch has been collected.

    `chunk_texts` and `inline_max_tokens` default to the module's CHUNK_TEXTS and INLINE_MAX_TOKENS.
    """
    if not texts:
        return
    chunk_texts = CHUNK_TEXTS if chunk_texts is None else chunk_texts
    inline_max_tokens = INLINE_MAX_TOKENS if inline_max_tokens is None else inline_max_tokens
    # The first chunk is tokenised here: the backend cannot start before it anyway, and its size
    # decides whether threads are worth starting.
    first_ids = stages.tokenize(texts[:chunk_texts], 0)
    first_plan = stages.plan(first_ids)
    tokens = int(sum(len(x) for x in first_ids))
    if len(texts) <= chunk_texts and (len(first_plan) <= 1 or tokens <= inline_max_tokens):
        progress.add_total(tokens)
        for positions in first_plan:
            for batch, values in stages.infer(stages.pad(first_ids, positions, 0)):
                stages.collect(batch, values)
                progress.advance(batch.num_tokens)
        return
    _ThreadedRun(texts, stages, progress, chunk_texts).run(first_ids, first_plan)


@dataclass(frozen=True)
class _Chunk:
    first_index: int
    ids: list[np.ndarray]
    plan: list[np.ndarray] | None  # planned already (the first chunk) or not yet


@dataclass(frozen=True)
class _ChunkTokens:
    """Passed down with a chunk's first batch so the caller's thread grows the progress total."""

    tokens: int


class _Stopped(Exception):
    """Raised inside a stage when the run was stopped (by another stage's failure or the caller)."""


_END = object()


class _ThreadedRun:
    def __init__(self, texts: Sequence[str], stages: Stages, progress: TokenProgress, chunk_texts: int) -> None:
        self._texts, self._stages, self._progress, self._chunk_texts = texts, stages, progress, chunk_texts
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._chunks: queue.Queue = queue.Queue(CHUNK_QUEUE)
        self._batches: queue.Queue = queue.Queue(BATCH_QUEUE)
        self._outputs: queue.Queue = queue.Queue(OUTPUT_QUEUE)

    def run(self, first_ids: list[np.ndarray], first_plan: list[np.ndarray]) -> None:
        threads = [
            threading.Thread(target=self._guard, args=(self._tokenize, first_ids, first_plan), name="m3rt-tokenize"),
            threading.Thread(target=self._guard, args=(self._pad,), name="m3rt-pad"),
            threading.Thread(target=self._guard, args=(self._infer,), name="m3rt-backend"),
        ]
        for thread in threads:
            # Daemon: should a stage ever hang in native code, it cannot keep the interpreter alive.
            thread.daemon = True
            thread.start()
        try:
            self._collect()
        except _Stopped:
            pass  # a stage failed: its exception is raised below
        except BaseException as exc:  # the caller's own stage failed, or KeyboardInterrupt
            self._fail(exc)
        finally:
            self._stop.set()
            for thread in threads:
                thread.join()
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------------ stages

    def _tokenize(self, first_ids: list[np.ndarray], first_plan: list[np.ndarray]) -> None:
        self._put(self._chunks, _Chunk(0, first_ids, first_plan))
        for start in range(self._chunk_texts, len(self._texts), self._chunk_texts):
            chunk = self._texts[start : start + self._chunk_texts]
            self._put(self._chunks, _Chunk(start, self._stages.tokenize(chunk, start), None))
        self._put(self._chunks, _END)

    def _pad(self) -> None:
        while (chunk := self._get(self._chunks)) is not _END:
            plan = chunk.plan if chunk.plan is not None else self._stages.plan(chunk.ids)
            self._put(self._batches, _ChunkTokens(int(sum(len(x) for x in chunk.ids))))
            for positions in plan:
                self._put(self._batches, self._stages.pad(chunk.ids, positions, chunk.first_index))
        self._put(self._batches, _END)

    def _infer(self) -> None:
        while (item := self._get(self._batches)) is not _END:
            if isinstance(item, _ChunkTokens):
                self._put(self._outputs, item)
                continue
            for result in self._stages.infer(item):
                self._put(self._outputs, result)
        self._put(self._outputs, _END)

    def _collect(self) -> None:
        while (item := self._get(self._outputs)) is not _END:
            if isinstance(item, _ChunkTokens):
                self._progress.add_total(item.tokens)
                continue
            batch, values = item
            self._stages.collect(batch, values)
            self._progress.advance(batch.num_tokens)

    # ------------------------------------------------------------------ plumbing

    def _guard(self, stage: Callable[..., None], *args: Any) -> None:
        try:
            stage(*args)
        except _Stopped:
            pass
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        with self._error_lock:
            if self._error is None:  # the first failure is the cause; later ones are consequences
                self._error = exc
        self._stop.set()

    def _put(self, q: queue.Queue, item: Any) -> None:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _get(self, q: queue.Queue) -> Any:
        while not self._stop.is_set():
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        raise _Stopped
