"""The paper recipes through both profiles (dry runs), and a real 2-machine launch of a stage.

profiles/local-2gpu and profiles/slurm are dry-run on both paper configs, with the 8-GPU and
2-node overlays: every job's requests are read from Snakemake's own plan. The multi-node launch
then runs for real: two accelerate launchers rendezvous on this machine, started by a stand-in
for `srun` that runs the per-node command once per node with its SLURM_NODEID (what
`srun --ntasks-per-node 1` does on a cluster).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import copy_project, copy_workflow, paper_home, run_snakemake

from adpa.dag.stages import of_kind

pytestmark = pytest.mark.workflow
TRAINING_RULES, INFERENCE_RULES = of_kind("training"), of_kind("inference")


def planned(text: str) -> dict[str, list[dict[str, str]]]:
    """Rule -> the resources and shell command of each planned job, from `snakemake -n -p`."""
    jobs: dict[str, list[dict[str, str]]] = {}
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule \w+:)", text):
        match = re.search(r"^(?:local)?rule (\w+):", block, re.MULTILINE)
        if not match:
            continue
        resources = re.search(r"^\s+resources: (.*)$", block, re.MULTILINE)
        command = re.search(r"^Shell command: (.*)$", block, re.MULTILINE)
        fields = dict(re.findall(r"(\w+)=((?:--[^,]*)|[^,]*)(?:, |$)", resources.group(1))) if resources else {}
        fields["command"] = command.group(1) if command else ""
        jobs.setdefault(match.group(1), []).append(fields)
    return jobs


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("scale")
    home = paper_home(root / "home")
    return copy_workflow(root / "scale project"), {"HOME": str(home)}


RECIPES = ("mistral-7b-deita.yaml", "llama3.1-8b-3.2-1b.yaml")


@pytest.mark.parametrize("recipe", RECIPES)
def test_local_2gpu_profile_gives_training_both_gpus_and_inference_one(workflow, recipe):
    workdir, env = workflow
    result = run_snakemake(
        workdir, "-n", "-p", "--profile", "profiles/local-2gpu", "--configfile", f"config/{recipe}", env=env
    )
    jobs = planned(result.stdout)
    assert set(TRAINING_RULES) - {"ref_teacher"} <= set(jobs) and "ref_teacher" in jobs
    for rule in TRAINING_RULES:
        for job in jobs[rule]:
            assert job["gpu"] == "2" and "--num_processes 2" in job["command"] and "srun" not in job["command"], rule
    for rule in INFERENCE_RULES:
        assert all(job["gpu"] == "1" for job in jobs[rule]), rule
    assert "gpu" not in jobs["summary"][0]


@pytest.mark.parametrize(
    "recipe,overlay,gpus",
    [
        ("mistral-7b-deita.yaml", None, 2),
        ("llama3.1-8b-3.2-1b.yaml", None, 2),
        ("mistral-7b-deita.yaml", "8gpu.yaml", 8),
    ],
)
def test_slurm_profile_asks_for_the_recipes_gpus_memory_and_runtime(workflow, recipe, overlay, gpus):
    workdir, env = workflow
    files = [f"config/{recipe}", *([f"config/launch/{overlay}"] if overlay else [])]
    result = run_snakemake(workdir, "-n", "-p", "--profile", "profiles/slurm", "--configfile", *files, env=env)
    jobs = planned(result.stdout)
    for rule in TRAINING_RULES:
        for job in jobs[rule]:
            assert (job["gpu"], job["mem_mb"], job["runtime"]) == (str(gpus), "256000", "2880"), (rule, job)
            assert f"--num_processes {gpus} " in job["command"]
    for rule in INFERENCE_RULES:
        assert all((job["gpu"], job["mem_mb"], job["runtime"]) == ("1", "64000", "720") for job in jobs[rule]), rule
    assert (jobs["summary"][0]["mem_mb"], jobs["summary"][0]["runtime"]) == ("16000", "60")


def test_slurm_profile_trains_on_two_nodes_with_the_2node_overlay(workflow):
    workdir, env = workflow
    files = ["config/llama3.1-8b-3.2-1b.yaml", "config/launch/2node-8gpu.yaml"]
    jobs = planned(
        run_snakemake(workdir, "-n", "-p", "--profile", "profiles/slurm", "--configfile", *files, env=env).stdout
    )
    for rule in TRAINING_RULES:
        for job in jobs[rule]:
            assert (job["nodes"], job["tasks"], job["mpi"]) == ("2", "2", "srun"), (rule, job)
            assert job["slurm_extra"] == "--ntasks-per-node=1 --gpus-per-node=8 --signal=TERM@300" and "gpu" not in job
            words = shlex.split(job["command"])
            assert words[words.index("srun") + 1 : words.index("srun") + 3] == ["--nodes", "2"]
            assert "--num_machines 2 --num_processes 16" in job["command"]
    assert all("nodes" not in job and job["gpu"] == "1" for job in jobs["evaluate"])


STAND_IN_SRUN = r"""#!/usr/bin/env bash
# srun --nodes N --ntasks-per-node 1 CMD...: CMD once per node with its SLURM_NODEID, in parallel.
nodes=1
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) nodes=$2; shift 2 ;;
        --ntasks-per-node) shift 2 ;;
        --*) shift ;;
        *) break ;;
    esac
done
echo "srun $nodes nodes" >> "$STAND_IN_LOG"
pids=()
for ((node = 0; node < nodes; node++)); do
    SLURM_NODEID=$node "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
STAND_IN_SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && echo 127.0.0.1
"""


def test_two_machine_launch_trains_a_stage_for_real(tmp_path, ref_teacher_project):
    workdir = copy_project(ref_teacher_project, tmp_path / "multi node")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", STAND_IN_SRUN), ("scontrol", STAND_IN_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (workdir / "two-machines.yaml").write_text("launch:\n  num_machines: 2\n  num_processes: 1\n")
    import os

    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "STAND_IN_LOG": str(tmp_path / "srun.log"),
        "HF_HUB_OFFLINE": "1",
    }
    # Launch settings are not a rerun trigger: the REF teacher is trained again on purpose.
    files = ("--configfile", "config/tiny.yaml", "two-machines.yaml")
    run_snakemake(workdir, "results/ref_teacher", "--forcerun", "ref_teacher", *files, env=env)
    assert (tmp_path / "srun.log").read_text() == "srun 2 nodes\n"
    log = (workdir / "logs" / "ref_teacher.log").read_text()
    manifest = json.loads((workdir / "results" / "ref_teacher" / "adpa_manifest.json").read_text())
    # Two machines x one process: a world of 2, so accumulation 8 / (2 x 2) = 2, as on one machine with 2.
    assert manifest["metrics"]["processes"] == 2 and manifest["metrics"]["gradient_accumulation_steps"] == 2
    assert manifest["metrics"]["zero_stage"] == 3 and manifest["metrics"]["global_step"] >= 1
    assert "--machine_rank" not in log  # the launcher's flags stay in the command, not the training log
