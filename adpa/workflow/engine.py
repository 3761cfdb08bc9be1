"""The engine that trains a stage on its machine, and the speed switches that go with it.

`launch.accelerate_config: auto` (the default) lets each training job choose when it starts, from
the model it reads and the memory of the GPU it got:
- one process: plain accelerate, no DeepSpeed, when the weights, gradients and AdamW state
  (16 bytes per trained parameter with fp32 master weights) fit 75% of one GPU, the rest left to
  activations; else ZeRO-3 with the optimizer state offloaded to the host;
- several processes: ZeRO-2 where its per-GPU share fits, else ZeRO-3, else ZeRO-3 with offload.
On CPUs: plain for one process, ZeRO-3 over gloo for several. An explicit accelerate file, or an
explicit `launch.zero_stage`, always wins. No torch import here: the launcher asks before the
processes start (`python -m adpa engine`), and `check` prints the same choice.

Nothing here changes a result (the tests hold each switch equal to its off state), so none of it
is a rerun trigger; each manifest records what ran.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adpa.core.paths import expand_path, is_local

AUTO = "auto"
# What `python -m adpa engine` prints for one process without DeepSpeed: the stage runs without
# accelerate's launcher (whose imports cost ~3 s per job), as a plain `python -m adpa` process.
DIRECT = "direct"
# The accelerate file of each (device, engine).
ACCELERATE_FILES = {
    ("cpu", "plain"): "config/accelerate/cpu.yaml",
    ("cpu", "zero3"): "config/accelerate/deepspeed_zero3_cpu.yaml",
    ("gpu", "plain"): "config/accelerate/gpu.yaml",
    ("gpu", "zero2"): "config/accelerate/deepspeed_zero2.yaml",
    ("gpu", "zero3"): "config/accelerate/deepspeed_zero3.yaml",
    ("gpu", "zero3_offload"): "config/accelerate/deepspeed_zero3_offload.yaml",
}
# Bytes per trained parameter: fp32 master weights 4, fp32 gradients 4, AdamW's two moments 8.
# Under DeepSpeed bf16 the 16 are bf16 weights 2 + bf16 gradients 2 + fp32 master 4 + moments 8.
TRAINED_BYTES = 16
FROZEN_BYTES = 2  # a bf16 frozen copy: the DPO reference, a LoRA base
# The share of a GPU the model states may take; the rest is activations and the allocator's slack.
STATE_SHARE = 0.75
# Stages whose trainer holds a frozen reference beside the policy.
WITH_REFERENCE = frozenset({"dpo_teacher", "student_dpo"})


@dataclass(frozen=True)
class Choice:
    """The engine of one training job: plain, zero2, zero3 or zero3_offload, and why."""

    engine: str
    accelerate_file: str
    reason: str
    state_gb: float | None = None  # the estimated model state per GPU under that engine

    @property
    def deepspeed(self) -> bool:
        return self.engine != "plain"


def has_gpu() -> bool:
    """A CUDA GPU is listed on this machine (nvidia-smi, no CUDA context)."""
    return bool(gpu_memory_gb())


@functools.lru_cache(maxsize=1)
def gpu_memory_gb() -> float | None:
    """Memory of this machine's first visible GPU in GB, from nvidia-smi; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    command = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        if not visible.strip() or visible.strip() == "-1":
            return None
        command.append(f"--id={visible.split(',')[0].strip()}")
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=20, check=True).stdout
        return float(output.split()[0]) * 2**20 / 1e9  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def device(launch: Mapping[str, Any]) -> str:
    """cpu or gpu: launch.device, auto meaning a GPU when this machine lists one."""
    wanted = launch.get("device", AUTO)
    if wanted != AUTO:
        return wanted
    return "gpu" if has_gpu() else "cpu"


