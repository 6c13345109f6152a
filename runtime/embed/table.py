"""The Arrow schema of `m3rt embed`'s shards and the conversion of `encode`'s outputs to it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from m3rt.kernels.sparse import SparseRows

OUTPUTS = ("dense", "sparse", "colbert")
DENSE_DTYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}


def schema(outputs: Sequence[str], dim: int, dense_dtype: str = "float32") -> pa.Schema:
    """`id` string, `tokens` int32 (specials included, after truncation), then the outputs asked for:
    `dense` fixed-size list of `dim` floats, `sparse` struct of `indices` int32 / `values` float32
    (FlagEmbedding's lexical weights: max per token id, specials and zeros dropped, in order of first
    occurrence), `colbert` list of fixed-size float16 vectors (`<s>` dropped, `</s>` kept)."""
    fields = [pa.field("id", pa.string(), nullable=False), pa.field("tokens", pa.int32(), nullable=False)]
    if "dense" in outputs:
        fields.append(pa.field("dense", pa.list_(DENSE_DTYPES[dense_dtype][1], dim)))
    if "sparse" in outputs:
        sparse_type = pa.struct([("indices", pa.list_(pa.int32())), ("values", pa.list_(pa.float32()))])
        fields.append(pa.field("sparse", sparse_type))
    if "colbert" in outputs:
        fields.append(pa.field("colbert", pa.list_(pa.list_(pa.float16(), dim))))
    return pa.schema(fields)


def to_table(
    target: pa.Schema,
    ids: Sequence[str],
    tokens: Sequence[int],
    dense: np.ndarray | None,
    sparse: SparseRows | None,
    colbert: Sequence[np.ndarray] | None,
) -> pa.Table:
    columns: dict[str, pa.Array] = {
        "id": pa.array(list(ids), pa.string()),
        "tokens": pa.array(np.asarray(tokens, dtype=np.int32)),
    }
    if "dense" in target.names:
        value_type = target.field("dense").type.value_type
        flat = pa.array(np.ascontiguousarray(dense).ravel().astype(value_type.to_pandas_dtype()), value_type)
        columns["dense"] = pa.FixedSizeListArray.from_arrays(flat, dense.shape[1])
    if "sparse" in target.names:
        offsets = pa.array(sparse.indptr.astype(np.int32))
        indices = pa.ListArray.from_arrays(offsets, pa.array(sparse.indices.astype(np.int32)))
        values = pa.ListArray.from_arrays(offsets, pa.array(sparse.values.astype(np.float32)))
        columns["sparse"] = pa.StructArray.from_arrays([indices, values], names=["indices", "values"])
    if "colbert" in target.names:
        dim = target.field("colbert").type.value_type.list_size
        counts = np.array([len(v) for v in colbert], dtype=np.int64)
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        stacked = np.concatenate(list(colbert)) if len(colbert) else np.zeros((0, dim), np.float32)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(stacked.astype(np.float16).ravel()), dim)
        columns["colbert"] = pa.ListArray.from_arrays(offsets, vectors)
    return pa.Table.from_pydict(columns, schema=target)
