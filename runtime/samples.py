"""The built-in held-out texts: queries and passages of mixed lengths in many languages.

The runtime measures graphs on them (`m3rt.validation`), the export records its gates on them;
they are never used for calibration (that text is the export's own, `m3rt.export.samples`).
"""

from __future__ import annotations

from importlib import resources


def sample_texts() -> list[str]:
    """Queries and passages of mixed lengths; never used for calibration."""
    text = resources.files("m3rt").joinpath("data/samples.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]
