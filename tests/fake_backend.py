"""The tests' one fake backend: the real ONNX Runtime backend behind a configurable failure model."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from m3rt import BackendError, BackendOutOfMemory
from m3rt.core import Capabilities


class FakeBackend:
    """Runs `inner` (a real backend), and on the way:

    - `thread_safe`, `max_rows`: what it declares to the core;
    - `out_of_memory_above`: (rows or padded tokens) -> True refuses the batch as out of memory;
    - `fail_on_call`: the n-th call (1-based) raises `error` (default a plain BackendError);
    - `meet`: with a thread-safe declaration, two runs must be inside `run` at once to pass;
    - records `calls` (batch shapes), the most runs seen at once, `refused`, `closed`.
    """

    name = "fake"

    def __init__(
        self,
        inner,
        *,
        thread_safe: bool = True,
        max_rows: Callable[[int], int] | None = None,
        out_of_memory_above: Callable[[np.ndarray], bool] | None = None,
        fail_on_call: int | None = None,
        error: BaseException | None = None,
        meet: bool = False,
    ) -> None:
        self.inner = inner
        self.capabilities = Capabilities(thread_safe=thread_safe, max_rows=max_rows)
        self.out_of_memory_above, self.fail_on_call = out_of_memory_above, fail_on_call
        self.error = error if error is not None else BackendError("provider exploded")
        self.calls: list[tuple[int, int]] = []
        self.refused = self.closed = self.active = self.most = 0
        self._lock = threading.Lock()
        self._meet = threading.Barrier(2, timeout=30) if meet else None

    def run(self, input_ids, attention_mask, outputs):
        with self._lock:
            self.calls.append(tuple(input_ids.shape))
            call = len(self.calls)
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            if self.fail_on_call is not None and call == self.fail_on_call:
                raise self.error
            if self.out_of_memory_above is not None and self.out_of_memory_above(input_ids):
                with self._lock:
                    self.refused += 1
                raise BackendOutOfMemory(f"out of memory on a batch of shape {tuple(input_ids.shape)}")
            if self._meet is not None:
                if self.capabilities.thread_safe:
                    self._meet.wait()  # passes only if two runs are inside at once
                else:
                    time.sleep(0.01)
            return self.inner.run(input_ids, attention_mask, outputs)
        finally:
            with self._lock:
                self.active -= 1

    def close(self) -> None:
        self.closed += 1
