"""Tokenisation of long texts is bounded by max_length, and its ids are those `tokenizers` gives the whole text."""

import functools
import random

import pytest
from conftest import XLMR_TOKENIZER
from tokenizers import Tokenizer

from m3rt.errors import InputTooLongError
from m3rt.export.tokenizer_source import train_fallback_tokenizer
from m3rt.tokenizer import M3Tokenizer


@pytest.fixture(scope="module", params=["fallback", "xlmr"])
def tokenizer_file(request, tmp_path_factory):
    if request.param == "xlmr":
        if not XLMR_TOKENIZER.is_file():
            pytest.skip(f"real XLM-R tokenizer not found at {XLMR_TOKENIZER}")
        return XLMR_TOKENIZER
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_fallback_tokenizer().save(str(path))
    return path


@functools.cache
def _plain_tokenizer(path):
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    return tok


def _reference(path, texts, max_length):
    """`tokenizers` on the whole texts, truncated afterwards: what the bounded path must equal."""
    tok = _plain_tokenizer(path)
    tok.enable_truncation(max_length=max_length)
    return tok.encode_batch(texts, add_special_tokens=True)


def _adversarial(n: int) -> dict[str, str]:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    scripts = [letters, "абвгдежзиклмн", "ابتثجحخدذرزسش", "的一是不了人我在有他这中大来上"]
    scripts += ["αβγδεζηθ", "🙂🚀👍🏽", "0123456789"]

    def mixed(space_every: int | None) -> str:
        out = []
        for i in range(n):
            out.append(rng.choice(rng.choice(scripts)))
            if space_every and i % space_every == space_every - 1:
                out.append(rng.choice(" \t\n"))
        return "".join(out)

    words = " ".join(rng.choice(["the", "tokenizer", "naïve", "Übergröße", "x"]) for _ in range(n // 4))
    return {
        "one repeated letter": "a" * n,
        "random letters, no whitespace": "".join(rng.choice(letters) for _ in range(n)),
        "combining marks": "e\u0301\u0302" * (n // 3),
        "whitespace then combining marks": (" \u0301" + "o\u0308") * (n // 4),
        "U+337F grows 4x under NFKC": "\u337f" * n,
        "U+FDFA grows 18x under NFKC": "\ufdfa" * n,
        "U+FDFA between words": ("\ufdfa x " * n)[:n],
        "mixed scripts, no whitespace": mixed(None),
        "mixed scripts, some whitespace": mixed(37),
        "CJK": "".join(rng.choice("的一是不了人我在有他这中大来上個們") for _ in range(n)),
        "words": words,
        "words then a huge word": words[: n // 3] + " " + "".join(rng.choice(letters) for _ in range(n)),
        "leading whitespace": " " * n + words,
        "zero-width characters first": "\u200b" * n + words,
        "control characters": ("\x00\x01 a\x7f" * n)[:n],
    }


@pytest.mark.parametrize("max_length", [3, 16, 130, 512])
def test_long_texts_match_the_whole_texts_tokens(tokenizer_file, max_length):
    ours = M3Tokenizer(tokenizer_file)
    # Long enough to take the bounded path (over twice its first cut at every max_length here).
    cases = _adversarial(12 * max(1024, 8 * max_length))
    names, texts = list(cases), list(cases.values())
    want = _reference(tokenizer_file, texts, max_length)
    got = ours.encode(texts, max_length=max_length).ids
    for name, g, w in zip(names, got, want):
        assert g.tolist() == w.ids, name


def test_truncate_false_refuses_exactly_the_texts_that_overflow(tokenizer_file):
    ours = M3Tokenizer(tokenizer_file)
    cases = _adversarial(3000)
    for name, text in cases.items():
        overflows = bool(_reference(tokenizer_file, [text], 64)[0].overflowing)
        if overflows:
            with pytest.raises(InputTooLongError):
                ours.encode([text], max_length=64, truncate=False)
        else:
            assert ours.encode([text], max_length=64, truncate=False).ids[0].tolist() == (
                _reference(tokenizer_file, [text], 64)[0].ids
            ), name


def test_32_mb_without_whitespace_is_cut_before_tokenising(tokenizer_file):
    """The whole 32 MB text would take tens of seconds and gigabytes; its first 8192 tokens come from
    its start, compared here with `tokenizers` on the first 256k characters (over 20x what they need)."""
    rng = random.Random(1)
    block = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzабвгд的一是") for _ in range(1 << 16))
    text = block * 512  # 32 Mi characters
    got = M3Tokenizer(tokenizer_file).encode([text], max_length=8192).ids[0]
    want = _reference(tokenizer_file, [text[: 1 << 18]], 8192)[0]
    assert len(got) == 8192
    assert got.tolist() == want.ids
