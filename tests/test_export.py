"""m3-export: checkpoints, failures that must be loud, and the command line."""

import shutil
import subprocess
import sys

import pytest

from m3rt.export.artifact import ExportOptions, export_artifact
from m3rt.export.checkpoint import CheckpointError, resolve_checkpoint
from m3rt.export.cli import main as export_main
from m3rt.export.validate import ValidationError
from m3rt.fidelity import reference_gate


@pytest.mark.parametrize("head", ["colbert_linear.pt", "sparse_linear.pt"])
def test_missing_head_is_an_error(tiny, tmp_path, head):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny[0], ckpt)
    (ckpt / head).unlink()
    with pytest.raises(CheckpointError, match=f"missing: {head}.*random"):
        resolve_checkpoint(str(ckpt), tmp_path)


def test_unknown_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        resolve_checkpoint("BAAI/bge-m3-does-not-exist", tmp_path)


def test_validation_failure_is_loud_and_leaves_no_artifact(tiny, tmp_path):
    out = tmp_path / "out"
    # An impossible tolerance stands in for a deviating graph: nothing is written, not even partly.
    with pytest.raises(ValidationError, match="deviates from the PyTorch reference"):
        export_artifact(ExportOptions(model=str(tiny[0]), output=out, tolerance=reference_gate(max_abs_diff=-1.0)))
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*")), "staging directory left behind"


def test_existing_output_needs_force(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    assert export_main(["--model", str(tiny[0]), "--output", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert export_main(["--model", str(tiny[0]), "--output", str(out), "--force"]) == 0
    assert not (out / "something").exists() and (out / "m3rt.json").is_file()
    printed = capsys.readouterr().out
    assert "dense_vecs" in printed and "min cosine" in printed


def test_synthetic_spec_exports_directly(tmp_path):
    out = tmp_path / "synth"
    assert export_main(["--model", "synthetic:tiny", "--output", str(out), "--seed", "3"]) == 0
    import json

    source = json.loads((out / "m3rt.json").read_text())["source"]
    assert source["kind"] == "synthetic" and source["seed"] == 3 and source["model"] == "synthetic:tiny"


def test_bad_synthetic_size(tmp_path, capsys):
    assert export_main(["--model", "synthetic:huge", "--output", str(tmp_path / "x")]) == 1
    assert "unknown synthetic size" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "m3rt.export.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--max-length" in result.stdout
    assert shutil.which("m3-export") and shutil.which("m3rt")


def test_each_graph_comes_from_its_builder_and_the_flash_graph_can_be_left_out(tiny, tmp_path):
    import json

    from m3rt.export.artifact import BUILDERS, GraphBuilder
    from m3rt.manifest import GraphInfo

    assert len({b.name for b in BUILDERS}) == len(BUILDERS)
    default = ExportOptions(model=str(tiny[0]), output=tmp_path / "a")
    assert [b.name for b in BUILDERS if b.wanted(default)] == ["fp32", "fp32-flash"]

    seen: list[GraphInfo] = []

    def recorded(builder: GraphBuilder) -> GraphBuilder:
        def build(ctx):
            info = builder.build(ctx)
            seen.append(info)
            return info

        return GraphBuilder(builder.name, builder.step, builder.wanted, build, builder.needs_reference)

    manifest = export_artifact(default, builders=tuple(recorded(b) for b in BUILDERS if not b.measure))
    assert [info.name for info in seen] == list(manifest["graphs"]) == ["fp32", "fp32-flash"]
    for info in seen:
        assert manifest["graphs"][info.name] == info.details and info.file in manifest["files"]

    assert export_main(["--model", str(tiny[0]), "--output", str(tmp_path / "b"), "--no-flash-attention"]) == 0
    data = json.loads((tmp_path / "b" / "m3rt.json").read_text())
    assert list(data["graphs"]) == ["fp32"] and not (tmp_path / "b" / "model.flash.onnx").exists()


def test_a_builder_that_fails_leaves_no_artifact(tiny, tmp_path):
    from m3rt.export.artifact import BUILDERS, GraphBuilder

    def broken(ctx):
        raise RuntimeError("builder failed")

    builders = (*BUILDERS[:1], GraphBuilder("fp32-flash", "broken", lambda opts: True, broken))
    with pytest.raises(RuntimeError, match="builder failed"):
        export_artifact(ExportOptions(model=str(tiny[0]), output=tmp_path / "out"), builders=builders)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
