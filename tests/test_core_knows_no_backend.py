"""The core names no backend plugin: no module under qcore/ imports one, and no code (docstrings
and comments aside) spells a plugin backend's name. The built-in ``reference`` backend is the
core's own."""

from __future__ import annotations

import ast
from pathlib import Path

import qcore

CORE = Path(qcore.__file__).resolve().parent
PLUGIN_BACKENDS = ("onednn", "xnnpack")


def _core_modules() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def _docstring_nodes(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def test_no_core_module_imports_a_backend_package():
    offenders = []
    for path in _core_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top.startswith("qcore_") or top in ("torchao", "executorch"):
                    offenders.append(f"{path.relative_to(CORE.parent)}:{node.lineno} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_no_core_code_names_a_plugin_backend():
    offenders = []
    for path in _core_modules():
        tree = ast.parse(path.read_text())
        docstrings = _docstring_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if any(name in node.value.lower() for name in PLUGIN_BACKENDS):
                    offenders.append(f"{path.relative_to(CORE.parent)}:{node.lineno}: {node.value[:60]!r}")
    assert not offenders, "\n".join(offenders)
