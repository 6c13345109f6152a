"""Shared fixtures: tiny synthetic checkpoints and their exported artifacts (built once per run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The real XLM-R tokenizer lives in the workplace's shared/ folder, beside the repository; outside
# users do not have it, so tests that need it skip. M3RT_XLMR_TOKENIZER overrides the location.
XLMR_TOKENIZER = Path(os.environ.get("M3RT_XLMR_TOKENIZER", REPO.parent / "shared/fixtures/xlm-roberta-tokenizer.json"))


def _export(tmp_root: Path, name: str, tokenizer: Path | None):
    from m3rt.export.artifact import ExportOptions, export_artifact
    from m3rt.export.synthetic import write_synthetic_checkpoint

    ckpt = write_synthetic_checkpoint(tmp_root / f"{name}-ckpt", size="tiny", seed=0, tokenizer=tokenizer)
    artifact = tmp_root / f"{name}-artifact"
    export_artifact(ExportOptions(model=str(ckpt), output=artifact))
    return ckpt, artifact


@pytest.fixture(scope="session", params=["fallback-tokenizer", "xlmr-tokenizer"])
def exported(request, tmp_path_factory):
    """(checkpoint dir, artifact dir): with the built-in fallback tokenizer and the real XLM-R one."""
    tokenizer = None
    if request.param == "xlmr-tokenizer":
        if not XLMR_TOKENIZER.is_file():
            pytest.skip(f"real XLM-R tokenizer not found at {XLMR_TOKENIZER}")
        tokenizer = XLMR_TOKENIZER
    return _export(tmp_path_factory.mktemp(request.param), request.param, tokenizer)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The fallback-tokenizer export only: for tests that do not depend on the vocabulary."""
    return _export(tmp_path_factory.mktemp("tiny"), "tiny", None)


@pytest.fixture(scope="session")
def tiny_model(tiny):
    from m3rt import M3Model

    return M3Model.load(tiny[1])


@pytest.fixture(scope="session")
def texts():
    from m3rt.export.samples import sample_texts

    # Mixed lengths plus edge cases FlagEmbedding handles: empty, whitespace, repeats.
    return sample_texts() + ["", "   ", "the the the the the", "a" * 300, "x"]
