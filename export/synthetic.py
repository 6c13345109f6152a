"""Synthetic BGE-M3 checkpoints: random weights in BAAI/bge-m3's exact file layout.

`tiny` runs in seconds on a CPU; `full` has BGE-M3's real shape (24 x 1024, vocab 250002).
Both load in transformers (`AutoModel`) and in FlagEmbedding's `BGEM3FlagModel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from m3rt.export.tokenizer_source import resolve_tokenizer


@dataclass(frozen=True)
class SyntheticSize:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    min_vocab_size: int


SIZES = {
    "tiny": SyntheticSize(64, 2, 4, 128, 0),
    # a twentieth of the full model's encoder compute per token: for throughput figures taken in minutes
    "small": SyntheticSize(384, 6, 12, 1536, 0),
    "full": SyntheticSize(1024, 24, 16, 4096, 250002),
}
MAX_POSITION_EMBEDDINGS = 8194  # 8192 tokens + padding_idx offset, as BGE-M3


# With transformers' default init (std 0.02), 24 random layers of near-uniform attention average every
# token into one vector: texts end up with dense cosine ~0.93 to each other and the sparse head
# fires on almost no token, which makes fidelity figures (fp16, int8) meaningless. Sharper
# attention and damped residual branches keep BGE-M3-like statistics (measured on the built-in
# samples at full size: dense cosine between texts ~0.75, between tokens of a text ~0.5) while
# staying as well conditioned in fp32 as a trained model (fp32 vs fp64 hidden states within 2e-5).
QUERY_KEY_SCALE = 4.0
RESIDUAL_BRANCH_SCALE = 0.5


@torch.no_grad()
def _keep_tokens_apart(model: nn.Module) -> None:
    for layer in model.encoder.layer:
        layer.attention.self.query.weight.mul_(QUERY_KEY_SCALE)
        layer.attention.self.key.weight.mul_(QUERY_KEY_SCALE)
        layer.attention.output.dense.weight.mul_(RESIDUAL_BRANCH_SCALE)
        layer.output.dense.weight.mul_(RESIDUAL_BRANCH_SCALE)


def write_synthetic_checkpoint(
    out_dir: str | Path, size: str = "tiny", seed: int = 0, tokenizer: str | Path | None = None
) -> Path:
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast

    if size not in SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; choose from {', '.join(SIZES)}")
    shape = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok, origin = resolve_tokenizer(tokenizer)
    hf_tok = XLMRobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=8192,
    )
    hf_tok.save_pretrained(out)
    (out / "TOKENIZER_SOURCE").write_text(origin + "\n", encoding="utf-8")

    config = XLMRobertaConfig(
        vocab_size=max(tok.get_vocab_size(with_added_tokens=True), shape.min_vocab_size),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        hidden_act="gelu",
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        architectures=["XLMRobertaModel"],
    )
    torch.manual_seed(seed)
    model = XLMRobertaModel(config).eval()
    _keep_tokens_apart(model)
    model.save_pretrained(out, safe_serialization=True)

    # BGE-M3 ships both heads as fp16 state dicts next to the encoder.
    colbert = nn.Linear(shape.hidden_size, shape.hidden_size)
    sparse = nn.Linear(shape.hidden_size, 1)
    torch.save({k: v.half() for k, v in colbert.state_dict().items()}, out / "colbert_linear.pt")
    torch.save({k: v.half() for k, v in sparse.state_dict().items()}, out / "sparse_linear.pt")
    return out
