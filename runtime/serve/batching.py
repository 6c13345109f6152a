"""Encode jobs from many requests in one `encode` call.

A job is one request's texts, already tokenised once to check them and to know their lengths, so a
batch can be sized by the tokens it will pad to. `encode_jobs` is the function Ray Serve's batching
calls with the jobs it collected; every job gets its own result or its own exception, in order.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from m3rt.model import M3Model

OUTPUTS = ("dense", "sparse", "colbert")


@dataclass(frozen=True)
class EncodeJob:
    """One request's texts with the options that decide how they are encoded.

    `lengths` are the token counts after truncation to `max_length` (specials included): what the
    batch they join will pad to. Texts that do not fit with `truncate=false` never become jobs.
    """

    texts: tuple[str, ...]
    lengths: tuple[int, ...]
    max_length: int
    outputs: frozenset[str]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)


@dataclass(frozen=True)
class EncodedTexts:
    """The outputs of one job: `dense` [n, hidden] float32; `sparse` per text (token ids ascending,
    weights) as FlagEmbedding aggregates them (max per id, specials dropped); `colbert` per text
    [tokens - 1, hidden] float32. An output the job did not ask for is None."""

    dense: np.ndarray | None
    sparse: list[tuple[np.ndarray, np.ndarray]] | None
    colbert: list[np.ndarray] | None


def padded_tokens(jobs: Sequence[EncodeJob]) -> int:
    """Tokens of the padded batch the jobs make together: rows x longest row."""
    rows = sum(len(job.texts) for job in jobs)
    longest = max((max(job.lengths) for job in jobs if job.lengths), default=0)
    return rows * longest


def batch_size(jobs: Sequence[EncodeJob]) -> int:
    """Ray Serve's `batch_size_fn`: padded tokens of the jobs together, except that a lone job always
    fits (Serve fails a single item larger than the budget; `M3Model` splits a large job itself)."""
    return 1 if len(jobs) == 1 else padded_tokens(jobs)


def _encode_group(model: M3Model, jobs: list[EncodeJob]) -> list[EncodedTexts]:
    """One `encode` for jobs of one max_length, with every output any of them asked for."""
    texts = [text for job in jobs for text in job.texts]
    wanted = frozenset().union(*(job.outputs for job in jobs))
    out = model.encode(
        texts,
        max_length=jobs[0].max_length,
        return_dense="dense" in wanted,
        return_sparse="sparse" in wanted,
        return_colbert_vecs="colbert" in wanted,
        sparse_format="csr",
    )
    sparse_rows = out["lexical_weights"]
    results, start = [], 0
    for job in jobs:
        stop = start + len(job.texts)
        sparse = None
        if "sparse" in job.outputs:
            sparse = []
            for row in range(start, stop):
                lo, hi = sparse_rows.indptr[row], sparse_rows.indptr[row + 1]
                order = np.argsort(sparse_rows.indices[lo:hi], kind="stable")
                sparse.append((sparse_rows.indices[lo:hi][order], sparse_rows.values[lo:hi][order]))
        results.append(
            EncodedTexts(
                dense=out["dense_vecs"][start:stop] if "dense" in job.outputs else None,
                sparse=sparse,
                colbert=out["colbert_vecs"][start:stop] if "colbert" in job.outputs else None,
            )
        )
        start = stop
    return results


def encode_jobs(model: M3Model, jobs: Sequence[EncodeJob]) -> list[EncodedTexts | Exception]:
    """Results of `jobs` in order: one `encode` per max_length among them (usually one in all).

    Jobs are checked before they get here; should an `encode` still fail, its jobs are encoded
    again one by one, so the job that fails fails alone and the others batched with it succeed.
    """
    groups: dict[int, list[int]] = defaultdict(list)
    for index, job in enumerate(jobs):
        groups[job.max_length].append(index)
    results: list[EncodedTexts | Exception | None] = [None] * len(jobs)
    for indices in groups.values():
        members = [jobs[i] for i in indices]
        try:
            for i, result in zip(indices, _encode_group(model, members)):
                results[i] = result
        except Exception as group_error:  # noqa: BLE001 - isolated below, job by job
            if len(members) == 1:
                results[indices[0]] = group_error
                continue
            for i, job in zip(indices, members):
                try:
                    results[i] = _encode_group(model, [job])[0]
                except Exception as job_error:  # noqa: BLE001 - this job's own answer
                    results[i] = job_error
    return results  # type: ignore[return-value]


class Coalescer:
    """Runs batches of jobs one at a time in a worker thread, merging the batches that wait for the model.

    Ray Serve closes a batch when its wait window ends and queues it even while the model is busy, so
    under load many small batches wait behind one another. Here the batches waiting when the model
    becomes free run together, as one `run` (one `encode`), as long as their padded tokens stay
    within `budget`; each batch still gets its own results, in order.
    """

    def __init__(self, run: Callable[[list[EncodeJob]], list[EncodedTexts | Exception]], budget: int) -> None:
        self._run = run
        self._budget = budget
        self._waiting: list[tuple[list[EncodeJob], asyncio.Future]] = []
        self._model = asyncio.Lock()

    async def __call__(self, jobs: list[EncodeJob]) -> list[EncodedTexts | Exception]:
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((list(jobs), done))
        async with self._model:
            if not done.done():  # else an earlier holder of the lock ran these jobs with its own
                await self._run_waiting()
        return await done

    async def _run_waiting(self) -> None:
        taken, merged = [], []
        while self._waiting:
            jobs, done = self._waiting[0]
            if merged and padded_tokens(merged + jobs) > self._budget:
                break
            taken.append(self._waiting.pop(0))
            merged += jobs
        try:
            results = await asyncio.to_thread(self._run, merged)
        except Exception as exc:  # noqa: BLE001 - every caller of this run gets it
            for _, done in taken:
                done.set_exception(exc)
            return
        start = 0
        for jobs, done in taken:
            done.set_result(results[start : start + len(jobs)])
            start += len(jobs)


class LocalEncoder:
    """An `Encoder` over an in-process `M3Model`, one `encode` per request (no cross-request batching):
    the FastAPI app without Ray, for tests and for embedding the app in another ASGI server."""

    def __init__(self, model: M3Model, model_name: str = "bge-m3") -> None:
        self.model = model
        self.model_name = model_name

    async def encode(self, job: EncodeJob) -> EncodedTexts:
        result = (await asyncio.to_thread(encode_jobs, self.model, [job]))[0]
        if isinstance(result, Exception):
            raise result
        return result
