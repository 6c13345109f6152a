"""Encode jobs from many requests in one `encode` call.

A job is one request's texts, tokenised once (to check them, to size batches by the tokens they will
pad to, and to run: the model takes the ids as they are, `M3Model.run_ids`). `encode_jobs` is the
function Ray Serve's batching calls with the jobs it collected; every job gets its own result or its
own exception, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3rt.heads import HEADS, OUTPUT_COLBERT, OUTPUT_DENSE, OUTPUT_SPARSE

# The heads by their names in the HTTP API.
OUTPUTS = tuple(h.serve for h in HEADS)


@dataclass(frozen=True)
class EncodeJob:
    """One request's texts with the options that decide how they are encoded.

    `ids` are the texts' token ids after truncation to `max_length` (specials included); their
    lengths are what the batch they join will pad to. Texts that do not fit with `truncate=false`
    never become jobs. `outputs`: names of `OUTPUTS`.
    """

    texts: tuple[str, ...]
    ids: tuple[np.ndarray, ...]
    max_length: int
    outputs: frozenset[str]

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(len(row) for row in self.ids)

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


def split_job(job: EncodeJob, budget: int) -> list[EncodeJob]:
    """`job` as consecutive parts of at most `budget` padded tokens each (a text longer than the budget
    alone): a request's parts go to the model one after another, so other requests run between them."""
    parts, start, longest = [], 0, 0
    for i, length in enumerate(job.lengths):
        if i > start and (i - start + 1) * max(longest, length) > budget:
            parts.append(slice(start, i))
            start, longest = i, 0
        longest = max(longest, length)
    parts.append(slice(start, len(job.texts)))
    if len(parts) == 1:
        return [job]
    return [EncodeJob(job.texts[part], job.ids[part], job.max_length, job.outputs) for part in parts]


def merge_encoded(parts: Sequence[EncodedTexts]) -> EncodedTexts:
    """The outputs of a job's parts (`split_job`) as one job's, in order."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return EncodedTexts(
        dense=None if first.dense is None else np.concatenate([p.dense for p in parts]),
        sparse=None if first.sparse is None else [row for p in parts for row in p.sparse],
        colbert=None if first.colbert is None else [row for p in parts for row in p.colbert],
    )


def padded_tokens(jobs: Sequence[EncodeJob]) -> int:
    """Tokens of the padded batch the jobs make together: rows x longest row."""
    rows = sum(len(job.texts) for job in jobs)
    longest = max((max(job.lengths) for job in jobs if job.lengths), default=0)
    return rows * longest


def batch_size(jobs: Sequence[EncodeJob]) -> int:
    """Ray Serve's `batch_size_fn`: padded tokens of the jobs together, except that a lone job always
    fits (Serve fails a single item larger than the budget; `M3Model` splits a large job itself)."""
    return 1 if len(jobs) == 1 else padded_tokens(jobs)


def _encode_group(model: Any, jobs: list[EncodeJob]) -> list[EncodedTexts]:
    """One `run_ids` for the jobs' ids, with every output any of them asked for."""
    ids = [row for job in jobs for row in job.ids]
    wanted = frozenset().union(*(job.outputs for job in jobs))
    dense, sparse_rows, colbert = model.run_ids(ids, [h.output for h in HEADS if h.serve in wanted])
    by_output = {OUTPUT_DENSE: dense, OUTPUT_COLBERT: colbert}
    results, start = [], 0
    for job in jobs:
        stop = start + len(job.texts)
        outputs: dict[str, Any] = {}
        for spec in HEADS:
            if spec.serve not in job.outputs:
                outputs[spec.serve] = None
            elif spec.output == OUTPUT_SPARSE:
                outputs[spec.serve] = [_sorted_row(sparse_rows, row) for row in range(start, stop)]
            else:
                outputs[spec.serve] = by_output[spec.output][start:stop]
        results.append(EncodedTexts(**outputs))
        start = stop
    return results


def _sorted_row(rows: Any, row: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = rows.indptr[row], rows.indptr[row + 1]
    order = np.argsort(rows.indices[lo:hi], kind="stable")
    return rows.indices[lo:hi][order], rows.values[lo:hi][order]


def encode_jobs(model: Any, jobs: Sequence[EncodeJob]) -> list[EncodedTexts | Exception]:
    """Results of `jobs` in order: one `run_ids` for all of them (an `M3Model`'s).

    Jobs are checked before they get here; should the run still fail, the jobs are run again one
    by one, so the job that fails fails alone and the others batched with it succeed.
    """
    jobs = list(jobs)
    try:
        return list(_encode_group(model, jobs))
    except Exception as group_error:  # noqa: BLE001 - isolated below, job by job
        if len(jobs) == 1:
            return [group_error]
    results: list[EncodedTexts | Exception] = []
    for job in jobs:
        try:
            results.append(_encode_group(model, [job])[0])
        except Exception as job_error:  # noqa: BLE001 - this job's own answer
            results.append(job_error)
    return results


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

    def __init__(self, model: Any, model_name: str = "bge-m3") -> None:
        self.model = model
        self.model_name = model_name

    async def encode(self, job: EncodeJob) -> EncodedTexts:
        result = (await asyncio.to_thread(encode_jobs, self.model, [job]))[0]
        if isinstance(result, Exception):
            raise result
        return result
