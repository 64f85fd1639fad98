"""The package's import structure: the modules the Snakefile reads when it plans the workflow (errors, config, io,
runner) import without torch and without the dataset module, and no import cycle exists between the modules."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "taxotrait"
LIGHT_MODULES = ("errors", "config", "io", "runner")


def imported_modules(path: Path) -> set[str]:
    """The taxotrait modules that the module at `path` imports, at module level or inside a function (a lazy import
    is a cycle too once its function runs)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(filter(None, ["taxotrait" if node.level else None, node.module]))
            if base == "taxotrait":  # from . import x / from taxotrait import x: x may be a module
                imported |= {f"taxotrait.{alias.name}" for alias in node.names}
            imported.add(base)
    modules = {f"taxotrait.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return imported & modules


def import_graph() -> dict[str, set[str]]:
    """{module: the taxotrait modules it imports} over every module of src/taxotrait."""
    return {f"taxotrait.{p.stem}": imported_modules(p) for p in sorted(PACKAGE.glob("*.py"))
            if p.stem != "__init__"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None when it has none (depth-first search)."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if cycle := visit(child):
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((cycle for node in sorted(graph) if (cycle := visit(node))), None)


def test_the_scan_reads_relative_and_absolute_imports():
    graph = import_graph()
    assert {"taxotrait.errors", "taxotrait.io"} <= graph["taxotrait.dataset"]  # from .errors / from .io
    assert "taxotrait.backbone" in graph["taxotrait.onnx_convert"]  # from taxotrait.backbone import ...
    assert graph["taxotrait.errors"] == set()


def test_find_cycle_names_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("name", LIGHT_MODULES)
def test_light_modules_import_without_torch_or_the_dataset(name):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    check = (f"import sys, taxotrait.{name}; "
             "heavy = sorted({'torch', 'taxotrait.dataset'} & set(sys.modules)); "
             "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
