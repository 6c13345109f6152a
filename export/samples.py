"""Built-in multilingual sample texts (queries and passages of mixed lengths)."""

from __future__ import annotations

from importlib import resources


def sample_texts() -> list[str]:
    text = resources.files("m3rt.export").joinpath("data/samples.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]
