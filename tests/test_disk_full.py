"""A full disk loses no work: a checkpoint save that hits ENOSPC (work_dir on a small tmpfs, as root)
ends with one line naming the folder, what it needed and what is free; nothing half-written stays;
once space is freed the same command resumes from the last complete checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

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


def test_enospc_is_one_line_and_the_rerun_resumes_from_the_last_complete_checkpoint(tmp_path, small_disk):
    inputs = tmp_path / "inputs"
    for args in (
        ("generate_data", "--sft-output", str(inputs / "sft"), "--preference-output", str(inputs / "preference")),
        ("base_teacher", "--output", str(inputs / "base_teacher")),
    ):
        result = adpa(args[0], "--configfile", "config/tiny.yaml", *args[1:])
        assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads(json.dumps(TINY))
    config["datasets"]["sft"] = {"path": str(inputs / "sft"), "test_split": None}
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

    subprocess.run(["mount", "-o", "remount,size=200M", str(small_disk)], check=True)
    resumed = adpa(*stage)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint {key / 'checkpoint-2'}" in resumed.stderr
    manifest = json.loads((output / "adpa_manifest.json").read_text())
    assert manifest["metrics"]["global_step"] == 4 and [step for step, _ in manifest["loss_history"]][-1] == 4
