"""Shared fixtures: the repository, and copies of the workflow in folders whose names hold spaces."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from workflow_copy import copy_workflow  # noqa: F401  (the tests' import point)

REPO = Path(__file__).resolve().parent.parent


def run_snakemake(
    workdir: Path, *args: str, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    result = subprocess.run(command, cwd=workdir, env={**os.environ, **(env or {})}, capture_output=True, text=True)
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


def paper_home(home: Path) -> Path:
    """A home folder with the paper configs' local files (dpo-mix-7k copy, judge question files), one row each."""
    import datasets

    row = {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
    }
    datasets.DatasetDict({"train": datasets.Dataset.from_list([row])}).save_to_disk(
        str(home / "Datasets" / "preference alignment" / "dpo-mix-7k")
    )
    (home / "Datasets" / "alpaca_eval").mkdir()
    (home / "Datasets" / "alpaca_eval" / "alpaca_eval.json").write_text('[{"instruction": "Say hi."}]')
    (home / "Datasets" / "mt_bench").mkdir()
    (home / "Datasets" / "mt_bench" / "question.jsonl").write_text('{"question_id": 81, "turns": ["Hi."]}\n')
    return home


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ref_teacher_project(tmp_path_factory) -> Path:
    """A workflow copy in which config/tiny.yaml's first stages ran for real, once per test session:
    the base teacher, the generated data and the REF teacher. Read it or `copy_project` it; never
    change it in place."""
    workdir = copy_workflow(tmp_path_factory.mktemp("template") / "ref project")
    run_snakemake(workdir, "results/ref_teacher", "--configfile", "config/tiny.yaml")
    return workdir


def copy_tiny_inputs(project: Path, folder: Path) -> Path:
    """The tiny config's generated data (`sft`, `preference`) and random base teacher
    (`base_teacher`) of a project, copied into `folder` for the stages run directly."""
    for name, source in (("sft", "data/sft"), ("preference", "data/preference"), ("base_teacher", "base_teacher")):
        shutil.copytree(project / "results" / source, folder / name)
    return folder


def copy_project(project: Path, destination: Path) -> Path:
    """A copy of a project folder that Snakemake finds in the same state: results, logs and its
    .snakemake records (which hold no absolute path: rerun triggers compare relative paths,
    params and code), with every modification time kept."""
    shutil.copytree(project, destination, symlinks=True)
    return destination
