"""The modules' dependencies point one way: errors <- kernels <- runtime (read from the sources)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _m3rt_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("m3rt"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("m3rt"))
    return names


def test_kernels_import_nothing_of_the_runtime_but_its_errors():
    for source in (REPO / "kernels").glob("*.py"):
        outside = {m for m in _m3rt_imports(source) if not m.startswith("m3rt.kernels")} - {"m3rt.errors"}
        assert not outside, f"{source.name} imports {sorted(outside)}"


def test_backends_leave_post_processing_to_the_post_processor():
    for source in (REPO / "runtime" / "backends").glob("*.py"):
        imported = _m3rt_imports(source)
        assert not {"m3rt.postprocess", "m3rt.kernels", "m3rt.kernels.device"} & imported, source.name
