"""Inference backends behind one small interface (`Backend`)."""

from m3rt.backends.base import BACKENDS, Backend, create_backend

__all__ = ["BACKENDS", "Backend", "create_backend"]
