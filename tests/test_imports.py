"""The package's import structure: the modules the Snakefile reads when it plans the workflow (errors, config, io,
runner, steps) import without torch and without the dataset module, and no import cycle exists between the modules."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "taxotrait"
LIGHT_MODULES = ("errors", "config", "io", "runner", "steps")


def module_name(path: Path) -> str:
    """taxotrait.x for src/taxotrait/x.py, taxotrait.steps for src/taxotrait/steps/__init__.py."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The taxotrait `modules` that the module at `path` imports, at module level or inside a function (a lazy import
    is a cycle too once its function runs)."""
    package = module_name(path) if path.stem == "__init__" else module_name(path).rsplit(".", 1)[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            base = ".".join(filter(None, [anchor if node.level else None, node.module]))
            imported |= {f"{base}.{alias.name}" for alias in node.names}  # from . import x: x may be a module
            imported.add(base)
    return imported & modules


def import_graph() -> dict[str, set[str]]:
    """{module: the taxotrait modules it imports} over every module of src/taxotrait, subpackages included."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths} - {"taxotrait"}
    return {module_name(p): imported_modules(p, modules) for p in paths if module_name(p) != "taxotrait"}


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
    assert {"taxotrait.steps.common", "taxotrait.train"} <= graph["taxotrait.steps.train"]  # from .common / from ..train
    assert graph["taxotrait.steps"] == {"taxotrait.config"}  # the steps' settings: no step module, no torch


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
