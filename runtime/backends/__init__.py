"""Inference backends behind one small interface (`Backend`); `m3rt.placement` chooses and builds them."""

from m3rt.backends.base import Backend

__all__ = ["Backend"]
