"""Built-in multilingual texts: held-out samples (validation, gates) and calibration text (int8)."""

from __future__ import annotations

from importlib import resources


def _lines(name: str) -> list[str]:
    text = resources.files("m3rt.export").joinpath(f"data/{name}").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def sample_texts() -> list[str]:
    """Queries and passages of mixed lengths; never used for calibration."""
    return _lines("samples.txt")


def calibration_texts() -> list[str]:
    """Default int8 calibration text, disjoint from `sample_texts`."""
    return _lines("calibration.txt")
