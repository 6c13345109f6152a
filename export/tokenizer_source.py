"""Where a synthetic checkpoint's tokenizer comes from.

In order: a given XLM-R `tokenizer.json`; one in the local Hugging Face cache; else a small
Unigram tokenizer with XLM-R's special ids trained on the project's own sample text, so that
everything works on an offline machine with nothing downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from m3rt.export.samples import sample_texts

# XLM-R's special tokens and the ids BGE-M3 relies on.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
MASK_TOKEN = "<mask>"
HF_CACHE_CANDIDATES = (
    ("BAAI/bge-m3", "tokenizer.json"),
    ("FacebookAI/xlm-roberta-large", "tokenizer.json"),
    ("xlm-roberta-large", "tokenizer.json"),
    ("xlm-roberta-base", "tokenizer.json"),
)
ENV_TOKENIZER = "M3RT_TOKENIZER_JSON"


def _from_hf_cache() -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo, name in HF_CACHE_CANDIDATES:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


def train_fallback_tokenizer(vocab_size: int = 4000) -> Tokenizer:
    """A SentencePiece-style Unigram tokenizer: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, `<mask>` last."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(sample_texts(), trainer)
    tok.add_special_tokens([MASK_TOKEN])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return tok


def resolve_tokenizer(path: str | Path | None = None) -> tuple[Tokenizer, str]:
    """Returns the tokenizer and a description of where it came from (for the manifest)."""
    path = path or os.environ.get(ENV_TOKENIZER)
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        tok, origin = Tokenizer.from_file(str(path)), f"file:{path.name}"
    elif (cached := _from_hf_cache()) is not None:
        tok, origin = Tokenizer.from_file(str(cached)), f"hf-cache:{cached}"
    else:
        tok, origin = train_fallback_tokenizer(), "m3rt-fallback-unigram"
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != expected_id:
            raise ValueError(f"tokenizer ({origin}) maps {token} to {tok.token_to_id(token)}, XLM-R uses {expected_id}")
    # BGE-M3 sets truncation and padding per call; a file's own settings must not leak in.
    tok.no_truncation()
    tok.no_padding()
    return tok, origin
