"""How stages are launched: the commands the rules run and what each job asks of the scheduler.

Nothing here changes a result, so none of it is a rerun trigger. One machine: `accelerate launch`
with the config's processes. Several machines (launch.num_machines > 1): the job runs inside a
Slurm allocation of that many nodes and `srun` starts one accelerate launcher per node, which
reads its rank from SLURM_NODEID; the first node of the allocation hosts the rendezvous.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from typing import Any

import yaml

from adpa.dag.stages import STAGES
from adpa.workflow import engine
from adpa.workflow.config import accelerate_config_path

# auto is resolved by the stage itself, on the machine it runs on (adpa/modeling/precision.py).
PRECISION_TO_ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16", "auto": "no"}
MULTI_NODE_PORT = 29500
# The speed switches of launch.* (auto, true, false), passed to each training stage as --<switch>.
SWITCHES = ("padding_free", "liger_kernel", "precompute_ref_log_probs")

RESOURCE_FIELDS = ("partition", "cpus", "mem_mb", "runtime", "gpu_model", "gres", "slurm_extra")


def pythonpath_prefix(workflow_dir: str | os.PathLike) -> str:
    """The workflow's own adpa/ first on PYTHONPATH: the code Snakemake hashes is the code that runs."""
    return f'PYTHONPATH={shlex.quote(str(workflow_dir))}"${{PYTHONPATH:+:$PYTHONPATH}}"'


def adpa_command(workflow_dir: str | os.PathLike) -> str:
    return f"{pythonpath_prefix(workflow_dir)} python -m adpa"


def runs_on_gpus(config: Mapping[str, Any], workflow_dir: str | os.PathLike) -> bool:
    """The accelerate file's use_cpu; with `accelerate_config: auto`, launch.device."""
    if config["launch"]["accelerate_config"] == engine.AUTO:
        return engine.device(config["launch"]) == "gpu"
    accelerate = yaml.safe_load(accelerate_config_path(config, workflow_dir).read_text()) or {}
    return not accelerate.get("use_cpu")


def gpus_per_machine(config: Mapping[str, Any], workflow_dir: str | os.PathLike) -> int:
    """GPUs one machine of a training job needs: launch.num_processes, none on CPU."""
    return config["launch"]["num_processes"] if runs_on_gpus(config, workflow_dir) else 0


def accelerate_arguments(config: Mapping[str, Any], workflow_dir: str | os.PathLike) -> list[str]:
    """`accelerate launch` options from the config; they override the accelerate config file."""
    launch = config["launch"]
    arguments = (
        []
        if launch["accelerate_config"] == engine.AUTO
        else ["--config_file", str(accelerate_config_path(config, workflow_dir))]
    )
    arguments += [
        "--num_machines",
        str(launch["num_machines"]),
        "--num_processes",
        str(launch["num_processes"] * launch["num_machines"]),
        "--mixed_precision",
        PRECISION_TO_ACCELERATE[config["precision"]],
    ]
    if launch["zero_stage"] is not None:
        arguments += ["--zero_stage", str(launch["zero_stage"])]
    if launch["offload_optimizer"] is not None:
        arguments += ["--offload_optimizer_device", launch["offload_optimizer"]]
    if launch["offload_params"] is not None:
        arguments += ["--offload_param_device", launch["offload_params"]]
    return arguments


def stop_signal_prefix(config: Mapping[str, Any]) -> str:
    """The job's shell and its `tee` ignore the signals on which the ranks save and stop
    (adpa/training/preemption.py): dying first, they would end the job step, and the ranks with it mid-save.
    torch's launcher forwards SIGTERM to the ranks and then waits for them, 30 s by default before
    it kills them: too short for a large checkpoint, so as long as Slurm's warning ahead of the limit."""
    wait = config["launch"]["stop_signal_before_limit"] or 30
    return f"trap '' TERM USR1; TORCH_ELASTIC_SHUTDOWN_TIMEOUT={wait}"


# What `python -m adpa engine` needs of the launch settings to choose (adpa/workflow/engine.py).
ENGINE_SETTINGS = ("accelerate_config", "device", "gpu_memory_gb", "num_processes", "num_machines", "zero_stage")


def engine_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """launch.device resolved here, where Snakemake runs: the jobs' resources were asked for it."""
    settings = {key: config["launch"][key] for key in ENGINE_SETTINGS}
    return {**settings, "device": engine.device(config["launch"])}


def engine_command(config: Mapping[str, Any], workflow_dir: str | os.PathLike) -> str:
    """`python -m adpa engine`: the accelerate file a job runs with (or `direct`), chosen when it
    starts from the stage's arguments ("$@") and model (`accelerate_config: auto`)."""
    settings = shlex.quote(json.dumps(engine_settings(config), sort_keys=True))
    return f'{adpa_command(workflow_dir)} engine --launch {settings} "$@"'


