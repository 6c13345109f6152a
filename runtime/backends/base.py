"""The backend interface: padded int64 ids + mask in, the graph's named outputs out.

The scheduler, tokenizer and post-processing only see this; nothing else knows which engine runs.
Which backend runs what is decided by `m3rt.placement` (its engine registry builds them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from m3rt.core import Capabilities


class Backend(Protocol):
    name: str
    # What the core may do with it: thread safety, row limits, device-resident outputs.
    capabilities: Capabilities

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: Sequence[str]) -> dict[str, Any]:
        """Run one padded batch; returns the requested outputs: float32 NumPy arrays, or (GPU backends)
        `m3rt.device_array.DeviceArray`s that `m3rt.postprocess` reduces on the device."""
        ...
