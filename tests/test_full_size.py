"""The full-size synthetic model (BGE-M3's real shape): export and parity. Slow: `pytest -m slow`."""

import pytest

from m3rt import M3Model

from parity import assert_outputs

pytestmark = pytest.mark.slow


def test_full_size_export_matches_flag_embedding(tmp_path, texts):
    from conftest import XLMR_TOKENIZER
    from FlagEmbedding import BGEM3FlagModel

    from m3rt.export.artifact import ExportOptions, export_artifact
    from m3rt.export.synthetic import write_synthetic_checkpoint

    tokenizer = XLMR_TOKENIZER if XLMR_TOKENIZER.is_file() else None
    ckpt = write_synthetic_checkpoint(tmp_path / "ckpt", size="full", tokenizer=tokenizer)
    manifest = export_artifact(ExportOptions(model=str(ckpt), output=tmp_path / "artifact"))
    assert manifest["model"]["hidden_size"] == 1024 and manifest["model"]["num_hidden_layers"] == 24
    assert manifest["model"]["vocab_size"] == 250002
    assert set(manifest["files"]) == {"model.onnx", "model.onnx.data", "tokenizer.json"}

    batch = texts[:12] + [" ".join(texts) * 4]  # the last one is over 2048 tokens
    kw = dict(batch_size=4, max_length=2048, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    ours = M3Model.load(tmp_path / "artifact").encode(batch, **kw)
    reference = BGEM3FlagModel(str(ckpt), use_fp16=False, devices="cpu").encode(batch, **kw)
    assert_outputs(ours, reference)
