"""A full disk loses no work: a checkpoint save that hits ENOSPC (work_dir on a small tmpfs, as root)
ends with one line naming the folder, what it needed and what is free; nothing half-written stays;
once space is freed the same command resumes from the last complete checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, copy_tiny_inputs

TINY = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())


def adpa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adpa", *args], cwd=REPO, capture_output=True, text=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 60 MB tmpfs: room for one checkpoint of the tiny teacher (about 39 MB), not for two."""
    mount = tmp_path / "small disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60M", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def tiny_inputs(project, folder):
    """The tiny data and base teacher (made by their stages in `project`), and a config reading them."""
    copy_tiny_inputs(project, folder)
    config = json.loads(json.dumps(TINY))
    config["datasets"]["sft"] = {"path": str(folder / "sft"), "test_split": None}
    config["datasets"]["preference"] = {"path": str(folder / "preference")}
    return config


def folder_bytes(folder) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_enospc_is_one_line_and_the_rerun_resumes_from_the_last_complete_checkpoint(
    tmp_path, small_disk, ref_teacher_project
):
    from adpa.core.artifacts import checkpoint_bytes
    from adpa.workflow.preflight import other_files_bytes, parameter_count

    inputs = tmp_path / "inputs"
    config = tiny_inputs(ref_teacher_project, inputs)
    # 32 rows, 2 per device x 4 accumulation: 4 steps, a checkpoint at 2 and 4.
    config["ref_teacher"].update(packing=False, completion_only_loss=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    output, work = tmp_path / "results" / "ref_teacher", small_disk / "work"
    stage = ["ref_teacher", "--configfile", str(path), "--model", str(inputs / "base_teacher")]
    stage += ["--output", str(output), "--work-dir", str(work), "--save-steps", "2", "--threads", "1"]

    full = adpa(*stage)
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert full.returncode == 2 and len(errors) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert errors[0].startswith(f"error: ref_teacher: no space left on the device of {work}/ref_teacher/")
    assert " MB to write, " in errors[0] and errors[0].endswith(
        "free there; free space and run again (it resumes from the last complete checkpoint)"
    )
    assert not output.exists(), "nothing is published"
    (key,) = list((work / "ref_teacher").iterdir())
    checkpoints = sorted(folder.name for folder in key.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2"], "the cut-off checkpoint is removed, the complete one kept"
    assert (key / "checkpoint-2" / "trainer_state.json").is_file()
    # The preflight's estimate of a checkpoint against the one written. One process without
    # DeepSpeed keeps no separate fp32 master copy: 12 of the 16 bytes per parameter estimated for
    # ZeRO (checked at 0.9 or more in tests/test_resume.py).
    base = str(inputs / "base_teacher")
    estimate = checkpoint_bytes(parameter_count(base), 4, other_files_bytes(base))
    assert 0.7 * estimate <= folder_bytes(key / "checkpoint-2") <= estimate

    subprocess.run(["mount", "-o", "remount,size=200M", str(small_disk)], check=True)
    resumed = adpa(*stage)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint {key / 'checkpoint-2'}" in resumed.stderr
    manifest = json.loads((output / "adpa_manifest.json").read_text())
    assert manifest["metrics"]["global_step"] == 4 and [step for step, _ in manifest["loss_history"]][-1] == 4


def test_a_stage_that_does_not_train_runs_out_of_space_in_one_line(tmp_path, small_disk, ref_teacher_project):
    config = tiny_inputs(ref_teacher_project, tmp_path / "inputs")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    (small_disk / "filler").write_bytes(bytes(shutil.disk_usage(small_disk).free))  # a full disk
    output = small_disk / "results" / "teacher_topk"
    stage = ["teacher_topk", "--configfile", str(path), "--model", str(tmp_path / "inputs" / "base_teacher")]
    full = adpa(*stage, "--output", str(output), "--threads", "1")
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert full.returncode == 2 and len(errors) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert errors[0].startswith(f"error: teacher_topk: no space left on the device of {output}: ")
    assert errors[0].endswith(" free there; free space and run again"), errors[0]
    assert sorted(path.name for path in (small_disk / "results").iterdir()) == [], "no output, no staging folder"

    (small_disk / "filler").unlink()
    assert adpa(*stage, "--output", str(output), "--threads", "1").returncode == 0
    assert (output / "adpa_manifest.json").is_file()
