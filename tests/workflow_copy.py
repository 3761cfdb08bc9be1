"""The files that make up a runnable copy of the workflow (for tests and benchmarks)."""

from __future__ import annotations

import shutil
from pathlib import Path

WORKFLOW_ROOT = Path(__file__).resolve().parent.parent  # tests/ sits in the workflow folder
WORKFLOW_PARTS = ("Snakefile", "rules", "config", "adpa", "envs", "profiles")


def copy_workflow(destination: Path) -> Path:
    """A runnable copy of the workflow; runs there use (and hash) the copy's own adpa/."""
    destination.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        source = WORKFLOW_ROOT / part
        if source.is_dir():
            shutil.copytree(source, destination / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, destination / part)
    return destination
