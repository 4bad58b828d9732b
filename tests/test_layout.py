"""The architecture in the tree: one folder per concern, dependencies pointing one way, no cycles.

Imports are read with `ast` from every module of `bnfold/` and `service/`, including imports inside
functions (a late import still ties two modules together), so a cycle cannot hide behind laziness.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# room -> rooms it may import. Lower layers first: a room never imports one that lists it.
ALLOWED = {
    "bnfold.errors": set(),
    "bnfold.onnx_graph": {"bnfold.errors"},
    "bnfold.report": {"bnfold.errors"},
    "bnfold.runtime": set(),
    "bnfold.provenance": {"bnfold.errors", "bnfold"},
    "bnfold.inputs": {"bnfold.errors", "bnfold.onnx_graph"},
    "bnfold.engine": {"bnfold.errors", "bnfold.onnx_graph", "bnfold.report", "bnfold.inputs", "bnfold.runtime"},
    "bnfold.folding": {"bnfold.errors", "bnfold.onnx_graph", "bnfold.runtime"},
    "bnfold.quantize": {"bnfold.errors", "bnfold.onnx_graph", "bnfold.inputs"},
    "bnfold.trust": {"bnfold.errors", "bnfold.report", "bnfold.inputs", "bnfold.runtime"},
    "bnfold.pipeline": {"bnfold.errors", "bnfold.onnx_graph", "bnfold.report", "bnfold.provenance",
                        "bnfold.inputs", "bnfold.engine", "bnfold.folding", "bnfold.quantize", "bnfold.trust"},
    "bnfold.client": {"bnfold", "bnfold.errors", "bnfold.report"},
    "bnfold.cli": {"bnfold", "bnfold.errors", "bnfold.report", "bnfold.inputs", "bnfold.pipeline", "bnfold.quantize",
                   "bnfold.client", "bnfold.demo", "bnfold.trust", "service"},
    "bnfold.demo": {"bnfold", "bnfold.errors", "bnfold.report", "bnfold.inputs", "bnfold.engine", "bnfold.pipeline"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The modules of `modules` that `path` imports (``from pkg import module`` counts as the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {i for i in found if i in modules and i != name}


def _graph() -> dict[str, set[str]]:
    paths = [p for top in ("bnfold", "service") for p in (ROOT / top).rglob("*.py")]
    modules = {_module_name(p): p for p in paths}
    return {name: _imports(path, name, set(modules)) for name, path in modules.items()}


def _room(module: str) -> str:
    for room in sorted(ALLOWED, key=len, reverse=True):
        if module == room or module.startswith(room + "."):
            return room
    return "service" if module.startswith("service") else module


def test_no_import_cycles():
    graph = _graph()
    # Tarjan-free: a cycle exists iff some module reaches itself.
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            current = todo.pop()
            if current == start:
                pytest.fail(f"import cycle through {start}")
            if current not in seen:
                seen.add(current)
                todo.extend(graph.get(current, ()))


def test_rooms_depend_one_way():
    wrong = []
    for module, imported in _graph().items():
        room = _room(module)
        if room not in ALLOWED:
            continue
        for target in imported:
            other = _room(target)
            if other != room and other not in ALLOWED[room]:
                wrong.append(f"{module} imports {target} ({room} → {other})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    """The checks above see function-level imports: a planted late import back is caught."""
    fake = {"a": {"b"}, "b": {"a"}}
    monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: fake)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()
    tree = ast.parse("def f():\n    from bnfold.cli import app\n")
    assert any(isinstance(n, ast.ImportFrom) and n.module == "bnfold.cli" for n in ast.walk(tree))


def test_core_import_loads_no_web_cli_image_or_client_dependency():
    code = ("import sys, bnfold; bnfold.recalibrate; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'fastapi','starlette','httpx','tenacity','typer','rich','PIL','tifffile','sqlalchemy','service'}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]"
