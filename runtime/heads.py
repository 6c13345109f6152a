"""The output heads, registered once: each head's names everywhere and its reduction.

A `HeadSpec` ties together what one head is called in the graph (`output`), in `encode`'s result
(`api`) and keyword (`flag`), over HTTP (`serve`), its shape in the manifest, and its reduction of a
padded batch's raw output to per-text results on the host (and, for the outputs that are large
before they are reduced, on the device). `HEADS` is the registry; the manifest, the collector,
`encode`, granularity and serve loop over it, so a new head is one entry here.

The reductions: `DenseHead` (the normalised CLS vector, [B, D] as the graph gives it), `SparseHead`
(per-token weights aggregated per token id, FlagEmbedding's rules) and `ColbertHead` (each text's
`tokens - 1` vectors). The device versions (`m3rt.kernels.device`) are checked bit for bit against
the host ones, so nothing after this seam knows which ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3rt.device_array import DeviceArray
from m3rt.kernels.colbert import colbert_counts, split_colbert
from m3rt.kernels.sparse import SparseRows, aggregate_sparse
from m3rt.scheduler import Batch

OUTPUT_DENSE = "dense_vecs"
OUTPUT_SPARSE = "sparse_weights"
OUTPUT_COLBERT = "colbert_vecs"

# FlagEmbedding drops exactly these from lexical weights (`<mask>` is not among them).
UNUSED_SPECIALS = ("cls", "eos", "pad", "unk")


def unused_token_ids(special_tokens: dict[str, int]) -> tuple[int, ...]:
    """The token ids the sparse head never weights (FlagEmbedding's `unused_tokens`)."""
    return tuple(sorted({special_tokens[k] for k in UNUSED_SPECIALS if k in special_tokens}))


def _host(values: Any) -> np.ndarray:
    return values.to_host() if isinstance(values, DeviceArray) else np.asarray(values)


def _on_device_as_batch(values: Any, batch: Batch, rows: int) -> bool:
    """Whether device kernels can read `values` for this batch as they are: float32, the batch's
    shape (`rows` per-token rows per text) and the batch's inputs bound beside it."""
    if not isinstance(values, DeviceArray) or values.dtype != np.float32 or values.batch_inputs is None:
        return False
    ids, mask = values.batch_inputs
    shape = batch.input_ids.shape
    return tuple(ids.shape) == shape and tuple(mask.shape) == shape and values.shape[:2] == (shape[0], rows)


class DenseHead:
    """[B, D] float32: the graph already normalised the CLS vector; a small copy when on the device."""

    name = OUTPUT_DENSE

    def host(self, values: Any, batch: Batch) -> np.ndarray:
        return np.asarray(_host(values), dtype=np.float32)

    # Collecting: rows written into one [texts, D] array as batches arrive.
    def start(self, num_texts: int, hidden_size: int) -> np.ndarray:
        return np.zeros((num_texts, hidden_size), dtype=np.float32)

    def put(self, store: np.ndarray, rows: np.ndarray, result: np.ndarray) -> None:
        store[rows] = result

    def done(self, store: np.ndarray, num_texts: int) -> np.ndarray:
        return store


class SparseHead:
    """Per-token weights [B, S(, 1)] -> CSR rows: the max weight per token id, specials and masked
    positions dropped, non-positive weights dropped (FlagEmbedding's `_process_token_weights`)."""

    name = OUTPUT_SPARSE

    def __init__(self, special_ids: Iterable[int]) -> None:
        self.special_ids = tuple(int(x) for x in special_ids)

    def host(self, values: Any, batch: Batch) -> SparseRows:
        weights = np.asarray(_host(values), dtype=np.float32)
        length = batch.input_ids.shape[1]
        return aggregate_sparse(weights[:, :length], batch.input_ids, batch.attention_mask, self.special_ids)

    # Collecting: CSR parts arrive batch by batch in any order; keep them with the inputs they are.
    def start(self, num_texts: int, hidden_size: int) -> tuple[list[SparseRows], list[np.ndarray]]:
        return [], []

    def put(self, store: tuple[list, list], rows: np.ndarray, result: SparseRows) -> None:
        store[0].append(result)
        store[1].append(rows)

    def done(self, store: tuple[list, list], num_texts: int) -> SparseRows:
        parts, inputs = store
        sparse = SparseRows.concat(parts)
        if parts:
            # Parts come in delivery order; invert that permutation to restore input order.
            position = np.empty(num_texts, dtype=np.int64)
            position[np.concatenate(inputs)] = np.arange(num_texts)
            sparse = sparse.take(position)
        return sparse

    def device(self, values: DeviceArray, batch: Batch, kernels: Any) -> SparseRows | None:
        if not _on_device_as_batch(values, batch, batch.input_ids.shape[1]):
            return None
        ids, mask = values.batch_inputs  # type: ignore[misc]
        return kernels.aggregate_sparse(values.ptr, ids.ptr, mask.ptr, values.shape, self.special_ids)


class ColbertHead:
    """[B, S'-1, D] -> per text its `tokens - 1` vectors (`<s>` dropped, `</s>` kept); float16 when
    `fp16` (converted on the device where the vectors are, halving what crosses PCIe)."""

    name = OUTPUT_COLBERT

    def __init__(self, fp16: bool = False) -> None:
        self.dtype = np.dtype(np.float16 if fp16 else np.float32)

    def host(self, values: Any, batch: Batch) -> list[np.ndarray]:
        vecs = np.asarray(_host(values), dtype=np.float32)[:, : batch.input_ids.shape[1] - 1]
        # float16 -> float32 -> float16 is exact, so a float16 graph output is returned unchanged.
        return [v.astype(self.dtype, copy=False) for v in split_colbert(vecs, batch.attention_mask)]

    # Collecting: one [n_i, D] array per text, by input position.
    def start(self, num_texts: int, hidden_size: int) -> list[np.ndarray | None]:
        return [None] * num_texts

    def put(self, store: list, rows: np.ndarray, result: list[np.ndarray]) -> None:
        for index, vecs in zip(rows.tolist(), result):
            store[index] = vecs

    def done(self, store: list, num_texts: int) -> list[np.ndarray]:
        return store

    def device(self, values: DeviceArray, batch: Batch, kernels: Any) -> list[np.ndarray] | None:
        if not _on_device_as_batch(values, batch, batch.input_ids.shape[1] - 1):
            return None
        counts = colbert_counts(batch.attention_mask)
        return kernels.compact_colbert(values.ptr, values.shape, counts, fp16=self.dtype == np.float16)


@dataclass(frozen=True)
class HeadSpec:
    """One head's names and reduction.

    `output`: the graph output; `api`: `encode`'s result key; `flag`: `encode`'s keyword asking for
    it; `serve`: its name in the HTTP API; `shape(hidden, colbert_dim)`: the graph output's symbolic
    shape as the manifest records it; `per_text`: whether its collected result is one array of rows
    ([texts, ...]) or one item per text.
    """

    output: str
    api: str
    flag: str
    serve: str
    shape: Callable[[int, int], list[Any]]
    reduction: Callable[[tuple[int, ...], bool], Any]


HEADS: tuple[HeadSpec, ...] = (
    HeadSpec(
        OUTPUT_DENSE, "dense_vecs", "return_dense", "dense",
        shape=lambda hidden, _: ["batch", hidden],
        reduction=lambda special_ids, colbert_fp16: DenseHead(),
    ),
    HeadSpec(
        OUTPUT_SPARSE, "lexical_weights", "return_sparse", "sparse",
        shape=lambda hidden, _: ["batch", "sequence"],
        reduction=lambda special_ids, colbert_fp16: SparseHead(special_ids),
    ),
    HeadSpec(
        OUTPUT_COLBERT, "colbert_vecs", "return_colbert_vecs", "colbert",
        shape=lambda _, colbert_dim: ["batch", "sequence - 1", colbert_dim],
        reduction=lambda special_ids, colbert_fp16: ColbertHead(colbert_fp16),
    ),
)  # fmt: skip
HEAD_OUTPUTS: tuple[str, ...] = tuple(h.output for h in HEADS)


def head(name: str) -> HeadSpec:
    """The head whose graph output, API key, flag or serve name is `name`."""
    for spec in HEADS:
        if name in (spec.output, spec.api, spec.flag, spec.serve):
            return spec
    raise KeyError(f"unknown head {name!r}; heads: {', '.join(HEAD_OUTPUTS)}")


def reductions(special_ids: Iterable[int], colbert_fp16: bool = False) -> dict[str, Any]:
    """Graph output -> its reduction (host and, where it has one, device)."""
    ids = tuple(int(x) for x in special_ids)
    return {spec.output: spec.reduction(ids, colbert_fp16) for spec in HEADS}
