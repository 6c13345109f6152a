"""Inference backends behind one small interface (`Backend`)."""

from m3rt.backends.base import Backend, available_backends, create_backend

__all__ = ["Backend", "available_backends", "create_backend"]
