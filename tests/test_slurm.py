"""The teacher stages of config/tiny.yaml through a real one-node Slurm cluster (profiles/slurm).

The cluster (munged, slurmctld, slurmd; cons_tres; accounting off; 2 stand-in GPUs) is started
in a scratch folder for this module and stopped after it. Snakemake submits every job with sbatch
through snakemake-executor-plugin-slurm; the checks read Slurm's own records of those jobs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
from conftest import REPO, copy_project, run_snakemake

from adpa.workflow import config as adpa_config
from adpa.workflow import launch

pytestmark = [pytest.mark.workflow, pytest.mark.slurm]
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


def slurm_records(workdir: Path) -> list[dict[str, str]]:
    """Slurm's record of every job submitted from this project folder (the executor passes -D),
    with the rule named in its comment (the executor writes rule_<name>)."""
    fields = "%i|%k|%T|%m|%l|%C|%b|%D|%Z"
    lines = subprocess.run(
        ["squeue", "-h", "-t", "all", "-o", fields], capture_output=True, text=True, check=True
    ).stdout
    records = []
    for line in lines.splitlines():
        job_id, comment, state, memory, limit, cpus, gres, nodes, folder = line.split("|")
        if Path(folder).resolve() == workdir.resolve():
            records.append(
                {
                    "id": job_id,
                    "rule": comment.removeprefix("rule_"),
                    "state": state,
                    "memory": memory,
                    "limit": limit,
                    "cpus": cpus,
                    "gres": gres,
                    "nodes": nodes,
                }
            )
    return records


def slurm_jobs(workdir: Path) -> dict[str, dict[str, str]]:
    """The records by rule (one job per rule in the runs that read it)."""
    return {record["rule"]: record for record in slurm_records(workdir)}


def test_dpo_teacher_trains_through_slurm_and_loads(cluster, tmp_path, ref_teacher_project):
    # The REF teacher and its inputs were made here (tests/conftest.py); the REF teacher goes through
    # Slurm in the GPU test below.
    workdir = copy_project(ref_teacher_project, tmp_path / "slurm project")
    result = run_snakemake(
        workdir,
        "results/dpo_teacher",
        "--profile",
        "profiles/slurm",
        "--configfile",
        "config/tiny.yaml",
        *NO_ACCOUNTING,
        *QUICK_POLLING,
        "--config",
        "resources={training: {mem_mb: 3000, runtime: 30}}",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert "has been submitted with SLURM jobid" in result.stdout + result.stderr

    jobs = slurm_jobs(workdir)
    assert set(jobs) == {"dpo_teacher"} and jobs["dpo_teacher"]["state"] == "COMPLETED", jobs
    job = jobs["dpo_teacher"]
    # Slurm's own log of the job, kept after success by the profile.
    log = workdir / "logs" / "slurm" / "rule_dpo_teacher" / f"{job['id']}.log"
    assert "Finished jobid" in log.read_text(), log
    # The config's requests reached sbatch: memory, runtime, both cores, no GPU on this machine.
    assert (job["memory"], job["limit"], job["cpus"]) == ("3000M", "30:00", "2"), job
    assert job["gres"] == "N/A" and job["nodes"] == "1"
    manifest = json.loads((workdir / "results" / "dpo_teacher" / "adpa_manifest.json").read_text())
    # The model was trained inside that Slurm job, by 2 ZeRO-3 processes.
    assert manifest["slurm"]["job_id"] == job["id"]
    assert manifest["metrics"]["processes"] == 2 and manifest["metrics"]["zero_stage"] == 3

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = workdir / "results" / "dpo_teacher"
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert output.shape[1] == prompt["input_ids"].shape[1] + 3 or tokenizer.eos_token_id in output[0].tolist()

    again = run_snakemake(
        workdir,
        "results/dpo_teacher",
        "-n",
        "--profile",
        "profiles/slurm",
        "--configfile",
        "config/tiny.yaml",
        *NO_ACCOUNTING,
    )
    assert "Nothing to be done" in again.stdout + again.stderr


GPU_RECIPE = "config/accelerate/deepspeed_zero3.yaml"  # the recipes' accelerate config: GPUs
NO_GPUS_HERE = {"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def test_training_job_gets_two_gpus_in_one_slurm_job(cluster, tmp_path, ref_teacher_project):
    """A 2-GPU training request becomes one Slurm job holding 2 GPUs, in which one accelerate
    launch starts 2 processes (not jobs or steps of one GPU each: the Slurm executor's issues
    #316 and #459). The GPU count of a recipe is checked on this machine only when jobs run here."""
    # The REF teacher trained again (launch settings are not a rerun trigger) on tiny.yaml's data
    # and base teacher, made here.
    workdir = copy_project(ref_teacher_project, tmp_path / "slurm gpu project")
    again = ("results/ref_teacher", "--forcerun", "ref_teacher")
    # tiny.yaml on GPUs, 4 per training job (effective batch 8 = 2 per device x 4 processes).
    four_gpus = "launch={accelerate_config: %s, num_processes: 4}" % GPU_RECIPE
    here = run_snakemake(
        workdir,
        *again,
        "--configfile",
        "config/tiny.yaml",
        "--config",
        four_gpus,
        env=NO_GPUS_HERE,
        check=False,
    )
    assert here.returncode != 0 and "4 GPUs requested" in here.stdout + here.stderr, here.stderr[-3000:]
    # Through Slurm this machine's GPUs do not matter: it is Slurm that refuses the training job, as
    # no node of the test cluster has 4 GPUs.
    refused = run_snakemake(
        workdir,
        *again,
        "--profile",
        "profiles/slurm",
        "--configfile",
        "config/tiny.yaml",
        *NO_ACCOUNTING,
        *QUICK_POLLING,
        "--config",
        four_gpus,
        env=NO_GPUS_HERE,
        check=False,
    )
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "GPUs requested" not in output, output[-3000:]
    assert "SLURM sbatch failed" in output and "--gpus=4" in output and "rule_ref_teacher" in output, output[-3000:]
    refusal = {record["rule"]: record["state"] for record in slurm_records(workdir)}
    assert refusal == {"ref_teacher": "FAILED"}, refusal
    refused_ids = {record["id"] for record in slurm_records(workdir)}

    # The node's GPUs are stand-ins, so the model trains with tiny.yaml's 2 CPU processes (gloo;
    # the GPU config there would start 2 unconnected processes). For a CPU accelerate config
    # job_resources asks for no GPU, so the test sets the rule's `gpu` resource to what it gives
    # the 2-GPU recipe: the same request reaches the executor and Slurm.
    gpu_recipe = adpa_config.load_config(REPO / "config" / "tiny.yaml", {"launch": {"accelerate_config": GPU_RECIPE}})
    gpus = launch.job_resources(gpu_recipe, REPO, "ref_teacher")["gpu"]
    assert gpus == slurm_cluster.GPUS == 2
    run_snakemake(
        workdir,
        *again,
        "--profile",
        "profiles/slurm",
        "--configfile",
        "config/tiny.yaml",
        *NO_ACCOUNTING,
        *QUICK_POLLING,
        "--set-resources",
        f"ref_teacher:gpu={gpus}",
        "--config",
        "resources={training: {mem_mb: 3000, runtime: 30}}",
        env={"HF_HUB_OFFLINE": "1"},
    )

    training = [record for record in slurm_records(workdir) if record["id"] not in refused_ids]
    assert len(training) == 1 and training[0]["rule"] == "ref_teacher" and training[0]["state"] == "COMPLETED", (
        training
    )
    job_id = training[0]["id"]
    record = subprocess.run(
        ["scontrol", "-d", "show", "job", job_id], capture_output=True, text=True, check=True
    ).stdout
    # Slurm's record: the job asked for 2 GPUs, was given them on its one node, and ran one task.
    assert re.search(r"TresPerJob=gres[:/]gpu:2\b", record) and "JOB_GRES=gpu:2" in record, record
    assert "NumNodes=1 " in record and "NumTasks=1 " in record, record
    # The config's training requests reached sbatch too.
    assert (training[0]["memory"], training[0]["limit"], training[0]["cpus"]) == ("3000M", "30:00", "2"), training

    # One accelerate launch in the job, of 2 processes that form one world: the main process logs
    # the launch once, to the job's output (a second copy of the stage would log there too).
    slurm_log = (workdir / "logs" / "slurm" / "rule_ref_teacher" / f"{job_id}.log").read_text()
    launches = [line for line in slurm_log.splitlines() if "ref_teacher: launch {" in line]
    assert len(launches) == 1 and '"processes": 2, "distributed_type": "DEEPSPEED"' in launches[0], slurm_log[-3000:]
    manifest = json.loads((workdir / "results" / "ref_teacher" / "adpa_manifest.json").read_text())
    assert manifest["slurm"]["job_id"] == job_id
    assert manifest["metrics"]["processes"] == 2 and manifest["metrics"]["device"] == "cpu"


def complete_checkpoints(workdir: Path, stage: str) -> list[Path]:
    return sorted(path.parent for path in (workdir / "work" / stage).glob("*/checkpoint-*/trainer_state.json"))


def test_preempted_training_job_saves_its_step_and_the_rerun_resumes_there(cluster, tmp_path, ref_teacher_project):
    """`scancel --signal=TERM`, as Slurm preempts or warns before the time limit: the ranks save the
    current step and the job fails; the rerun resumes from that step and ends with the weights of
    an uninterrupted run. Regular checkpoints are off (save_steps 1000), so any checkpoint is the
    signal's."""
    import torch
    from safetensors.torch import load_file

    workdir = copy_project(ref_teacher_project, tmp_path / "preempted project")  # its inputs, made here
    # 16 steps (32 pairs x 4 epochs / effective batch 8): room to signal in the middle.
    settings = ("--configfile", "config/tiny.yaml", "--config", "launch={save_steps: 1000}", "dpo_teacher={epochs: 4}")
    through_slurm = ("--profile", "profiles/slurm", *NO_ACCOUNTING, *QUICK_POLLING)
    resources = "resources={training: {mem_mb: 3000, runtime: 30}}"

    stage_log = workdir / "logs" / "dpo_teacher.log"
    with open(tmp_path / "preempted.log", "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "snakemake", "results/dpo_teacher", *settings, resources, *through_slurm],
            cwd=workdir,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 600
        # Signal once the first step is done (its progress bar, on unbuffered stderr, shows 1/16).
        while not (stage_log.is_file() and " 1/16 [" in stage_log.read_text(errors="replace")):
            assert process.poll() is None, (tmp_path / "preempted.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "dpo_teacher logged no step within 10 minutes"
            time.sleep(0.5)
        job_id = slurm_jobs(workdir)["dpo_teacher"]["id"]
        subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
        assert process.wait(timeout=600) != 0
    assert slurm_jobs(workdir)["dpo_teacher"]["state"] == "FAILED"
    stopped = re.search(r"dpo_teacher: stopped by SIGTERM at step (\d+), saved in (\S+);", stage_log.read_text())
    assert stopped, stage_log.read_text()[-3000:]
    step = int(stopped.group(1))
    assert 1 <= step < 16
    (checkpoint,) = complete_checkpoints(workdir, "dpo_teacher")
    assert checkpoint.name == f"checkpoint-{step}" and str(checkpoint).endswith(stopped.group(2))
    assert not (workdir / "results" / "dpo_teacher").exists()

    run_snakemake(workdir, "results/dpo_teacher", *settings, resources, *through_slurm, env={"HF_HUB_OFFLINE": "1"})
    log = stage_log.read_text()
    assert f"resuming from checkpoint {checkpoint.relative_to(workdir)}" in log, log[-3000:]
    manifest = json.loads((workdir / "results" / "dpo_teacher" / "adpa_manifest.json").read_text())
    assert manifest["metrics"]["global_step"] == 16
    assert [step for step, _ in manifest["loss_history"]] == list(range(1, 17))  # the stopped step logged too
    resumed = load_file(str(workdir / "results" / "dpo_teacher" / "model.safetensors"))

    run_snakemake(workdir, "results/dpo_teacher", "--forcerun", "dpo_teacher", *settings, env={"HF_HUB_OFFLINE": "1"})
    uninterrupted = load_file(str(workdir / "results" / "dpo_teacher" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-5), name
