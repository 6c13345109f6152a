"""One distribution, `m3rt`; no bare top-level `export`, `runtime` or `kernels` is installed."""

import subprocess
import sys
from importlib import metadata


def test_public_modules_import():
    import m3rt
    import m3rt.export
    import m3rt.kernels

    assert hasattr(m3rt, "M3Model") and hasattr(m3rt.kernels, "aggregate_sparse")


def test_no_bare_top_level_modules(tmp_path):
    names = ("export", "runtime", "kernels", "benchmarks")
    code = f"import importlib.util as u; print([n for n in {names!r} if u.find_spec(n)])"
    # From an unrelated directory, so that the checkout itself is not on sys.path.
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_runtime_needs_no_torch(tmp_path):
    code = (
        "import sys, m3rt, m3rt.model, m3rt.cli, m3rt.backends.onnxruntime; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False False"


def test_base_requirements_have_no_torch():
    requires = metadata.requires("m3rt") or []
    base = [r for r in requires if "extra ==" not in r]
    assert not any(r.lower().startswith(("torch", "transformers", "onnxruntime-gpu")) for r in base)
    assert metadata.entry_points(group="console_scripts").select(name="m3-export")
