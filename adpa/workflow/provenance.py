"""Which `adpa/` sources a stage runs, and a hash of them for Snakemake's params trigger.

The hash is over each module's syntax tree, not its bytes: editing a comment or reformatting
does not rerun a multi-day stage, while any change to code or docstrings does.

A module that reads data files (adpa/inputs/tasks.py: the word lists) names their folder, next to it, in a
module-level string `_DATA_FOLDER = "..."`; the hash covers the bytes of every file in that folder
too, so editing a word list reruns the stages that run the module and no other. The name is read
from the syntax tree (nothing is imported), and the module reads its files through the same
constant, so the folder it reads and the folder hashed cannot drift apart.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

from adpa.dag.stages import REGISTRY

PACKAGE_DIR = Path(__file__).resolve().parents[1]

# The module whose code each stage runs (adpa/dag/stages.py); its imports inside `adpa` are followed.
STAGE_MODULES: dict[str, str] = {stage.name: stage.module for stage in REGISTRY}

# The module-level name by which a module declares the folder of data files it reads.
DATA_FOLDER_NAME = "_DATA_FOLDER"


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


def _data_folder(tree: ast.Module, path: Path) -> str | None:
    """The folder named by the module's top-level `_DATA_FOLDER = "..."`, or None if it names none."""
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if not any(isinstance(target, ast.Name) and target.id == DATA_FOLDER_NAME for target in targets):
            continue
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return node.value.value
        raise ValueError(f"{path}: {DATA_FOLDER_NAME} must be a string literal (read from the syntax tree)")
    return None


@functools.lru_cache(maxsize=None)
def _parsed_at(path: Path, version: tuple[int, int]) -> tuple[str, frozenset[str], str | None]:
    """A module's syntax tree (dumped), its adpa imports and its data folder, parsed once per file version."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # The outermost folder with an __init__.py is the package: adpa/training/sft.py -> adpa.training.sft.
    package = next(folder for folder in path.parents if not (folder.parent / "__init__.py").is_file())
    module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
    imports = frozenset(_adpa_imports(tree, module.removesuffix(".__init__")))
    return ast.dump(tree, annotate_fields=False), imports, _data_folder(tree, path)


def _parsed(path: Path) -> tuple[str, frozenset[str], str | None]:
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
        # Importing adpa.training.sft runs adpa/__init__.py and adpa/training/__init__.py first.
        parts = module.split(".")
        pending.extend(".".join(parts[:end]) for end in range(1, len(parts)))
    return sorted(set(seen.values()))


def stage_data_files(stage: str, package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Every file in the data folders that the stage's modules declare (`_DATA_FOLDER`), sorted."""
    files: set[Path] = set()
    for path in stage_sources(stage, package_dir):
        folder = _parsed(path)[2]
        if folder is None:
            continue
        directory = path.parent / folder
        if not directory.is_dir():
            raise FileNotFoundError(f"{path}: its {DATA_FOLDER_NAME} {folder!r} is not a folder next to it")
        files.update(file for file in directory.rglob("*") if file.is_file() and "__pycache__" not in file.parts)
    return sorted(files)


def code_hash(stage: str, package_dir: Path = PACKAGE_DIR) -> str:
    digest = hashlib.sha256()
    for path in stage_sources(stage, package_dir):
        digest.update(path.relative_to(package_dir).as_posix().encode())
        digest.update(_parsed(path)[0].encode())
    # Data files by their bytes (a stage without any hashes as before): the name, then the content's digest.
    for path in stage_data_files(stage, package_dir):
        digest.update(path.relative_to(package_dir).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]
