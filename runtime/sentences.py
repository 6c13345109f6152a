"""Multilingual sentence splitting with character offsets.

Built on `sentencex` (rule-based, ~300 languages, Rust core, character offsets): it ends sentences on
the terminal punctuation of Latin, Cyrillic, Greek (`;` as the question mark), CJK (`。！？`), Arabic
(`؟` `۔`), Devanagari (`।` `॥`) and other scripts, and knows many languages' abbreviations ("Dr.",
"p.m.") so they do not end a sentence. Paragraph breaks (blank lines) always end one.

What it does not do, and what is added here:
- it needs a language for its abbreviation lists; each text's language is guessed from its dominant
  script (Greek `el`, Cyrillic `ru`, Arabic `ar`, Devanagari `hi`, Han `zh`, kana `ja`, Hangul `ko`,
  Thai `th`, else `en`); pass `language=` to choose one. Punctuation of other scripts inside the text
  still ends sentences, so mixed-script text splits sensibly whichever language is chosen.
- Thai and Lao have no sentence punctuation: writers separate sentences (and clauses) by a space.
  A whitespace run between two characters of those scripts is therefore treated as a boundary.
- it is not a statistical model: no sentence ends without punctuation, a paragraph break or (Thai, Lao)
  a space; abbreviations outside its lists may end one early.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from m3rt.errors import InputError

_SCRIPT_LANGUAGE = {
    "GREEK": "el",
    "CYRILLIC": "ru",
    "ARABIC": "ar",
    "DEVANAGARI": "hi",
    "CJK": "zh",
    "HIRAGANA": "ja",
    "KATAKANA": "ja",
    "HANGUL": "ko",
    "THAI": "th",
}
# Scripts written without spaces between words, where a space separates sentences or clauses.
_SPACE_SEPARATED_SENTENCE_SCRIPTS = "\u0e00-\u0e7f\u0e80-\u0eff"  # Thai, Lao
# Whitespace outside ASCII (no-break, thin, ideographic spaces...): sentencex 1.0.32 panics on some of
# them before a full stop ("Plan B\u00a0. Then"). Each becomes one ASCII space, so offsets are unchanged.
_NON_ASCII_SPACE = re.compile(r"[^\S\x00-\x7f]")
# Where sentencex cannot split a text: terminal punctuation of the scripts above, then whitespace.
_FALLBACK_END = re.compile(r"[.!?;。！？؟۔।॥]+[\"')\]»”’]*(?=\s)|\n\s*\n")
_SPACE_BOUNDARY = re.compile(rf"(?<=[{_SPACE_SEPARATED_SENTENCE_SCRIPTS}])\s+(?=[{_SPACE_SEPARATED_SENTENCE_SCRIPTS}])")


def guess_language(text: str, sample: int = 2000) -> str:
    """An ISO 639-1 code for `sentencex` from the dominant script of the first `sample` letters."""
    scripts: Counter[str] = Counter()
    for char in text[:sample]:
        if not char.isalpha():
            continue
        name = unicodedata.name(char, "")
        script = name.split(" ", 1)[0]
        scripts["CJK" if script == "CJK" else script] += 1
    for script, _count in scripts.most_common():
        if script in _SCRIPT_LANGUAGE:
            return _SCRIPT_LANGUAGE[script]
        if script == "LATIN":
            return "en"
    return "en"


def _sentencex_spans(text: str, language: str) -> list[tuple[int, int]]:
    try:
        from sentencex import get_sentence_boundaries
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("sentence granularity needs sentencex: pip install 'm3rt[granularity]'") from exc
    try:
        bounds = get_sentence_boundaries(language, _NON_ASCII_SPACE.sub(" ", text))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # noqa: BLE001 - a Rust panic arrives as pyo3's PanicException, a BaseException
        return _fallback_spans(text)
    return [(int(b["start_index"]), int(b["end_index"])) for b in bounds]


def _fallback_spans(text: str) -> list[tuple[int, int]]:
    cuts = [m.end() for m in _FALLBACK_END.finditer(text)]
    return [(lo, hi) for lo, hi in zip([0, *cuts], [*cuts, len(text)]) if hi > lo]


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def split_sentences(text: str, language: str | None = None) -> list[tuple[int, int]]:
    """Character spans `(start, end)` of the sentences of `text`, in order, without surrounding
    whitespace; `text[start:end]` is the sentence. Whitespace-only text has no sentences."""
    if language is not None and not isinstance(language, str):
        raise InputError(f"language must be an ISO 639-1 code such as 'de', got {language!r}")
    if not text or text.isspace():
        return []
    spans: list[tuple[int, int]] = []
    for start, end in _sentencex_spans(text, language or guess_language(text)):
        cuts = [m.start() for m in _SPACE_BOUNDARY.finditer(text, start, end)]
        for lo, hi in zip([start, *cuts], [*cuts, end]):
            lo, hi = _strip(text, lo, hi)
            if hi > lo:
                spans.append((lo, hi))
    return spans
