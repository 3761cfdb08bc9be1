"""Shared fixtures: the repository, and copies of the workflow in folders whose names hold spaces."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKFLOW_PARTS = ("Snakefile", "rules", "config", "adpa", "envs")


def copy_workflow(destination: Path) -> Path:
    """A runnable copy of the workflow; runs there use (and hash) the copy's own adpa/."""
    destination.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, destination / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, destination / part)
    return destination


def run_snakemake(workdir: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    result = subprocess.run(
        command, cwd=workdir, env={**os.environ, **(env or {})}, capture_output=True, text=True
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def planned_jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from a dry run's 'Job stats' table (empty when nothing is to be done)."""
    text = result.stdout + result.stderr
    if "Job stats:" not in text:
        return {}
    table = text.split("Job stats:", 1)[1].splitlines()[3:]
    jobs: dict[str, int] = {}
    for line in table:
        fields = line.split()
        if len(fields) != 2 or fields[0] == "total":
            break
        jobs[fields[0]] = int(fields[1])
    return jobs


@pytest.fixture
def repo() -> Path:
    return REPO
