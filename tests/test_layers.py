"""The modules' dependencies point one way, as the data flows (read from the sources, lazy imports included).

    errors <- kernels <- scheduler, tokenizer, heads, manifest <- core <- backends <- placement
    <- postprocess, pipeline, validation <- granularity, explain <- model <- serve, CLI, benchmarks

Export and the benchmarks use the runtime, never the reverse. `ALLOWED` states, for every module and
package, the prefixes it may import; a module's most specific entry applies. No module imports a
private name of another, and no two modules import each other, directly or around a cycle.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGES = {
    "runtime/backends": "m3rt.backends",
    "runtime/serve": "m3rt.serve",
    "runtime/embed": "m3rt.embed",
    "runtime": "m3rt",
    "export": "m3rt.export",
    "kernels": "m3rt.kernels",
    "benchmarks": "m3rt.benchmarks",
}
ROOT = "m3rt"  # the package's facade (`from m3rt import M3Model`): an entry of its own, matched exactly

_RUNTIME_FOUNDATION = ("m3rt.errors", "m3rt.scheduler", "m3rt.tokenizer", "m3rt.heads", "m3rt.manifest")
_RUNTIME = (
    *_RUNTIME_FOUNDATION,
    ROOT,
    "m3rt.backends",
    "m3rt.core",
    "m3rt.device_array",
    "m3rt.explain",
    "m3rt.explain_view",
    "m3rt.fidelity",
    "m3rt.granularity",
    "m3rt.int8_kernel",
    "m3rt.kernels",
    "m3rt.long_document",
    "m3rt.memory",
    "m3rt.model",
    "m3rt.pipeline",
    "m3rt.placement",
    "m3rt.postprocess",
    "m3rt.profiles",
    "m3rt.samples",
    "m3rt.scoring",
    "m3rt.sentences",
    "m3rt.validation",
    "m3rt.bf16_gate",
    "m3rt.auto_precision",
)

# Module or package -> what it may import (prefixes on dotted boundaries; its own package's
# modules are listed too where they may use each other).
ALLOWED: dict[str, tuple[str, ...]] = {
    # Foundation: errors, the CUDA runtime API, the host and device kernels.
    "m3rt.errors": (),
    "m3rt.kernels.cuda_api": ("m3rt.errors",),
    "m3rt.kernels": ("m3rt.errors", "m3rt.kernels"),
    "m3rt.scheduler": (),
    "m3rt.int8_kernel": (),
    "m3rt.fidelity": ("m3rt.heads",),
    "m3rt.long_document": (),
    "m3rt.samples": (),
    "m3rt.ray_loopback": (),
    "m3rt.sentences": ("m3rt.errors",),
    "m3rt.scoring": ("m3rt.errors",),
    "m3rt.profiles": ("m3rt.errors",),
    "m3rt.memory": ("m3rt.errors",),
    "m3rt.tokenizer": ("m3rt.errors",),
    "m3rt.device_array": ("m3rt.kernels.cuda_api",),
    # The heads and the artifact format.
    "m3rt.heads": ("m3rt.device_array", "m3rt.kernels", "m3rt.scheduler"),
    "m3rt.manifest": ("m3rt.errors", "m3rt.heads"),
    # The core, the engines (the CUDA runtime API, not the post-processing kernels) and what picks them.
    "m3rt.core": ("m3rt.errors", "m3rt.scheduler"),
    "m3rt.backends": (
        "m3rt.backends",
        "m3rt.core",
        "m3rt.device_array",
        "m3rt.errors",
        "m3rt.int8_kernel",
        "m3rt.kernels.cuda_api",
        "m3rt.manifest",
        "m3rt.profiles",
    ),
    "m3rt.placement": ("m3rt.backends", "m3rt.errors", "m3rt.int8_kernel", "m3rt.kernels.cuda_api", "m3rt.manifest"),
    # Post-processing, the pipeline, and graphs measured through the core.
    "m3rt.postprocess": ("m3rt.device_array", "m3rt.errors", "m3rt.heads", "m3rt.kernels", "m3rt.scheduler"),
    "m3rt.pipeline": ("m3rt.scheduler",),
    "m3rt.validation": (
        *_RUNTIME_FOUNDATION,
        "m3rt.backends",
        "m3rt.core",
        "m3rt.fidelity",
        "m3rt.int8_kernel",
        "m3rt.placement",
        "m3rt.postprocess",
        "m3rt.samples",
    ),
    # What the model offers beyond encode, over its public surface.
    "m3rt.granularity": ("m3rt.errors", "m3rt.heads", "m3rt.long_document", "m3rt.postprocess", "m3rt.sentences"),
    "m3rt.explain": ("m3rt.errors", "m3rt.scoring"),
    "m3rt.explain_view": ("m3rt.explain",),
    # Measured choices at load: bf16's gate on this CPU, precision="auto" among the CPU's forms.
    "m3rt.bf16_gate": (
        *_RUNTIME_FOUNDATION, "m3rt.backends", "m3rt.fidelity", "m3rt.int8_kernel", "m3rt.validation"
    ),
    "m3rt.auto_precision": (
        *_RUNTIME_FOUNDATION, "m3rt.bf16_gate", "m3rt.int8_kernel", "m3rt.placement", "m3rt.validation"
    ),
    "m3rt.model": tuple(
        m for m in _RUNTIME if m not in (ROOT, "m3rt.model", "m3rt.explain_view", "m3rt.fidelity", "m3rt.samples")
    ),
    ROOT: ("m3rt.errors", "m3rt.kernels", "m3rt.model"),
    # On top: serving, corpus embedding, the command line, export and the benchmarks.
    "m3rt.serve": (*_RUNTIME, "m3rt.serve", "m3rt.ray_loopback"),
    "m3rt.embed": (*_RUNTIME, "m3rt.embed", "m3rt.ray_loopback"),
    "m3rt.cli": (*_RUNTIME, "m3rt.serve", "m3rt.embed", "m3rt.export", "m3rt.benchmarks"),
    "m3rt.export": (*_RUNTIME, "m3rt.export"),
    "m3rt.benchmarks": (*_RUNTIME, "m3rt.serve", "m3rt.embed", "m3rt.ray_loopback", "m3rt.export", "m3rt.benchmarks"),
}


@cache
def _modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _within(name: str, prefix: str) -> bool:
    if prefix == ROOT:
        return name == ROOT
    return name == prefix or name.startswith(prefix + ".")


def _ours(name: str | None) -> bool:
    return name is not None and (name == ROOT or name.startswith(ROOT + "."))


def _rule(module: str) -> str | None:
    keys = [key for key in ALLOWED if _within(module, key)]
    return max(keys, key=len) if keys else None


@cache
def _imports(module: str) -> tuple[tuple[str, str | None, int], ...]:
    """(imported module, imported name or None, line) of every m3rt import in `module`, however nested."""
    modules = _modules()
    found = []
    for node in ast.walk(ast.parse(modules[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and _ours(node.module):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in modules:
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((node.module, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if _ours(a.name)]
    return tuple(found)


def _edges() -> dict[str, set[str]]:
    return {m: {name for name, _, _ in _imports(m) if name != m} for m in _modules()}


def test_every_module_has_an_entry():
    assert {m: _rule(m) for m in _modules() if _rule(m) is None} == {}


def test_imports_follow_the_layers():
    wrong = []
    for module in _modules():
        allowed = ALLOWED[_rule(module)]
        for name, _, line in _imports(module):
            if name != module and not any(_within(name, prefix) for prefix in allowed):
                wrong.append(f"{module}:{line} imports {name}")
    assert wrong == []


def test_no_private_name_is_imported_across_modules():
    wrong = []
    for module in _modules():
        for name, imported, line in _imports(module):
            if name != module and (imported or "").startswith("_") and not imported.startswith("__"):
                wrong.append(f"{module}:{line} imports {name}.{imported}")
    assert wrong == []


def _defined_names(tree: ast.AST) -> set[str]:
    """Every name a module defines or assigns, as a name or as an attribute (`self._x = ...`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def test_no_private_attribute_of_another_module_is_read():
    """`model._runner` in granularity.py: a private name read in a module that does not define it."""
    wrong = []
    for module, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = _defined_names(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr not in defined
            ):
                wrong.append(f"{module}:{node.lineno} reads .{node.attr}")
    assert wrong == []


def test_no_import_cycle_between_modules():
    edges = _edges()
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if target not in edges:
                continue
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_layer_rules_catch_what_they_are_for():
    """The checks above would fail on the cycles and crossings they exist to prevent."""
    assert not any(_within("m3rt.model", p) for p in ALLOWED["m3rt.backends"])
    assert not any(_within("m3rt.export.samples", p) for p in ALLOWED["m3rt.validation"])
    assert not any(_within("m3rt.kernels.device", p) for p in ALLOWED["m3rt.backends"])
    assert any(_within("m3rt.kernels.cuda_api", p) for p in ALLOWED["m3rt.backends"])
    assert not any(_within(m, p) for m in ("m3rt.serve", "m3rt.benchmarks.bench") for p in ALLOWED["m3rt.export"])
    assert not _within("m3rt.model", ROOT) and _within("m3rt", ROOT)
