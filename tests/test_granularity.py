"""Multi-granularity encoding on the tiny model, checked from first principles."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from m3rt import InputError, M3Model
from m3rt.granularity import GranularityOptions, plan_texts, token_windows
from m3rt.long_document import owned_ranges
from m3rt.sentences import split_sentences

from fake_backend import FakeBackend

EVERYTHING = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
TEXT = (
    "Dr. Smith went to Washington. He arrived at 5 p.m. today! The meeting was short. "
    "Everyone agreed on the plan, and the committee went home early. Tomorrow is another day."
)


@pytest.fixture(scope="module")
def model(exported):
    return M3Model.load(exported[1])


def _normalize(v):
    return v / np.linalg.norm(v)


def _run_ids(model, ids):
    """The graph on one input of token ids: the reference for a window or sentence piece."""
    ids = np.asarray(ids, dtype=np.int64)[None]
    return model.backend.run(ids, np.ones_like(ids), ["dense_vecs", "sparse_weights", "colbert_vecs"])


def test_one_window_passage_and_document_equal_encode(model):
    plain = model.encode(TEXT, **EVERYTHING)
    levels = model.encode(TEXT, granularity=["passage", "document"], **EVERYTHING)
    for level in ("passage", "document"):
        got = levels[level]
        assert got["dense_vecs"].shape == (1, model.manifest.hidden_size)
        np.testing.assert_array_equal(got["dense_vecs"][0], plain["dense_vecs"])
        assert got["lexical_weights"][0] == plain["lexical_weights"]
        np.testing.assert_array_equal(got["colbert_vecs"][0], plain["colbert_vecs"])
        assert got["offsets"].tolist() == [[0, len(TEXT)]]


def test_token_offsets_slice_back_to_each_tokens_text(model, exported):
    text = "Hello world, this is   a test. Ünïcode café and numbers 12345 here!"
    result = model.encode(text, granularity="token")
    vocab = Tokenizer.from_file(str(exported[1] / "tokenizer.json"))
    ids, offsets = result["token"]["token_ids"], result["token"]["offsets"]
    assert ids.tolist() == vocab.encode(text, add_special_tokens=False).ids
    for token_id, (start, end) in zip(ids.tolist(), offsets.tolist()):
        piece = vocab.id_to_token(token_id).replace("\u2581", "")
        if piece == "<unk>":  # the characters it stands for
            assert end > start and not text[start:end].isspace()
        else:
            assert text[start:end] == piece, (token_id, start, end)


def test_token_level_reads_the_documents_encoding(model):
    plain = model.encode(TEXT, **EVERYTHING)
    token = model.encode(TEXT, granularity="token", **EVERYTHING)["token"]
    n = len(token["token_ids"])
    # ColBERT rows are positions 1.. (the text's tokens, then </s>).
    np.testing.assert_array_equal(token["colbert_vecs"], plain["colbert_vecs"][:n])
    # A lexical weight is the largest weight of its id's tokens (ids not special).
    best: dict[str, float] = {}
    for token_id, weight in zip(token["token_ids"].tolist(), token["sparse_weights"].tolist()):
        if weight > 0 and token_id not in (0, 1, 2, 3):  # FlagEmbedding drops <s> <pad> </s> <unk>
            best[str(token_id)] = max(best.get(str(token_id), 0.0), weight)
    lexical = {k: float(v) for k, v in plain["lexical_weights"].items()}
    assert lexical == pytest.approx(best)


def test_sentence_pieces_equal_encoding_each_sentence(model):
    result = model.encode(TEXT, granularity="sentence", **EVERYTHING)["sentence"]
    sentences = [TEXT[a:b] for a, b in result["offsets"].tolist()]
    assert sentences == [
        "Dr. Smith went to Washington.",
        "He arrived at 5 p.m. today!",
        "The meeting was short.",
        "Everyone agreed on the plan, and the committee went home early.",
        "Tomorrow is another day.",
    ]
    alone = model.encode(sentences, **EVERYTHING)
    np.testing.assert_array_equal(result["dense_vecs"], alone["dense_vecs"])
    assert result["lexical_weights"] == alone["lexical_weights"]
    for got, want in zip(result["colbert_vecs"], alone["colbert_vecs"]):
        np.testing.assert_array_equal(got, want)


def test_identical_pieces_are_encoded_once(model):
    inner = model.backend
    counting = FakeBackend(inner)
    counted = M3Model(model.manifest, counting, model.tokenizer)
    text = "The cat sat. The cat sat. The cat sat."
    result = counted.encode([text, text], granularity=["sentence", "passage", "document"], **EVERYTHING)
    assert len(result) == 2 and result[0]["sentence"]["offsets"].shape == (3, 2)
    # Unique inputs: the sentence "The cat sat." and the whole text (one passage window == the document).
    assert sum(rows for rows, _ in counting.calls) == 2
    plans, sequences = plan_texts(
        [text], ["sentence", "passage", "document"], model.tokenizer, GranularityOptions(max_length=512), 0, 2
    )
    assert len(sequences) == 2
    assert plans[0].levels["passage"][0].sequence == plans[0].document[0].sequence


def test_passage_windows_overlap_and_snap_to_sentence_ends(model):
    options = {"passage_tokens": 24, "passage_overlap": 4, "passage_snap": 8}
    result = model.encode(TEXT, granularity=["passage", "token"], granularity_options=options, **EVERYTHING)
    token_offsets = result["token"]["offsets"]
    windows = result["passage"]["offsets"].tolist()
    assert len(windows) > 1 and windows[0][0] == 0 and windows[-1][1] == len(TEXT)
    ranges = result["passage"]["token_ranges"].tolist()
    sentence_ends = {end for _, end in split_sentences(TEXT)}
    for (_, end), (next_start, _), (lo, hi), (next_lo, _) in zip(windows, windows[1:], ranges, ranges[1:]):
        assert next_start < end and hi - next_lo == 4  # overlap
        # A window ends at a sentence end, or is full (no sentence ended in its last 8 tokens).
        assert end in sentence_ends or hi - lo == 22
    assert any(end in sentence_ends for _, end in windows[:-1])
    # Each window is exactly its tokens, encoded as one input.
    for (start, end), (lo, hi), dense in zip(windows, ranges, result["passage"]["dense_vecs"]):
        assert hi - lo + 2 <= 24
        assert (token_offsets[lo, 0], token_offsets[hi - 1, 1]) == (start, end)
        ids = [0, *result["token"]["token_ids"][lo:hi].tolist(), 2]
        np.testing.assert_allclose(dense, _run_ids(model, ids)["dense_vecs"][0], atol=1e-6)


def test_token_windows_cover_every_token_within_bounds():
    boundaries = np.array([5, 17, 30, 44, 61])
    for n in (1, 9, 10, 11, 63, 200):
        windows = token_windows(n, 10, 3, boundaries, 4)
        assert windows[0][0] == 0 and windows[-1][1] == n
        for (lo, hi), (next_lo, next_hi) in zip(windows, windows[1:]):
            assert hi - lo <= 10 and next_lo < hi and next_lo > lo and next_hi > hi
            assert hi - next_lo <= 3
        owned = owned_ranges([(w, i) for i, w in enumerate(windows)])
        assert owned[0][0] == 0 and owned[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(owned, owned[1:]))
        assert all(lo <= a and b <= hi for (a, b), (lo, hi) in zip(owned, windows))


def test_long_document_pools_windows(model):
    max_length = 24
    doc = model.encode(TEXT, max_length=max_length, granularity=["document", "token"], **EVERYTHING)
    token_ids = doc["token"]["token_ids"]
    ranges = [tuple(r) for r in doc["document"]["window_token_ranges"].tolist()]
    assert len(ranges) > 1 and ranges[0][0] == 0 and ranges[-1][1] == len(token_ids)
    assert all(hi - lo + 2 <= max_length for lo, hi in ranges)
    runs = [_run_ids(model, [0, *token_ids[lo:hi].tolist(), 2]) for lo, hi in ranges]
    owned = owned_ranges([(r, i) for i, r in enumerate(ranges)])
    weights = np.array([hi - lo for lo, hi in owned], dtype=np.float64)
    pooled = _normalize((np.stack([r["dense_vecs"][0] for r in runs]) * weights[:, None]).sum(axis=0))
    np.testing.assert_allclose(doc["document"]["dense_vecs"][0], pooled, atol=1e-6)
    # Every token's ColBERT vector comes from the window that owns it.
    colbert = doc["document"]["colbert_vecs"][0]
    assert colbert.shape[0] == len(token_ids) + 1
    for (w_lo, _), (lo, hi), run in zip(ranges, owned, runs):
        np.testing.assert_allclose(colbert[lo:hi], run["colbert_vecs"][0][lo - w_lo : hi - w_lo], atol=1e-6)
    np.testing.assert_allclose(doc["token"]["colbert_vecs"], colbert[:-1])
    # Lexical weights: the largest over windows.
    lexical = doc["document"]["lexical_weights"][0]
    for token_id in set(token_ids.tolist()) - {0, 1, 2, 3}:
        best = max(
            float(r["sparse_weights"][0][1:-1][token_ids[lo:hi] == token_id].max(initial=0))
            for (lo, hi), r in zip(ranges, runs)
        )
        if best > 0:
            assert float(lexical[str(token_id)]) == pytest.approx(best, abs=1e-6)


def test_truncate_strategy_is_flagembeddings_truncation(model):
    doc = model.encode(
        TEXT, max_length=24, granularity="document", granularity_options={"long_document": "truncate"}, **EVERYTHING
    )["document"]
    plain = model.encode(TEXT, max_length=24, **EVERYTHING)
    np.testing.assert_array_equal(doc["dense_vecs"][0], plain["dense_vecs"])
    assert doc["lexical_weights"][0] == plain["lexical_weights"]
    assert doc["offsets"][0, 1] < len(TEXT)


def test_every_text_gets_one_result_in_order(model):
    texts = ["First text. Two sentences.", "", "   ", "Third."]
    results = model.encode(texts, granularity=["sentence", "document"])
    assert len(results) == 4
    assert results[1]["sentence"]["offsets"].shape == (0, 2)
    assert results[1]["sentence"]["dense_vecs"].shape == (0, model.manifest.hidden_size)
    np.testing.assert_array_equal(results[3]["document"]["dense_vecs"][0], model.encode("Third.")["dense_vecs"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"granularity": "paragraph"},
        {"granularity": []},
        {"granularity": "passage", "granularity_options": {"passage_tokens": 2}},
        {"granularity": "passage", "granularity_options": {"passage_tokens": 16, "passage_overlap": 14}},
        {"granularity": "document", "granularity_options": {"long_document": "summarise"}},
        {"granularity": "document", "granularity_options": {"max_length": 10}},
        {"granularity": "document", "granularity_options": {"windows": 3}},
        {"granularity": 5},
        {"granularity": ["sentence", 5]},
        {"granularity": "sentence", "granularity_options": {"language": 5}},
        {"granularity": "document", "granularity_options": {"long_document": "mcls", "document_overlap": 8170}},
        {"granularity": "document", "granularity_options": GranularityOptions(max_length=100_000)},
        {"granularity": "document", "max_length": 64, "granularity_options": GranularityOptions(max_length=32)},
    ],
)
def test_bad_granularity_arguments_are_input_errors(model, kwargs):
    with pytest.raises(InputError):
        model.encode("some text", **kwargs)


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("Dr. Smith arrived at 5 p.m. today. Did he?", ["Dr. Smith arrived at 5 p.m. today.", "Did he?"]),
        ("我喜欢猫。你呢？很好！", ["我喜欢猫。", "你呢？", "很好！"]),
        ("Привет. Как дела? Хорошо!", ["Привет.", "Как дела?", "Хорошо!"]),
        ("Γεια σου. Τι κάνεις; Καλά.", ["Γεια σου.", "Τι κάνεις;", "Καλά."]),
        ("مرحبا بك. كيف حالك؟ أنا بخير.", ["مرحبا بك.", "كيف حالك؟", "أنا بخير."]),
        ("मैं ठीक हूँ। आप कैसे हैं?", ["मैं ठीक हूँ।", "आप कैसे हैं?"]),
        ("ฉันชอบแมว ฉันชอบหมา", ["ฉันชอบแมว", "ฉันชอบหมา"]),
        ("A line\n\nA new paragraph", ["A line", "A new paragraph"]),
        ("  ", []),
    ],
)
def test_multilingual_sentences(text, sentences):
    assert [text[a:b] for a, b in split_sentences(text)] == sentences


def test_document_windows_do_not_depend_on_other_levels(model):
    text = " ".join([TEXT] * 4)
    kwargs = dict(max_length=64, **EVERYTHING)
    alone = model.encode(text, granularity="document", **kwargs)["document"]
    together = model.encode(text, granularity=["document", "sentence", "passage"], **kwargs)["document"]
    assert alone["window_token_ranges"].tolist() == together["window_token_ranges"].tolist()
    np.testing.assert_array_equal(alone["dense_vecs"], together["dense_vecs"])
    # ... and they do end at sentence ends where one is near.
    ends = {end for _, end in split_sentences(text)}
    assert any(end in ends for _, end in alone["window_offsets"][:-1].tolist())


@pytest.mark.parametrize("space", ["\u00a0", "\u2009", "\u3000"])
def test_sentences_around_non_ascii_spaces(model, space):
    # sentencex 1.0.32 panics (a BaseException from Rust) on "B\u00a0." and the like.
    text = f"Plan B{space}. Then it rained. Le chapitre A{space}. Suite"
    spans = split_sentences(text)
    assert spans and all(text[a:b].strip() == text[a:b] and b > a for a, b in spans)
    # Every character but whitespace lies in exactly one sentence, in order.
    assert "".join("".join(text[a:b].split()) for a, b in spans) == "".join(text.split())
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))
    out = model.encode(text, granularity="sentence", return_dense=True)
    assert len(out["sentence"]["offsets"]) == len(spans)


def test_documents_need_no_room_for_passages(model):
    # max_length 2 fits no passage, but a document (and compute_score) takes it.
    out = model.encode(["hello", "world"], granularity="document", max_length=2, return_dense=True)
    assert [len(o["document"]["dense_vecs"]) for o in out] == [1, 1]


def test_a_memory_budget_must_be_finite(exported):
    for budget in (float("inf"), float("nan"), "-1GiB"):
        with pytest.raises(InputError):
            M3Model.load(exported[1], memory_budget=budget)


def test_colbert_fp16_has_one_dtype_whatever_the_window_count(exported):
    model = M3Model.load(exported[1], colbert_fp16=True)
    text = " ".join([TEXT] * 4)
    for max_length in (512, 32):  # one window, then several
        doc = model.encode(text, granularity=["document", "token"], max_length=max_length, return_colbert_vecs=True)
        assert doc["document"]["colbert_vecs"][0].dtype == np.float16, max_length
        assert doc["token"]["colbert_vecs"].dtype == np.float16, max_length