def safetensors_parameters(folder: Path) -> int | None:
    """Parameters of a local model folder, from its safetensors headers (no weights read); None if unknown."""
    total = 0
    files = sorted(folder.glob("*.safetensors"))
    for file in files:
        try:
            with file.open("rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(size))
        except (OSError, ValueError, struct.error):
            return None
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dimension in entry["shape"]:
                    count *= dimension
                total += count
    return total or None


def model_parameters(reference: str) -> int | None:
    """A local folder's parameter count; None for a hub id (decided as unknown: ZeRO-3)."""
    if not is_local(reference):
        return None
    return safetensors_parameters(Path(expand_path(reference)))


def _size(parameters: int) -> str:
    return f"{parameters / 1e9:.2f}B" if parameters >= 1e9 else f"{parameters / 1e6:.1f}M"


def state_bytes(
    engine: str, parameters: int, processes: int, reference: bool, lora: bool, other_frozen: int = 0
) -> float:
    """Model state per GPU (weights, gradients, optimizer) under `engine`; activations not counted.
    `other_frozen`: parameters of another frozen model the job holds (dpkd's reference, gkd's teacher)."""
    trained = 0 if lora else parameters
    frozen = (parameters if lora else 0) + (parameters if reference else 0) + other_frozen
    if engine == "plain":
        return TRAINED_BYTES * trained + FROZEN_BYTES * frozen
    if engine == "zero2":  # weights whole, gradients and optimizer state sharded
        return 2 * trained + (TRAINED_BYTES - 2) * trained / processes + FROZEN_BYTES * frozen
    if engine == "zero3":
        return (TRAINED_BYTES * trained + FROZEN_BYTES * frozen) / processes
    if engine == "zero3_offload":  # the fp32 master and moments live on the host
        return (4 * trained + FROZEN_BYTES * frozen) / processes
    raise ValueError(f"unknown engine {engine!r}")


def choose(
    on: str,
    processes: int,
    parameters: int | None,
    memory_gb: float | None,
    *,
    reference: bool = False,
    lora: bool = False,
    other_frozen: int = 0,
) -> Choice:
    """The engine for a job of `processes` processes on `on` (cpu or gpu)."""
    if on == "cpu":
        engine = "plain" if processes == 1 else "zero3"
        reason = "one CPU process: no DeepSpeed" if processes == 1 else f"{processes} CPU processes: ZeRO-3 over gloo"
        if parameters is None:
            return Choice(engine, ACCELERATE_FILES["cpu", engine], reason)
        needed = state_bytes(engine, parameters, processes, reference, lora, other_frozen)
        reason += f"; {_size(parameters)} parameters: {needed / 1e9:.2f} GB of model state per process"
        return Choice(engine, ACCELERATE_FILES["cpu", engine], reason, round(needed / 1e9, 2))
    if parameters is None or memory_gb is None:
        unknown = "model size" if parameters is None else "GPU memory"
        return Choice("zero3", ACCELERATE_FILES["gpu", "zero3"], f"{unknown} unknown: ZeRO-3")
    budget = STATE_SHARE * memory_gb * 1e9
    candidates = ("plain", "zero3_offload") if processes == 1 else ("zero2", "zero3", "zero3_offload")
    for engine in candidates:
        needed = state_bytes(engine, parameters, processes, reference, lora, other_frozen)
        if needed <= budget or engine == "zero3_offload":
            fits = "fit" if needed <= budget else "do not fit even offloaded"
            reason = (
                f"{_size(parameters)} parameters x {processes} GPU(s) of {memory_gb:.0f} GB: "
                f"{needed / 1e9:.2f} GB of model state per GPU {fits} {STATE_SHARE:.0%} of it"
            )
            return Choice(engine, ACCELERATE_FILES["gpu", engine], reason, round(needed / 1e9, 2))
    raise AssertionError("unreachable: zero3_offload always returns")


def choose_for_job(
    launch: Mapping[str, Any],
    stage: str,
    params: Mapping[str, Any],
    model: str,
    memory_gb: float | None = None,
    frozen_models: tuple[str, ...] = (),
) -> Choice:
    """The choice for one job (`python -m adpa engine`): an explicit file or zero_stage wins.
    `frozen_models`: other models the job holds frozen beside the trained one (an unknown size counts 0)."""
    on = device(launch)
    processes = launch["num_processes"] * launch["num_machines"]
    explicit = launch["accelerate_config"]
    if explicit != AUTO:
        return Choice("explicit", explicit, "launch.accelerate_config names the file")
    if launch.get("zero_stage") is not None:
        return Choice(
            f"zero{launch['zero_stage']}", ACCELERATE_FILES[on, "zero3"], "launch.zero_stage names the stage"
        )
    memory = memory_gb if memory_gb is not None else (launch.get("gpu_memory_gb") or gpu_memory_gb())
    lora = bool(params.get("training", {}).get("peft"))
    other = sum(model_parameters(frozen) or 0 for frozen in frozen_models if frozen)
    return choose(
        on,
        processes,
        model_parameters(model),
        memory,
        reference=stage in WITH_REFERENCE and not lora,
        lora=lora,
        other_frozen=other,
    )


def switch(value: bool | str, on_gpu: bool, available: bool = True) -> bool:
    """A speed switch: true, false, or auto (on GPUs, where what it needs is installed)."""
    if value == AUTO:
        return on_gpu and available
    return bool(value)


# Attention kernels that keep the sequences of a padding-free batch apart without a dense
# [tokens x tokens] mask (varlen kernels, flex's block mask).
VARLEN_ATTENTION = frozenset({"flash_attention_2", "flash_attention_3", "flex_attention"})


def attention(value: str, on_gpu: bool) -> str:
    """launch.attention for this machine: auto is flash_attention_2 on GPUs where flash-attn is installed."""
    if value != AUTO:
        return value
    return "flash_attention_2" if on_gpu and importlib.util.find_spec("flash_attn") is not None else "sdpa"


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


TEACHER_STAGES = frozenset({"ref_teacher", "dpo_teacher"})


def _count(model_config) -> int:
    """Parameters of a transformers config, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return sum(parameter.numel() for parameter in model.parameters())


def estimated_parameters(config: Mapping[str, Any]) -> dict[str, int | None]:
    """The teachers' and the students' sizes as `check` can know them before any job: the base
    teacher's config (a local folder, the hub cache, the GGUF with its random_init), the student
    cut from it or its own config. None where unknown offline."""
    import copy

    from transformers import AutoConfig

    from adpa.workflow.lora_targets import teacher_model_config

    teacher_config = teacher_model_config(config)
    sizes: dict[str, int | None] = {"teacher": _count(teacher_config) if teacher_config is not None else None}
    student = config["models"]["base_student"]
    cut = student.get("teacher_layers")
    student_config = None
    if cut is not None and teacher_config is not None:
        student_config = copy.deepcopy(teacher_config)
        student_config.num_hidden_layers = cut if isinstance(cut, int) else len(cut)
        if getattr(student_config, "layer_types", None):
            student_config.layer_types = student_config.layer_types[: student_config.num_hidden_layers]
    elif student.get("path"):
        reference = student["path"]
        try:
            source = expand_path(reference) if is_local(reference) else reference
            student_config = AutoConfig.from_pretrained(
                source,
                revision=student.get("revision"),
                trust_remote_code=student.get("trust_remote_code", False),
                local_files_only=True,
            )
        except (OSError, ValueError):
            student_config = None
    sizes["student"] = _count(student_config) if student_config is not None else None
    return sizes


def describe(
    config: Mapping[str, Any], stage: str, parameters: int | None, memory_gb: float | None, other_frozen: int = 0
) -> str:
    """One line of `check`: the engine a training stage will run with, and the estimate behind it
    (`other_frozen`: parameters of another frozen model the job holds, e.g. gkd's teacher)."""
    launch = config["launch"]
    if launch["accelerate_config"] != AUTO:
        return f"{stage}: engine from {launch['accelerate_config']} (launch.accelerate_config)"
    if launch.get("zero_stage") is not None:
        return f"{stage}: engine ZeRO-{launch['zero_stage']} (launch.zero_stage)"
    lora = bool(config[stage].get("peft")) if isinstance(config.get(stage), Mapping) else False
    processes = launch["num_processes"] * launch["num_machines"]
    on = device(launch)
    reference = stage in WITH_REFERENCE and not lora
    choice = choose(on, processes, parameters, memory_gb, reference=reference, lora=lora, other_frozen=other_frozen)
    line = f"{stage}: engine {choice.engine} ({choice.accelerate_file}): {choice.reason}"
    if on == "gpu" and parameters is not None and memory_gb is None:
        estimates = ", ".join(
            f"{name} {state_bytes(name, parameters, processes, reference, lora, other_frozen) / 1e9:.2f} GB"
            for name in (("plain",) if processes == 1 else ()) + ("zero2", "zero3", "zero3_offload")
        )
        line += f"; chosen when the job starts from its GPU's memory (model state per GPU: {estimates})"
    return line
