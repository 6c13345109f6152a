"""The runtime core between the scheduler and the backends: runs padded batches on one backend.

Backends only run what they are given and say what they can do (`Capabilities`); the core owns the
policies that follow from it, the same for every engine:

- locking: concurrent `encode` calls run a backend concurrently only when it says it is thread-safe;
- row limits: a batch with more rows than the backend takes at its padded length (a TensorRT
  profile's batch size) is run in slices;
- out of memory: a batch whose run raises `BackendOutOfMemory` is split in halves and retried, down
  to single texts; nothing is lost and nothing is run twice that succeeded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from m3rt.errors import BackendOutOfMemory
from m3rt.scheduler import Batch, split_batch, take_rows


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, read by the runtime core (this module and `M3Model`), never by anything else."""

    # `run` may be called from several threads at once (ONNX Runtime's session.run may).
    thread_safe: bool = False
    # Most rows one `run` accepts at a padded sequence length; None: no limit of its own.
    max_rows: Callable[[int], int] | None = None
    # The GPU whose memory `run` may leave outputs in (`m3rt.device_array.DeviceArray`s, for the
    # post-processor's device kernels, which the model prepares at load); None: host arrays only.
    output_device: int | None = None


class BatchRunner:
    """Runs batches on `backend` under its capabilities; results are (batch, outputs) pairs, several
    when the batch had to be split, together covering exactly the batch's texts."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.capabilities: Capabilities = backend.capabilities
        self._lock = threading.Lock()

    def run(self, batch: Batch, outputs: Sequence[str]) -> list[tuple[Batch, dict[str, Any]]]:
        limit = self.capabilities.max_rows(batch.input_ids.shape[1]) if self.capabilities.max_rows else None
        if limit is not None and len(batch.indices) > limit:
            rows = range(0, len(batch.indices), max(int(limit), 1))
            return [pair for start in rows for pair in self.run(take_rows(batch, start, start + limit), outputs)]
        try:
            return [(batch, self._run_once(batch, outputs))]
        except BackendOutOfMemory:
            if len(batch.indices) == 1:
                raise
        return [pair for part in split_batch(batch) for pair in self.run(part, outputs)]

    def _run_once(self, batch: Batch, outputs: Sequence[str]) -> dict[str, Any]:
        if self.capabilities.thread_safe:
            return self.backend.run(batch.input_ids, batch.attention_mask, outputs)
        with self._lock:
            return self.backend.run(batch.input_ids, batch.attention_mask, outputs)
