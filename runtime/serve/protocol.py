"""Request bodies of the HTTP routes, and the JSON shapes of dense, sparse and ColBERT outputs."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Format = Literal["float", "base64"]
SparseFormat = Literal["indices_values", "dict"]
PositiveInt = Annotated[StrictInt, Field(ge=1)]
# One text as token ids of this model's vocabulary, without `<s>`/`</s>` (OpenAI's token-array input).
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
# NaN and infinities parse from JSON (Python's json module takes them) but no score can use them.
Weight = Annotated[StrictFloat, Field(allow_inf_nan=False)] | StrictInt


class _Request(BaseModel):
    # A misspelt option is an error, not a silently ignored field.
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None


class EmbeddingsRequest(_Request):
    """OpenAI's embeddings request; `return_sparse` / `return_colbert` add the other two outputs.
    Like OpenAI's, input over the token limit is refused unless `truncate` is true."""

    input: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    encoding_format: Format = "float"
    dimensions: PositiveInt | None = None
    user: StrictStr | None = None
    return_sparse: StrictBool = False
    return_colbert: StrictBool = False
    max_length: PositiveInt | None = None
    truncate: StrictBool = False


class EncodeRequest(_Request):
    """All three outputs of one forward pass, in the shapes vector databases take."""

    input: StrictStr | list[StrictStr]
    return_dense: StrictBool = True
    return_sparse: StrictBool = True
    return_colbert: StrictBool = False
    sparse_format: SparseFormat = "indices_values"
    encoding_format: Format = "float"
    max_length: PositiveInt | None = None
    truncate: StrictBool = True


class Document(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: StrictStr


class _ScoreOptions(_Request):
    # [dense, sparse, colbert], as `compute_score`'s weights_for_different_modes.
    weights: Annotated[list[Weight], Field(min_length=3, max_length=3)] | None = None
    max_query_length: PositiveInt | None = None
    max_passage_length: PositiveInt | None = None


class RerankRequest(_ScoreOptions):
    """Cohere's / Jina's rerank request."""

    query: StrictStr
    documents: list[StrictStr | Document]
    top_n: PositiveInt | None = None
    return_documents: StrictBool = False

    def document_texts(self) -> list[str]:
        return [doc if isinstance(doc, str) else doc.text for doc in self.documents]


class ScoreRequest(_ScoreOptions):
    """(query, passage) pairs, scored as `compute_score` scores them."""

    pairs: list[Annotated[list[StrictStr], Field(min_length=2, max_length=2)]]


def as_texts(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def as_token_ids(value: Any) -> list[list[int]] | None:
    """The rows of a token-id `input` (one row or several), or None for text input."""
    if isinstance(value, list) and value and isinstance(value[0], int):
        return [value]
    if isinstance(value, list) and value and isinstance(value[0], list):
        return value
    return None


def vector(values: np.ndarray, encoding: Format) -> list[float] | str:
    """A float32 vector as JSON floats, or as base64 of its little-endian bytes (OpenAI's format)."""
    values = np.asarray(values, dtype="<f4")
    if encoding == "base64":
        return base64.b64encode(values.tobytes()).decode("ascii")
    return values.tolist()


def matrix(values: np.ndarray, encoding: Format) -> list[list[float]] | dict[str, Any]:
    """ColBERT vectors [n, hidden]: nested floats, or base64 of the row-major float32 bytes with shape."""
    values = np.asarray(values, dtype="<f4")
    if encoding == "base64":
        return {
            "data": base64.b64encode(values.tobytes()).decode("ascii"),
            "shape": list(values.shape),
            "dtype": "float32",
        }
    return values.tolist()


def sparse(indices: np.ndarray, values: np.ndarray, fmt: SparseFormat) -> dict[str, Any]:
    """Token-id weights: `{indices, values}` (Qdrant, Milvus, Pinecone) or FlagEmbedding's
    `{"token_id": weight}` dict."""
    if fmt == "dict":
        return dict(zip(indices.astype(str).tolist(), values.astype(np.float32).tolist()))
    return {"indices": indices.astype(np.int64).tolist(), "values": values.astype(np.float32).tolist()}


def error_body(message: str, kind: str, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
