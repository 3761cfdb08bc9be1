"""The teacher stages of config/tiny.yaml through a real one-node Slurm cluster (profiles/slurm).

The cluster (munged, slurmctld, slurmd; cons_tres; accounting off) is started in a scratch
folder for this module and stopped after it. Snakemake submits every job with sbatch through
snakemake-executor-plugin-slurm; the checks read Slurm's own records of those jobs.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import slurm_cluster
from conftest import copy_workflow, run_snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.slurm]
TEACHER_JOBS = ("base_teacher", "generate_data", "ref_teacher", "dpo_teacher")
# Without slurmdbd there is no sacct: squeue reports job states (MinJobAge keeps finished jobs).
NO_ACCOUNTING = ("--slurm-no-account", "--slurm-status-command", "squeue")
QUICK_POLLING = ("--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "2")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    slurm_cluster.start(folder)
    pids = [int((folder / f"{daemon}.pid").read_text()) for daemon in slurm_cluster.DAEMONS]
    yield folder
    slurm_cluster.stop(folder)
    for pid in pids:  # the daemons this test started are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not slurm_cluster.SYSTEM_CONF.is_symlink()


def slurm_jobs() -> dict[str, dict[str, str]]:
    """Slurm's record of every job, by the rule named in its comment (the executor writes rule_<name>)."""
    fields = "%i|%k|%T|%m|%l|%C|%b|%D"
    lines = subprocess.run(["squeue", "-h", "-t", "all", "-o", fields], capture_output=True, text=True, check=True).stdout
    jobs = {}
    for line in lines.splitlines():
        job_id, comment, state, memory, limit, cpus, gres, nodes = line.split("|")
        jobs[comment.removeprefix("rule_")] = {
            "id": job_id, "state": state, "memory": memory, "limit": limit, "cpus": cpus, "gres": gres, "nodes": nodes,
        }
    return jobs


def test_teachers_train_through_slurm_and_load(cluster, tmp_path):
    workdir = copy_workflow(tmp_path / "slurm project")
    result = run_snakemake(
        workdir, "results/dpo_teacher", "--profile", "profiles/slurm", "--configfile", "config/tiny.yaml",
        *NO_ACCOUNTING, *QUICK_POLLING,
        "--config", "resources={training: {mem_mb: 3000, runtime: 30}}",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert "has been submitted with SLURM jobid" in result.stdout + result.stderr

    jobs = slurm_jobs()
    assert set(TEACHER_JOBS) <= set(jobs), jobs
    for rule in TEACHER_JOBS:
        assert jobs[rule]["state"] == "COMPLETED", (rule, jobs[rule])
        # Slurm's own log of each job, kept after success by the profile.
        log = workdir / "logs" / "slurm" / f"rule_{rule}" / f"{jobs[rule]['id']}.log"
        assert "Finished jobid" in log.read_text(), log
    for rule in ("ref_teacher", "dpo_teacher"):
        # The config's requests reached sbatch: memory, runtime, both cores, no GPU on this machine.
        assert (jobs[rule]["memory"], jobs[rule]["limit"], jobs[rule]["cpus"]) == ("3000M", "30:00", "2"), jobs[rule]
        assert jobs[rule]["gres"] == "N/A" and jobs[rule]["nodes"] == "1"
        manifest = json.loads((workdir / "results" / rule / "adpa_manifest.json").read_text())
        # The model was trained inside that Slurm job, by 2 ZeRO-3 processes.
        assert manifest["slurm"]["job_id"] == jobs[rule]["id"]
        assert manifest["metrics"]["processes"] == 2 and manifest["metrics"]["zero_stage"] == 3
    assert jobs["base_teacher"]["memory"] != "3000M"  # training requests stay on training jobs

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = workdir / "results" / "dpo_teacher"
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert output.shape[1] == prompt["input_ids"].shape[1] + 3 or tokenizer.eos_token_id in output[0].tolist()

    again = run_snakemake(workdir, "results/dpo_teacher", "-n", "--profile", "profiles/slurm", "--configfile", "config/tiny.yaml", *NO_ACCOUNTING)
    assert "Nothing to be done" in again.stdout + again.stderr
