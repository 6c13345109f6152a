"""The C library's tokenizer gives Hugging Face `tokenizers`' ids, id for id, for the real XLM-R
tokenizer and the synthetic one: built-in samples, adversarial text, every code point, generated
Unicode, truncation, and the refusal of components it does not implement."""

from __future__ import annotations

import json

import pytest
from capi_binding import CapiError, Tokenizer
from capi_fixtures import capi, capi_build_dir  # noqa: F401
from conftest import XLMR_TOKENIZER
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from m3rt.export.samples import calibration_texts, sample_texts

INVALID_INPUT, UNSUPPORTED, INPUT_TOO_LONG = 4, 3, 5
SPECIALS = ["<s>", "</s>", "<pad>", "<unk>", "<mask>"]

ADVERSARIAL = [
    "",
    " ",
    "     ",
    "a      b",
    "  leading and trailing  ",
    "\t\ttabs\tand\nnew\nlines\n",
    "CRLF line\r\nnext line\r\n",
    "\r",
    "e\u0301t\u0301e\u0301",  # NFD accents
    "\u1100\u1161\u11a8\u1100\u1161",  # NFD Hangul (conjoining jamo)
    "\u110b\u1161\u11ab\u1102\u1167\u11bc\u1112\u1161\u1109\u1166\u110b\u116d",
    "ﾊﾝｶｸｶﾀｶﾅ ﾃﾞｽ ｶﾞｷﾞｸﾞ",  # half-width katakana with voiced marks
    "ｱｲｳｴｵ、。「」",
    "Ｆｕｌｌｗｉｄｔｈ　ＡＢＣ　１２３",
    "a\u0300\u0301\u0302\u0303\u0304\u0305\u0306\u0307\u0308\u0309",  # stacked combining marks
    "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dA",
    "zero\u200bwidth\u200cjoiner\u200dand\ufeffbom",
    "soft\u00adhyphen and nbsp\u00a0here",
    "emoji 😀👍🏽👨‍👩‍👧‍👦🏳️‍🌈 flags 🇯🇵🇫🇷 keycap 1️⃣",
    "<s>special</s> in text <mask> and <unk> <pad>",
    "<s><s></s></s>",
    "x<mask>y <mask>  z   <mask>",
    "<s",
    "</s",
    "< s >",
    "ℌℍℎ ㍿ ① ½ ﬁ ﬀ ẛ̣",
    "Ǆ ǅ ǆ İ ı ß ẞ ς σ Σ",
    "العربية مع التشكيل: مُحَمَّدٌ",
    "हिन्दी क्षत्रिय ज्ञ",
    "ไทย ภาษาไทย",
    "中文，标点！日本語。한국어?",
    "\u0000nul\u0001ctl\u007fdel\u0085nel",
    "\u2028line sep\u2029para sep",
    "\ue000private use\U000f0000",
    "\U0001e030\U0001fbf0\ua7f2\U0001f16c new in Unicode 12-15",
    "tab\u000bvt\u000cff",
    "a" * 500,
    "ab " * 300,
]


def _xlmr_or_skip():
    if not XLMR_TOKENIZER.is_file():
        pytest.skip(f"real XLM-R tokenizer not found at {XLMR_TOKENIZER}")
    return XLMR_TOKENIZER


@pytest.fixture(scope="session", params=["synthetic", "xlmr"])
def tokenizer_path(request, tiny):
    return tiny[1] / "tokenizer.json" if request.param == "synthetic" else _xlmr_or_skip()


@pytest.fixture(scope="session")
def pair(capi, tokenizer_path):  # noqa: F811
    return Tokenizer(capi, tokenizer_path), HFTokenizer.from_file(str(tokenizer_path))


def _assert_same(pair, texts, add_special_tokens=True):
    ours, hf = pair
    for text in texts:
        want = hf.encode(text, add_special_tokens=add_special_tokens).ids
        got = ours.encode(text, add_special_tokens=add_special_tokens)
        assert got == want, f"{text!r}: {got[:40]} != {want[:40]}"


def test_builtin_samples(pair):
    _assert_same(pair, sample_texts() + calibration_texts())


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_adversarial(pair, add_special_tokens):
    _assert_same(pair, ADVERSARIAL, add_special_tokens)


def test_every_code_point(pair):
    # Each code point as a word of its own and glued to its neighbours (surrogates are not text).
    points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    chunks = [points[i : i + 500] for i in range(0, len(points), 500)]
    _assert_same(pair, [sep.join(map(chr, chunk)) for chunk in chunks for sep in (" ", "")])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.one_of(
            st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
            st.sampled_from(SPECIALS + [" ", "  ", "\u3000", "\r\n", "\u0301", "\u200d", "\ufe0f"]),
        ),
        max_size=12,
    ).map("".join)
)
def test_generated_unicode(pair, text):
    _assert_same(pair, [text])


@pytest.mark.parametrize("max_length", [2, 3, 16, 100, 8192])
def test_truncation_matches_tokenizers(capi, tokenizer_path, max_length):  # noqa: F811
    ours = Tokenizer(capi, tokenizer_path)
    hf = HFTokenizer.from_file(str(tokenizer_path))
    hf.enable_truncation(max_length=max_length, stride=0, strategy="longest_first")
    for text in sample_texts()[:10] + [" ".join(sample_texts()) * 3]:
        want = hf.encode(text)
        assert ours.encode(text, max_length=max_length) == want.ids
        if want.overflowing:
            with pytest.raises(CapiError) as err:
                ours.encode(text, max_length=max_length, truncate=False)
            assert err.value.code == INPUT_TOO_LONG
        else:
            assert ours.encode(text, max_length=max_length, truncate=False) == want.ids


