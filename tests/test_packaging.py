"""One distribution, `m3rt`; no bare top-level `export`, `runtime` or `kernels` is installed, and no folder
of the checkout shadows an installed distribution when commands run from its root."""

import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _importable_from_root() -> set[str]:
    """Top-level names that a regular import finds in the checkout when its root is on sys.path first
    (`python -m ...`, `python -c`, a REPL started there): packages with an __init__.py and modules."""
    names = {p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return names | {p.stem for p in REPO.glob("*.py")}


def test_public_modules_import():
    import m3rt
    import m3rt.export
    import m3rt.kernels.device
    import m3rt.kernels.sparse

    assert hasattr(m3rt, "M3Model") and hasattr(m3rt.kernels.sparse, "aggregate_sparse")


def test_no_bare_top_level_modules(tmp_path):
    """m3rt installs nothing bare: `kernels` may exist (Hugging Face's distribution), never from here."""
    names = ("export", "runtime", "kernels", "benchmarks")
    code = (
        "import importlib.util as u, sys; "
        f"specs = [u.find_spec(n) for n in {names!r}]; "
        "print([s.name for s in specs if s and any(p.startswith(sys.argv[1]) "
        "for p in [s.origin or '', *(s.submodule_search_locations or [])])])"
    )
    # From an unrelated directory, so that the checkout itself is not on sys.path.
    result = subprocess.run(
        [sys.executable, "-c", code, str(REPO)], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_no_top_level_folder_has_an_installed_distributions_name():
    installed = metadata.packages_distributions()
    clashes = {name: installed[name] for name in _importable_from_root() if name in installed}
    assert not clashes, f"these folders of the checkout would shadow installed distributions: {clashes}"


def test_hugging_faces_kernels_is_imported_from_the_root_and_m3rt_kernels_still_works(tmp_path):
    """transformers >= 5.25 imports the `kernels` distribution when it is installed: run from the root
    (the root first on sys.path, as `python -m pytest` has it), `import kernels` must find that
    distribution, not m3rt's `kernels/` folder, while `m3rt.kernels` keeps working."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = object\n")
    code = (
        "import sys; sys.path.insert(1, sys.argv[1]); "
        "import kernels, m3rt.kernels.sparse; "
        "print(kernels.__file__); print(m3rt.kernels.sparse.__file__)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(site)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    distribution, ours = result.stdout.split()
    assert Path(distribution) == site / "kernels" / "__init__.py"
    assert Path(ours).resolve() == REPO / "kernels" / "sparse.py"
    assert "kernels" not in _importable_from_root()


def test_runtime_needs_no_torch(tmp_path):
    code = (
        "import sys, m3rt, m3rt.model, m3rt.cli, m3rt.backends.onnxruntime; "
        "print([m for m in ('torch', 'transformers', 'pyarrow', 'ray', 'openvino') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    # The base install and the `cpu` extra run every verb but those of the other extras.
    assert result.stdout.strip() == "[]"


def test_base_requirements_have_no_torch():
    requires = metadata.requires("m3rt") or []
    base = [r for r in requires if "extra ==" not in r]
    assert not any(r.lower().startswith(("torch", "transformers", "onnxruntime-gpu")) for r in base)
    assert metadata.entry_points(group="console_scripts").select(name="m3-export")
