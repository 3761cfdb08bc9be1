"""A killed training stage resumes from its last complete checkpoint (real tiny run, 2-process ZeRO-3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_project, planned_jobs, run_snakemake

from adpa.core.artifacts import checkpoint_bytes
from adpa.workflow.preflight import other_files_bytes, parameter_count

pytestmark = pytest.mark.workflow
TINY = ("--configfile", "config/tiny.yaml")


def complete_checkpoint(workdir: Path, stage: str) -> Path | None:
    """A checkpoint whose trainer state is written (the Trainer writes it after the weights)."""
    found = sorted((workdir / "work" / stage).glob("*/checkpoint-*/trainer_state.json"))
    return found[0].parent if found else None


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_killed_dpo_teacher_resumes_and_matches_an_uninterrupted_run(tmp_path, ref_teacher_project):
    import torch

    workdir = copy_project(ref_teacher_project, tmp_path / "resume project")
    ref_manifest = workdir / "results" / "ref_teacher" / "adpa_manifest.json"
    ref_mtime = ref_manifest.stat().st_mtime_ns

    # SIGKILL the whole Snakemake process group once dpo_teacher has a complete checkpoint.
    command = [sys.executable, "-m", "snakemake", "--cores", "2", "results/dpo_teacher", *TINY]
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while complete_checkpoint(workdir, "dpo_teacher") is None:
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.5)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    checkpoint = complete_checkpoint(workdir, "dpo_teacher")
    assert not (workdir / "results" / "dpo_teacher").exists(), "a killed stage leaves no output"
    # The preflight's estimate of a checkpoint against a real 2-process ZeRO-3 one.
    written = sum(path.stat().st_size for path in checkpoint.rglob("*") if path.is_file())
    base = str(workdir / "results" / "base_teacher")
    estimate = checkpoint_bytes(parameter_count(base), 4, other_files_bytes(base))
    print(f"ZeRO-3 checkpoint {written / 1e6:.1f} MB, estimated {estimate / 1e6:.1f} MB")
    assert 0.9 * estimate <= written <= estimate

    # Snakemake's lock outlives a SIGKILL; --unlock is the documented first step.
    run_snakemake(workdir, "--unlock", *TINY)
    result = run_snakemake(workdir, "results/dpo_teacher", *TINY)
    assert planned_jobs(result) == {"dpo_teacher": 1}
    log = (workdir / "logs" / "dpo_teacher.log").read_text()
    assert f"resuming from checkpoint {checkpoint.relative_to(workdir)}" in log
    manifest = json.loads((workdir / "results" / "dpo_teacher" / "adpa_manifest.json").read_text())
    assert manifest["metrics"]["global_step"] == 4  # 32 pairs / effective batch 8
    assert [step for step, _ in manifest["loss_history"]] == [1, 2, 3, 4]
    assert ref_manifest.stat().st_mtime_ns == ref_mtime, "finished stages are never touched"
    resumed = weights(workdir / "results" / "dpo_teacher")

    # The same stage, uninterrupted: same steps and data order give the same weights.
    run_snakemake(workdir, "results/dpo_teacher", "--forcerun", "dpo_teacher", *TINY)
    uninterrupted = weights(workdir / "results" / "dpo_teacher")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-5), name
    assert ref_manifest.stat().st_mtime_ns == ref_mtime