def config_file_option(config: Mapping[str, Any], workflow_dir: str | os.PathLike) -> str:
    """`--config_file` of accelerate launch for several machines: with `accelerate_config: auto`, the
    engine's choice (several processes never run `direct`)."""
    if config["launch"]["accelerate_config"] != engine.AUTO:
        return ""
    return f'--config_file "$({engine_command(config, workflow_dir)})" '


def training_command(config: Mapping[str, Any], workflow_dir: str | os.PathLike) -> str:
    """Shell prefix that runs `python -m adpa <stage> ...` (the rule appends the rest) on every process.
    The stage's arguments reach the launcher through "$@" of its own shell, so that the engine can be
    chosen from them when the job starts."""
    launch = config["launch"]
    arguments = " ".join(shlex.quote(argument) for argument in accelerate_arguments(config, workflow_dir))
    prefix = f"{stop_signal_prefix(config)} {pythonpath_prefix(workflow_dir)}"
    if launch["num_machines"] == 1:
        port = launch["main_process_port"] or f'"$({adpa_command(workflow_dir)} free-port)"'
        if launch["accelerate_config"] != engine.AUTO:
            return f"{prefix} accelerate launch {arguments} --main_process_port {port} -m adpa"
        # One process without DeepSpeed needs no launcher (3 s of imports per job): the stage runs itself.
        launcher = (
            f'engine="$({engine_command(config, workflow_dir)})" || exit 1; '
            f'if [ "$engine" = {engine.DIRECT} ]; then exec python -u -m adpa "$@"; fi; '
            f'accelerate launch --config_file "$engine" {arguments} --main_process_port {port} -m adpa "$@"'
        )
        return f"{prefix} bash -c {shlex.quote(launcher)} adpa-launch"
    options = config_file_option(config, workflow_dir) + arguments
    # One launcher per node; the stage's arguments reach each through "$@" of the per-node shell.
    port = launch["main_process_port"] or MULTI_NODE_PORT
    per_node = (
        f'accelerate launch {options} --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR"'
        f' --main_process_port {port} -m adpa "$@"'
    )
    return (
        f'{prefix} MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'
        f" srun --nodes {launch['num_machines']} --ntasks-per-node 1 --kill-on-bad-exit=1"
        f" bash -c {shlex.quote(per_node)} adpa-node"
    )


def rule_group(rule: str) -> str:
    """A rule's scheduler group (config `resources.<group>`): its stage's kind."""
    return STAGES[rule].kind


def requested(config: Mapping[str, Any], rule: str) -> dict[str, Any]:
    """resources.<rule>, then resources.<group>, then resources.default: the first value set."""
    layers = [
        config["resources"].get(rule) or {},
        config["resources"][rule_group(rule)],
        config["resources"]["default"],
    ]
    return {
        field: next((layer[field] for layer in layers if layer.get(field) is not None), None)
        for field in RESOURCE_FIELDS
    }


def job_threads(config: Mapping[str, Any], rule: str) -> int:
    cpus = requested(config, rule)["cpus"]
    if cpus is not None:
        return cpus
    return config["launch"]["threads"] if rule_group(rule) != "cpu" else 1


def job_resources(config: Mapping[str, Any], workflow_dir: str | os.PathLike, rule: str) -> dict[str, Any]:
    """Snakemake resources of a rule's jobs: `gpu` (local `--resources gpu=N` and Slurm's --gpus),
    Slurm's partition, memory and runtime, and for multi-node training the nodes and srun tasks."""
    spec = requested(config, rule)
    resources: dict[str, Any] = {}
    if spec["partition"]:
        resources["slurm_partition"] = spec["partition"]
    for field in ("mem_mb", "runtime"):
        if spec[field] is not None:
            resources[field] = spec[field]
    extra = [spec["slurm_extra"]] if spec["slurm_extra"] else []
    group = rule_group(rule)
    gpus = (
        gpus_per_machine(config, workflow_dir)
        if group == "training"
        else int(group == "inference" and runs_on_gpus(config, workflow_dir))
    )
    machines = config["launch"]["num_machines"] if group == "training" else 1
    model = f"{spec['gpu_model']}:" if spec["gpu_model"] else ""
    if machines > 1:
        # The job's own shell runs srun across the nodes (the `mpi` resource tells the Slurm
        # executor not to wrap it in a one-task srun); GPUs are counted per node.
        resources.update(nodes=machines, tasks=machines, mpi="srun")
        extra.append("--ntasks-per-node=1")
    if gpus and spec["gres"]:
        resources["gres"] = f"gpu:{model}{gpus}"  # GRES counts per node
    elif gpus and machines > 1:
        extra.append(f"--gpus-per-node={model}{gpus}")  # --gpus would count all nodes together
    elif gpus:
        resources["gpu"] = gpus
        if spec["gpu_model"]:
            resources["gpu_model"] = spec["gpu_model"]
    warning = config["launch"]["stop_signal_before_limit"]
    if group == "training" and warning:
        # TERM, not USR1: the Snakemake process that leads the job step exits on USR1.
        extra.append(f"--signal=TERM@{warning}")
    if extra:
        resources["slurm_extra"] = " ".join(extra)
    return resources
