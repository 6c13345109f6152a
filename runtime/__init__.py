"""m3rt: a fast, exact inference runtime for BGE-M3 (dense, sparse and ColBERT outputs)."""

from m3rt.errors import (
    ArtifactError,
    BackendError,
    BackendOutOfMemory,
    BelowGateError,
    ExportError,
    InputError,
    InputTooLongError,
    M3Error,
)
from m3rt.kernels.sparse import SparseRows
from m3rt.model import BGEM3FlagModel, M3Model

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "BGEM3FlagModel",
    "BackendError",
    "BackendOutOfMemory",
    "BelowGateError",
    "ExportError",
    "InputError",
    "InputTooLongError",
    "M3Error",
    "M3Model",
    "SparseRows",
    "__version__",
]
