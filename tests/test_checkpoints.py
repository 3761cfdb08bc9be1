"""Which checkpoint a rerun resumes from."""

from __future__ import annotations

import os

import pytest

from adpa.core import artifacts
from adpa.training.train import last_checkpoint


def make(work, step, state='{"global_step": 1}'):
    folder = work / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text("weights")
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    return folder


def test_newest_complete_checkpoint_wins_by_step_not_by_name(tmp_path):
    make(tmp_path, 2)
    newest = make(tmp_path, 10)
    assert last_checkpoint(tmp_path) == str(newest)


def test_half_written_checkpoints_are_skipped_and_removed(tmp_path):
    complete = make(tmp_path, 2)
    no_state = make(tmp_path, 4, state=None)
    cut_json = make(tmp_path, 6, state='{"global_st')
    (tmp_path / "checkpoint-latest").mkdir()  # not a step: left alone
    assert last_checkpoint(tmp_path) == str(complete)
    assert not no_state.exists() and not cut_json.exists() and (tmp_path / "checkpoint-latest").exists()


def test_no_work_folder_or_no_complete_checkpoint_means_a_fresh_start(tmp_path):
    assert last_checkpoint(tmp_path / "missing") is None
    make(tmp_path, 2, state=None)
    assert last_checkpoint(tmp_path) is None


def test_a_work_folder_removal_cut_off_midway_leaves_nothing_to_resume(tmp_path, monkeypatch):
    """Published, then killed while its checkpoints were being deleted: a checkpoint whose
    trainer_state.json outlived its weights must not be resumed from."""

    class Killed(BaseException):
        pass

    work = tmp_path / "dpo_teacher" / "key"
    make(work, 2)
    make(work, 4)
    unlink = os.unlink

    def killed_at_a_trainer_state(path, *args, **kwargs):
        if os.path.basename(path) == "trainer_state.json":
            raise Killed
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", killed_at_a_trainer_state)
    with pytest.raises(Killed):
        artifacts.discard(work)
    monkeypatch.undo()
    assert last_checkpoint(work) is None
    artifacts.discard(work)  # the stage's next publish removes the remains
    assert list(work.parent.iterdir()) == []


def test_the_same_stage_on_other_inputs_gets_its_own_work_folder(tmp_path):
    """The points of a top-k sweep run dckd with the same settings and code on different stores: a
    work folder shared between them republished one point's model as the other's."""
    from adpa.core.artifacts import clean_work, write_manifest
    from adpa.training.train import LaunchOptions, StageRun

    def run(store: str) -> StageRun:
        parents = {"topk": {"path": store, "stage": "teacher_topk", "config_hash": store[-1] * 16, "code_hash": "c"}}
        launch = LaunchOptions(False, 2, 2, 1)
        return StageRun("dckd", {}, "{}", "code", tmp_path / "out", tmp_path / "work", launch, parents=parents)

    k5, k20 = run("results/sweeps/topk/k~5/teacher_topk"), run("results/sweeps/topk/k~20/teacher_topk")
    assert k5.work_dir != k20.work_dir and k5.work_dir.parent == k20.work_dir.parent
    assert k5.work_dir == run("results/sweeps/topk/k~5/teacher_topk").work_dir  # a rerun finds its own

    # The workflow's clean-up finds the folder of a published model from its manifest.
    for folder in (k5.work_dir, k20.work_dir):
        folder.mkdir(parents=True)
    published = tmp_path / "results" / "dckd"
    published.mkdir(parents=True)
    write_manifest(published, "dckd", {}, "{}", "code", {}, {"parents": dict(k5.parents)})
    assert clean_work(tmp_path / "results", tmp_path / "work") == [k5.work_dir]
    assert k20.work_dir.is_dir()
