"""Which `adpa/` sources a stage runs, and a hash of them for Snakemake's params trigger.

The hash is over each module's syntax tree, not its bytes: editing a comment or reformatting
does not rerun a multi-day stage, while any change to code or docstrings does.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

from adpa.stages import REGISTRY

PACKAGE_DIR = Path(__file__).resolve().parent

# The module whose code each stage runs (adpa/stages.py); its imports inside `adpa` are followed.
STAGE_MODULES: dict[str, str] = {stage.name: stage.module for stage in REGISTRY}


def _module_file(module: str, package_dir: Path) -> Path | None:
    parts = module.split(".")[1:]
    candidate = package_dir.joinpath(*parts)
    for path in (candidate.with_suffix(".py"), candidate / "__init__.py"):
        if path.is_file():
            return path
    return None


def _adpa_imports(tree: ast.AST, module: str) -> set[str]:
    found: set[str] = set()
    package = module.rsplit(".", 1)[0] if "." in module else module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "adpa")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(filter(None, [package, base]))
            if base.split(".")[0] != "adpa":
                continue
            found.add(base)
            # `from adpa import data` imports a module, not a name.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@functools.lru_cache(maxsize=None)
def _parsed_at(path: Path, version: tuple[int, int]) -> tuple[str, frozenset[str]]:
    """A module's syntax tree (dumped) and its adpa imports, parsed once per file version."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = "adpa." + ".".join(path.relative_to(path.parent.parent).with_suffix("").parts[1:])
    return ast.dump(tree, annotate_fields=False), frozenset(_adpa_imports(tree, module.removesuffix(".__init__")))


def _parsed(path: Path) -> tuple[str, frozenset[str]]:
    stat = path.stat()
    return _parsed_at(path, (stat.st_mtime_ns, stat.st_size))


def stage_sources(stage: str, package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """All `adpa` source files reachable by imports from the stage's module, sorted."""
    pending = [STAGE_MODULES[stage]]
    seen: dict[str, Path] = {}
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        path = _module_file(module, package_dir)
        if path is None:
            continue
        seen[module] = path
        pending.extend(_parsed(path)[1])
    return sorted(set(seen.values()))


def code_hash(stage: str, package_dir: Path = PACKAGE_DIR) -> str:
    digest = hashlib.sha256()
    for path in stage_sources(stage, package_dir):
        digest.update(path.relative_to(package_dir).as_posix().encode())
        digest.update(_parsed(path)[0].encode())
    return digest.hexdigest()[:16]
