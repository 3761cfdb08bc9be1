"""Kills at other moments than mid-training (real tiny runs, SIGKILL to the whole Snakemake process
group): while teacher_topk writes its store, right after a training stage publishes its model (and
while its checkpoints go), and during an evaluation. After each, `--unlock` and the same command finish, and
every output reads back complete. tests/pause_hook stops the run at the exact file operation."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_project, planned_jobs, run_snakemake

pytestmark = pytest.mark.workflow
TINY = ("--configfile", "config/tiny.yaml")
PAUSE_HOOK = Path(__file__).resolve().parent / "pause_hook"
TRAIN_ROWS, TEST_ROWS = 32, 8  # datasets.generate in config/tiny.yaml


@pytest.fixture(scope="module")
def project(tmp_path_factory, ref_teacher_project) -> Path:
    """One copy of the workflow for every kill, with the stages before the killed ones finished."""
    return copy_project(ref_teacher_project, tmp_path_factory.mktemp("kills") / "kill project")


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, including those in sessions of their own (accelerate's ranks)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_when_paused(workdir: Path, target: str, pause: str, log: Path) -> None:
    """Run Snakemake for `target` until a process of it reaches `pause` (see tests/pause_hook), then
    SIGKILL its process group and every process below it, as a crash or a preemption would."""
    marker = log.with_suffix(".paused")
    pythonpath = os.pathsep.join(filter(None, (str(PAUSE_HOOK), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PYTHONPATH": pythonpath, "ADPA_TEST_PAUSE": pause, "ADPA_TEST_PAUSED": str(marker)}
    command = [sys.executable, "-m", "snakemake", "--cores", "2", target, *TINY]
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 900
        while not marker.exists():
            assert process.poll() is None, f"the run ended before '{pause}':\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"'{pause}' not reached within 15 minutes"
            time.sleep(0.2)
        # torch's launcher starts the ranks in sessions of their own: a crash of the machine takes
        # them too, so they are killed with the group, by their ids.
        below = descendants(process.pid)
        os.killpg(process.pid, signal.SIGKILL)
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + 30
    while any(map(running, below)):  # nothing may write into the folder after the kill
        assert time.monotonic() < deadline, f"processes {[pid for pid in below if running(pid)]} outlived the kill"
        time.sleep(0.1)


def unlock_and_rerun(workdir: Path, target: str) -> subprocess.CompletedProcess:
    """The documented recovery: `--unlock`, then the same command."""
    run_snakemake(workdir, "--unlock", *TINY)
    return run_snakemake(workdir, target, *TINY)


def no_staging_left(workdir: Path) -> None:
    leftovers = sorted(str(path.relative_to(workdir)) for path in (workdir / "results").rglob(".*.partial"))
    assert not leftovers, leftovers


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "adpa_manifest.json").read_text())


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    "pause",
    [
        "replace after */results/dpo_teacher",  # the rename that publishes the model
        "replace after */work/dpo_teacher/*/.checkpoint-4.discarded",  # its checkpoints going, after it
    ],
    ids=["published", "checkpoints-cleared"],
)
def test_kill_after_publishing_costs_a_republish_not_the_training(project, tmp_path, pause):
    output, work = project / "results" / "dpo_teacher", project / "work" / "dpo_teacher"
    shutil.rmtree(output, ignore_errors=True)  # the other moment's run left it finished
    run_snakemake(project, "--unlock", *TINY)
    ref_mtime = (project / "results" / "ref_teacher" / "adpa_manifest.json").stat().st_mtime_ns
    kill_when_paused(project, "results/dpo_teacher", pause, tmp_path / "killed.log")
    killed_manifest = read_manifest(output)
    assert killed_manifest["metrics"]["global_step"] == 4
    published = weights(output)
    (key,) = [folder for folder in work.iterdir() if not folder.name.startswith(".")]
    assert (key / "exported" / "adpa_manifest.json").is_file(), "the trained model outlives the kill"

    # Snakemake never saw the job finish: the output is marked incomplete, so it is not trusted;
    # the workflow profile (profiles/default) makes the same command rerun it.
    run_snakemake(project, "--unlock", *TINY)
    plain = run_snakemake(project, "-n", "results/dpo_teacher", "--workflow-profile", "none", *TINY, check=False)
    refusal = plain.stdout + plain.stderr
    assert plain.returncode != 0 and "IncompleteFilesException" in refusal and "results/dpo_teacher" in refusal
    result = run_snakemake(project, "results/dpo_teacher", *TINY)
    assert planned_jobs(result) == {"dpo_teacher": 1}
    log = (project / "logs" / "dpo_teacher.log").read_text()
    assert f"dpo_teacher: republished {output.relative_to(project)} from" in log
    assert "resuming from checkpoint" not in log and "'loss'" not in log, "no step trained again"
    assert read_manifest(output) == killed_manifest, "the very model the killed run trained"
    rerun = weights(output)
    assert rerun.keys() == published.keys() and all(
        (rerun[name] == tensor).all() for name, tensor in published.items()
    )
    assert not any(work.iterdir()), sorted(work.iterdir())  # recorded now: its work folder is gone
    no_staging_left(project)
    assert (project / "results" / "ref_teacher" / "adpa_manifest.json").stat().st_mtime_ns == ref_mtime
    assert planned_jobs(run_snakemake(project, "-n", "results/dpo_teacher", *TINY)) == {}


def test_kill_while_teacher_topk_writes_its_store(project, tmp_path):
    from adpa.training.topk_store import TopKStore

    output = project / "results" / "teacher_topk"
    staging = project / "results" / ".teacher_topk.partial"
    # Stopped while it closes the second store: `chosen` is complete, `rejected` has its ids on
    # disk, its values and remaining mass still in the writer's buffers, no offsets, no meta.json.
    kill_when_paused(
        project,
        "results/teacher_topk",
        "fsync before */results/.teacher_topk.partial/rejected/ids.bin",
        tmp_path / "killed.log",
    )
    dpo_mtime = (project / "results" / "dpo_teacher" / "adpa_manifest.json").stat().st_mtime_ns
    assert not output.exists()
    assert len(TopKStore(staging / "chosen")) == TRAIN_ROWS
    assert not (staging / "rejected" / "meta.json").exists() and not (staging / "rejected" / "offsets.npy").exists()
    assert (staging / "rejected" / "values.bin").stat().st_size < (staging / "rejected" / "ids.bin").stat().st_size
    with pytest.raises(FileNotFoundError, match="writer did not finish"):
        TopKStore(staging / "rejected")
    killed_chosen = {name: (staging / "chosen" / name).read_bytes() for name in ("ids.bin", "values.bin", "rest.bin")}

    result = unlock_and_rerun(project, "results/teacher_topk")
    assert planned_jobs(result) == {"teacher_topk": 1}
    no_staging_left(project)
    manifest = read_manifest(output)
    assert manifest["metrics"]["rows"] == TRAIN_ROWS
    tokens = 0
    for column in ("chosen", "rejected"):
        store = TopKStore(output / column)  # checks every file's size against meta.json
        assert len(store) == TRAIN_ROWS and store.k == manifest["params"]["k"]
        assert (store.lengths > 0).all()
        assert int(store.ids.max()) < store.vocab_size
        assert np.isfinite(store.values).all() and (store.values <= 0).all()
        assert (np.diff(store.values.astype(np.float32), axis=1) <= 0).all(), "top-k log-probs in order"
        assert (store.rest <= 0).all() and not np.isnan(store.rest).any()
        tokens += store.num_tokens
    assert manifest["metrics"]["response_tokens"] == tokens
    # Inference is deterministic: the store the killed run had finished is the one the rerun wrote.
    assert all((output / "chosen" / name).read_bytes() == data for name, data in killed_chosen.items())
    assert (project / "results" / "dpo_teacher" / "adpa_manifest.json").stat().st_mtime_ns == dpo_mtime


@pytest.mark.parametrize(
    "pause, published",
    [
        ("write_text before */eval/.base_teacher.partial/metrics.json", False),  # answers written, no metrics
        ("replace after */results/eval/base_teacher", True),  # published, Snakemake not yet told
    ],
    ids=["before-metrics", "after-publish"],
)
def test_kill_during_evaluate(project, tmp_path, pause, published):
    from adpa.core.results import read_evaluation

    output = project / "results" / "eval" / "base_teacher"
    staging = project / "results" / "eval" / ".base_teacher.partial"
    shutil.rmtree(output, ignore_errors=True)  # an earlier case's result: this one runs the job again
    kill_when_paused(project, "results/eval/base_teacher", pause, tmp_path / "killed.log")
    assert output.exists() == published
    killed = output if published else staging
    killed_answers = (killed / "answers.jsonl").read_text()
    assert (killed / "metrics.json").exists() == (killed / "adpa_manifest.json").exists() == published

    result = unlock_and_rerun(project, "results/eval/base_teacher")
    assert planned_jobs(result) == {"evaluate": 1}
    no_staging_left(project)
    metrics, answers = read_evaluation(output)
    assert metrics["model"] == "base_teacher" and metrics["rows"] == TEST_ROWS
    assert [answer["row"] for answer in answers] == list(range(TEST_ROWS))
    assert metrics["preference_accuracy"] == np.mean([a["chosen_logprob"] > a["rejected_logprob"] for a in answers])
    assert read_manifest(output)["metrics"] == metrics
    assert (output / "answers.jsonl").read_text() == killed_answers