def test_text_over_8192_tokens(pair):
    ours, hf = pair
    text = " ".join(sample_texts()) * 20
    want = hf.encode(text).ids
    assert len(want) > 8192
    assert ours.encode(text) == want
    assert ours.encode(text, max_length=8192) == want[:8191] + [want[-1]]


@pytest.mark.parametrize("max_length", [16, 512, 8192])
def test_truncating_long_texts_reads_only_their_start(capi, tokenizer_path, max_length):  # noqa: F811
    """Truncation tokenises only a prefix that ends at a safe cut: the ids are still tokenizers' ids of
    the whole text, truncated, for texts whose cuts fall among spaces, tabs, newlines, CJK, combining
    marks, added tokens and whitespace-free runs."""
    ours = Tokenizer(capi, tokenizer_path)
    hf = HFTokenizer.from_file(str(tokenizer_path))
    hf.enable_truncation(max_length=max_length)
    pieces = ADVERSARIAL + sample_texts()
    texts = [
        " ".join(pieces) * 40,
        "".join(pieces) * 40,
        "\n".join(p + " <mask>" for p in pieces) * 40,
        ("x" * 50000) + " tail " + "word " * 5000,
        "日本語のテキスト。" * 20000,
        ("ab" + "\u0301" * 3 + " ") * 20000,
    ]
    for text in texts:
        assert ours.encode(text, max_length=max_length) == hf.encode(text).ids


def test_decode_single_ids(pair):
    ours, hf = pair
    size = hf.get_vocab_size(with_added_tokens=True)
    for token_id in list(range(0, 300)) + list(range(size - 50, size)):
        assert ours.id_to_text(token_id) == hf.decode([token_id], skip_special_tokens=False)
    assert ours.id_to_text(size + 10) is None


def test_invalid_utf8_is_an_input_error(capi, tiny):  # noqa: F811
    ours = Tokenizer(capi, tiny[1] / "tokenizer.json")
    for data in (b"ok \xff", b"\xed\xa0\x80 surrogate", b"truncated \xe2\x96", b"\xc0\xaf overlong"):
        with pytest.raises(CapiError) as err:
            ours.encode_bytes(data)
        assert err.value.code == INVALID_INPUT and "UTF-8" in err.value.message


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda d: d.update(normalizer={"type": "Lowercase"}), "Lowercase"),
        (lambda d: d.update(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False}), "ByteLevel"),
        (lambda d: d.update(post_processor={"type": "RobertaProcessing"}), "RobertaProcessing"),
        (lambda d: d["model"].update(type="BPE"), "BPE"),
        (lambda d: d.update(decoder={"type": "ByteLevel"}), "ByteLevel"),
    ],
)
def test_unsupported_components_are_refused_at_load(capi, tiny, tmp_path, edit, named):  # noqa: F811
    data = json.loads((tiny[1] / "tokenizer.json").read_text(encoding="utf-8"))
    edit(data)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CapiError) as err:
        Tokenizer(capi, path)
    assert err.value.code == UNSUPPORTED and named in err.value.message


_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
EXTRA_ADDED = [
    dict(content=content, **dict(zip(_FLAGS, flags)))
    for content, flags in [
        # normalised before matching (full-width letters are matched after NFKC / the charsmap)
        ("ＨＥＬＬＯ", (False, False, False, True, False)),
        # a piece of the model's vocabulary: tokenizers gives it the model's id, not a new one
        ("wor", (True, True, True, True, False)),
        ("[X]", (False, True, True, False, False)),
        ("[X]", (True, False, False, False, True)),
        ("<sep>", (False, False, True, False, True)),
    ]
]
EXTRA_TEXTS = [
    "HELLO world",
    "ＨＥＬＬＯ",
    "say hello HELLO  wor  ld wor",
    "x wor y",
    "aworb",
    " [X] a[X]b  [X]  ",
    "HELLOHELLO",
    "<s>HELLO</s><sep>  next",
    "  wor",
    "wor",
]


def test_added_tokens_are_assigned_and_matched_as_tokenizers_does(capi, tokenizer_path, tmp_path):  # noqa: F811
    data = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    # The "id" written in the file is ignored by tokenizers when it loads: write wrong ones on purpose.
    data["added_tokens"] += [{"id": 5, **token} for token in EXTRA_ADDED]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    pair = Tokenizer(capi, path), HFTokenizer.from_file(str(path))
    _assert_same(pair, EXTRA_TEXTS + ADVERSARIAL)
    ours, hf = pair
    for token_id in range(hf.get_vocab_size(with_added_tokens=True) - 5, hf.get_vocab_size(with_added_tokens=True)):
        assert ours.id_to_text(token_id) == hf.decode([token_id], skip_special_tokens=False)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=40))
def test_arbitrary_bytes_are_tokenised_or_refused(pair, data):
    """Any byte string: valid UTF-8 gives tokenizers' ids, anything else a clean INVALID_INPUT."""
    ours, hf = pair
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(CapiError) as err:
            ours.encode_bytes(data)
        assert err.value.code == INVALID_INPUT
        return
    assert ours.encode_bytes(data) == hf.encode(text).ids
