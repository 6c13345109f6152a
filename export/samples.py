"""Built-in multilingual texts: calibration text (int8), and the runtime's held-out samples."""

from __future__ import annotations

from importlib import resources

from m3rt.samples import sample_texts

__all__ = ["calibration_texts", "sample_texts"]


def calibration_texts() -> list[str]:
    """Default int8 calibration text, disjoint from `sample_texts`."""
    text = resources.files("m3rt.export").joinpath("data/calibration.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]
