"""Exceptions m3rt raises on purpose, so callers can tell bad input from a broken artifact."""

from __future__ import annotations


class M3Error(Exception):
    """Base class of every error m3rt raises deliberately."""


class ArtifactError(M3Error):
    """The artifact directory is missing, incomplete, corrupted or of an unknown format."""


class InputError(M3Error, ValueError):
    """An encode/score argument is invalid (wrong type, empty where not allowed, out of range)."""


class InputTooLongError(InputError):
    """A text exceeds max_length tokens and truncation was disabled."""


class BackendError(M3Error):
    """The inference backend failed on well-formed input (out of memory, provider failure)."""


class BackendOutOfMemory(BackendError):
    """A batch did not fit in the backend's memory. Backends raise it from their engine's own error
    (a CUDA error code, ONNX Runtime's allocator message); `M3Model` splits the batch and retries."""
