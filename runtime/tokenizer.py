"""Tokenisation with FlagEmbedding's rules: truncation counts `<s>` and `</s>`, no padding here."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from m3rt.errors import InputError, InputTooLongError


@dataclass(frozen=True)
class Encoded:
    """Token ids of each text, un-padded, in input order."""

    ids: list[np.ndarray]


def _raise_for_unencodable(texts: Sequence[str], first_index: int) -> None:
    """InputError naming the first text that is not valid Unicode (e.g. a lone surrogate)."""
    for index, text in enumerate(texts, start=first_index):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(
                f"text {index} is not valid Unicode: {exc.reason} at character {exc.start} "
                f"({text[exc.start]!r}); repair it first, e.g. text.encode('utf-8', 'replace').decode('utf-8')"
            ) from None


# Characters per token a text is first cut at: more than any ordinary text needs (English ~4, CJK ~1),
# so one verification usually suffices; a text that needs more is retried at twice the length.
_CHARS_PER_TOKEN = 8
_MIN_CUT = 1024


def _cut(text: str, length: int) -> str:
    """`text`'s first `length` characters, ended before the last whitespace of their last quarter when
    there is one: the Metaspace pre-tokeniser splits there, so the words before it are tokenised as
    in the whole text (the cut is verified all the same, see `M3Tokenizer._encode_bounded`)."""
    if length >= len(text):
        return text
    for i in range(length - 1, length - length // 4, -1):
        if text[i].isspace():
            return text[:i]
    return text[:length]


class M3Tokenizer:
    """A thin wrapper over a Hugging Face `tokenizers` file (the artifact's `tokenizer.json`).

    Tokenisation is bounded by `max_length`, not by the text: `tokenizers` tokenises a whole text
    before it truncates (a 32 MB text without whitespace takes tens of seconds and gigabytes), so a
    long text is cut first, at a length whose first `max_length` tokens are verified to be those of
    the whole text.
    """

    def __init__(self, path: str | Path) -> None:
        self._tok = Tokenizer.from_file(str(path))
        # Padding is done by the scheduler per batch; the file's own settings must not interfere.
        self._tok.no_padding()
        self._tok.no_truncation()
        self._max_length: int | None = None
        # Truncation is state of the shared Rust tokenizer: setting it and encoding must be one step,
        # or a concurrent call with another max_length changes it mid-call (tokenizers' bindings
        # then raise "Already borrowed" or silently truncate to the other call's length).
        self._lock = threading.Lock()

    def _set_max_length(self, max_length: int) -> None:
        if self._max_length != max_length:
            self._tok.enable_truncation(max_length=max_length, stride=0, strategy="longest_first")
            self._max_length = max_length

    def encode(self, texts: Sequence[str], max_length: int, truncate: bool = True, *, first_index: int = 0) -> Encoded:
        """Tokenise `texts` to at most `max_length` ids each, specials included. Thread-safe.

        With `truncate=False` a text that does not fit raises InputTooLongError naming it by its
        index in the caller's input: `first_index` is that index of `texts[0]` (texts come in chunks).
        """
        texts = list(texts)
        first_cut = max(_MIN_CUT, _CHARS_PER_TOKEN * max_length)
        long = {i for i, text in enumerate(texts) if len(text) > 2 * first_cut}
        with self._lock:
            self._set_max_length(max_length)
            try:
                short = [i for i in range(len(texts)) if i not in long]
                batch = self._tok.encode_batch([texts[i] for i in short], add_special_tokens=True)
                encodings: list[Any] = [None] * len(texts)
                for i, enc in zip(short, batch):
                    encodings[i] = enc
                for i in long:
                    encodings[i] = self._encode_bounded(texts[i], first_cut)
            except TypeError:  # tokenizers' answer to a str that is not valid Unicode
                _raise_for_unencodable(texts, first_index)
                raise
        if not truncate:
            for index, enc in enumerate(encodings, start=first_index):
                if enc.overflowing:
                    raise InputTooLongError(
                        f"text {index} is longer than max_length={max_length} tokens (special tokens "
                        "included); shorten it, raise max_length, or pass truncate=True"
                    )
        return Encoded(ids=[np.asarray(enc.ids, dtype=np.int64) for enc in encodings])

    def _encode_bounded(self, text: str, cut: int) -> Any:
        """The truncated encoding of `text` from a prefix of it (truncation already set, lock held).

        Two prefixes, the second twice as long, agreeing on the truncated ids and both over the
        limit, show that what follows the first changes none of its first `max_length` tokens
        (the normaliser and the pre-tokeniser are local; only Unigram's best path within one
        whitespace-free word reaches back, and the longer prefix bounds how far). Otherwise the cut
        doubles, up to the whole text, so a text the cuts cannot settle costs about twice its
        full tokenisation, never a wrong result.
        """
        shorter = self._tok.encode(_cut(text, cut), add_special_tokens=True)
        while 2 * cut < len(text):
            longer = self._tok.encode(_cut(text, 2 * cut), add_special_tokens=True)
            if shorter.overflowing and longer.overflowing and shorter.ids == longer.ids:
                return shorter
            shorter, cut = longer, 2 * cut
        return self._tok.encode(text, add_special_tokens=True)

    def add_specials(self, rows: Sequence[Sequence[int]], max_length: int, truncate: bool = True) -> list[np.ndarray]:
        """Token ids given by the caller (no `<s>`/`</s>`) as `encode` returns a text's: within the
        vocabulary, framed by `<s>`/`</s>`, truncated to `max_length` or InputTooLongError."""
        bos, eos, vocab = self._tok.token_to_id("<s>"), self._tok.token_to_id("</s>"), self.vocab_size
        framed = []
        for index, row in enumerate(rows):
            ids = np.asarray(row, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                raise InputError(f"token ids of input {index} must be in [0, {vocab}) (this model's vocabulary)")
            if ids.size > max_length - 2:
                if not truncate:
                    raise InputTooLongError(
                        f"input {index} has {ids.size} token ids; with <s> and </s> over max_length={max_length}; "
                        "shorten it, raise max_length, or pass truncate=true"
                    )
                ids = ids[: max_length - 2]
            framed.append(np.concatenate([[bos], ids, [eos]]).astype(np.int64))
        return framed

    def encode_with_offsets(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each text's token ids without `<s>`/`</s>` and untruncated, with their character spans
        `[n, 2]` into the text (leading whitespace that a `▁` token absorbs excluded). Thread-safe."""
        texts = list(texts)
        with self._lock:
            self._tok.no_truncation()
            self._max_length = None
            try:
                encodings = self._tok.encode_batch(texts, add_special_tokens=False)
            except TypeError:
                _raise_for_unencodable(texts, 0)
                raise
        results = []
        for text, enc in zip(texts, encodings):
            spans = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            for row in spans:
                while row[0] < row[1] and text[row[0]].isspace():
                    row[0] += 1
            results.append((np.asarray(enc.ids, dtype=np.int64), spans))
        return results

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def decode_id(self, token_id: int) -> str:
        return self._tok.decode([int(token_id)], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)
