"""The package's layout is its architecture: each subpackage imports only itself and those before it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adpa"
# The import graph's order, from the ground floor up; cli (`python -m adpa`) sits on top of all.
LAYERS = ("core", "dag", "inputs", "modeling", "training", "infer", "report", "workflow")
TOP_MODULES = {"__init__.py", "__main__.py", "cli.py"}


def adpa_imports(path: Path) -> set[str]:
    """The adpa modules and packages a file imports, at any depth of its code (lazy imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "adpa")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "adpa":
            module = node.module or ""
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "top"


def test_every_module_sits_in_a_named_layer():
    assert {path.name for path in PACKAGE.glob("*.py")} == TOP_MODULES
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert packages == set(LAYERS), "a new subpackage needs its place in LAYERS (and in docs/layout.md)"


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for layer_index, layer in enumerate(LAYERS):
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            for module in sorted(adpa_imports(path)):
                imported = layer_of(module)
                if imported == "top" or LAYERS.index(imported) > layer_index:
                    upward.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert upward == []


def test_the_checker_sees_an_upward_import(tmp_path):
    # The test above would pass on a checker blind to `from adpa.x import y` inside a function.
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from adpa.workflow import config\n    import adpa.report.stats\n")
    assert {layer_of(module) for module in adpa_imports(source)} == {"workflow", "report"}
