"""OpenVINO on the full-size synthetic model: fp32 against FlagEmbedding, bf16 within its gate on the
held-out texts. Slow: `pytest -m slow` (run it under `flock /tmp/heavy.lock` on a shared machine)."""

import pytest

pytestmark = pytest.mark.slow


def test_full_size_openvino_fp32_and_bf16(tmp_path, texts):
    pytest.importorskip("openvino")
    from conftest import XLMR_TOKENIZER
    from FlagEmbedding import BGEM3FlagModel

    from m3rt import M3Model
    from m3rt.backends.openvino import bf16_flags
    from m3rt.bf16_gate import record_bf16_gate
    from m3rt.export.artifact import ExportOptions, export_artifact
    from m3rt.export.synthetic import write_synthetic_checkpoint
    from m3rt.fidelity import DEFAULT_GATES

    from parity import assert_outputs

    tokenizer = XLMR_TOKENIZER if XLMR_TOKENIZER.is_file() else None
    ckpt = write_synthetic_checkpoint(tmp_path / "ckpt", size="full", tokenizer=tokenizer)
    artifact = tmp_path / "artifact"
    export_artifact(ExportOptions(model=str(ckpt), output=artifact))
    kw = dict(batch_size=4, max_length=512, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    ours = M3Model.load(artifact, backend="openvino").encode(texts[:12], **kw)
    reference = BGEM3FlagModel(str(ckpt), use_fp16=False, devices="cpu").encode(texts[:12], **kw)
    assert_outputs(ours, reference)
    if bf16_flags():
        fidelity = record_bf16_gate(artifact)["fidelity"]
        assert fidelity["passed"] and not DEFAULT_GATES["bf16"].failures(fidelity)
