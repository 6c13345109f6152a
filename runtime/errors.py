"""Exceptions m3rt raises on purpose, so callers can tell bad input from a broken artifact."""

from __future__ import annotations

from dataclasses import dataclass


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


class ExportError(M3Error):
    """Export failed: the checkpoint cannot be read, a graph does not match the reference, a rewrite
    did not apply."""


class BelowGateError(M3Error):
    """A graph misses the accuracy gate it is held to (an export variant; `m3rt compare`)."""


@dataclass(frozen=True)
class ErrorAnswer:
    """How an `M3Error` is answered: the CLI's exit status, the HTTP status and the error `code` of
    the API's error JSON."""

    exit_code: int
    http_status: int
    code: str


# Every M3Error, answered by its most specific class here. Out of memory is the server's state, not
# the request's: 503 with Retry-After over HTTP, EX_TEMPFAIL (75) on the command line.
ERROR_ANSWERS: dict[type[M3Error], ErrorAnswer] = {
    M3Error: ErrorAnswer(1, 500, "internal_error"),
    ArtifactError: ErrorAnswer(1, 500, "artifact_error"),
    InputError: ErrorAnswer(1, 400, "invalid_input"),
    InputTooLongError: ErrorAnswer(1, 400, "context_length_exceeded"),
    BackendError: ErrorAnswer(1, 500, "backend_error"),
    BackendOutOfMemory: ErrorAnswer(75, 503, "out_of_memory"),
    ExportError: ErrorAnswer(1, 500, "export_error"),
    BelowGateError: ErrorAnswer(3, 500, "below_gate"),
}


def error_answer(error: M3Error) -> ErrorAnswer:
    """The answer of `error`'s most specific class in `ERROR_ANSWERS`."""
    for cls in type(error).__mro__:
        if cls in ERROR_ANSWERS:
            return ERROR_ANSWERS[cls]
    return ERROR_ANSWERS[M3Error]
