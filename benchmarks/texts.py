"""Benchmark inputs: texts of a given token length, and generated length distributions."""

from __future__ import annotations

import numpy as np

from m3rt.tokenizer import M3Tokenizer

# Token-length ranges of the generated workloads (specials included).
DISTRIBUTIONS = {"queries": (10, 30), "passages": (100, 300), "long": (2048, 8192), "short-passages": (60, 100)}
DEFAULT_DISTRIBUTIONS = ["queries", "passages", "long"]


class TextFactory:
    """Decodes windows of real multilingual token ids: lengths are controlled and the text is still
    text, so tokenisation does real work."""

    def __init__(self, tokenizer: M3Tokenizer, seed: int = 0) -> None:
        from m3rt.export.samples import calibration_texts, sample_texts

        corpus = " ".join(sample_texts() + calibration_texts())
        ids = tokenizer.encode([corpus], max_length=8192).ids[0][1:-1]
        self._ids = np.tile(ids, 2 * 8192 // max(len(ids), 1) + 2)
        self._tok = tokenizer
        self._rng = np.random.default_rng(seed)

    def _window(self, count: int) -> str:
        start = int(self._rng.integers(0, len(self._ids) - 8192))
        return self._tok.decode(self._ids[start : start + count].tolist())

    def at_least(self, tokens: int) -> str:
        """A text of at least `tokens` tokens: truncated to `max_length=tokens` it is exactly that long."""
        return self._window(tokens + tokens // 4 + 8)

    def distribution(self, name: str, count: int) -> list[str]:
        """About `count` texts whose lengths are uniform over the named range."""
        low, high = DISTRIBUTIONS[name]
        return [self._window(int(n) - 2) for n in self._rng.integers(low, high + 1, size=count)]
