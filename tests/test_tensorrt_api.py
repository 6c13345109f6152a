"""Every TensorRT name m3rt uses exists in TensorRT 10.x and 11.x.

TensorRT cannot run here (its wheels come from NVIDIA's own index), but its Python bindings
wheels are on PyPI. Their extension module registers every class, method, property and enum
value by name, so each name the engine builder and the TensorRT backend use must appear in it.
Skips when the wheels cannot be downloaded (offline).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "export" / "engine.py", REPO / "runtime" / "backends" / "tensorrt.py"]
WHEELS = {"10.x": "tensorrt-cu12-bindings==10.16.1.11", "11.x": "tensorrt-cu13-bindings==11.4.0.106"}
# Local names that hold TensorRT objects in those files: attributes read from them are TensorRT API.
TRT_OBJECTS = {
    "trt",
    "builder",
    "network",
    "parser",
    "config",
    "profile",
    "cache",
    "engine",
    "context",
    "runtime",
    "logger",
    "self._engine",
    "self._context",
    "self._trt",
}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def used_names() -> set[str]:
    names = set()
    for source in SOURCES:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Attribute):
                base = _dotted(node.value) or ""
                if base in TRT_OBJECTS or base.split(".")[0] == "trt" or base.startswith("self._trt."):
                    names.add(node.attr)
    names -= {"__version__"}  # a module attribute, not part of the bindings
    return names


def test_the_scan_finds_the_api_we_rely_on():
    names = used_names()
    assert {
        "create_network",
        "STRONGLY_TYPED",
        "execute_async_v3",
        "set_tensor_address",
        "build_serialized_network",
        "set_optimization_profile_async",
        "deserialize_cuda_engine",
    } <= names


@pytest.fixture(scope="module", params=sorted(WHEELS))
def bindings(request, tmp_path_factory):
    target = tmp_path_factory.mktemp(f"trt-{request.param}")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(target), WHEELS[request.param]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    wheels = list(target.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        pytest.skip(f"cannot download {WHEELS[request.param]}: {result.stderr.strip()[-200:]}")
    with zipfile.ZipFile(wheels[0]) as archive:
        blobs = [archive.read(n) for n in archive.namelist() if n.endswith(".so") or ".so." in n]
        package = archive.read("tensorrt_bindings/__init__.py").decode()
    assert blobs, "no extension module in the bindings wheel"
    # Helpers such as `nptype` are plain Python in the package's __init__.py.
    python_names = {n.name for n in ast.parse(package).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return request.param, b"\0".join(blobs), python_names


def test_every_name_exists_in_the_bindings(bindings):
    version, blob, python_names = bindings
    missing = sorted(
        n
        for n in used_names()
        if n not in python_names and f"\0{n}\0".encode() not in blob and n.encode() + b"\0" not in blob
    )
    assert not missing, f"not in TensorRT {version} bindings: {missing}"


def test_the_check_can_fail(bindings):
    _, blob, python_names = bindings
    assert b"\0create_network\0" in blob or b"create_network\0" in blob
    assert b"execute_async_v2\0" not in blob, "removed in TensorRT 10: a name check must reject it"
    assert "nptype" in python_names
