"""Teacher stages on GPUs: tokens/s and MFU of ref_teacher (SFT) and dpo_teacher (DPO) under ZeRO-3.

Usage:  python bench/gpu_teachers.py [--size small|tiny] [--rows N] [--dpo-rows N] [--workdir DIR] [--peak-tflops T]
        python bench/gpu_teachers.py --cpu     # smoke check of the same path on CPU

Runs `snakemake --cores all results/ref_teacher results/dpo_teacher` on a fresh copy of the
workflow with config/tiny.yaml and `--config` overrides: bf16, config/accelerate/deepspeed_zero3.yaml,
one process per visible CUDA GPU, the --size model and the --rows generated rows (--cpu:
deepspeed_zero3_cpu.yaml, fp32, 2 processes, size tiny). Then prints one Markdown table from the
stages' manifests and Snakemake's benchmarks/. The default (small, 16384 rows, 2048 for DPO) is
sized for about 2-3 minutes on one H100 (an estimate; --cpu takes about 2 minutes on 2 cores).
The scratch folder is removed after a successful run unless --workdir names one.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # adpa from this checkout, installed or not

sys.path.insert(0, str(REPO / "tests"))
from workflow_copy import copy_workflow  # noqa: E402

STAGES = ("ref_teacher", "dpo_teacher")
TARGETS = tuple(f"results/{stage}" for stage in STAGES)
GPU_ACCELERATE = "config/accelerate/deepspeed_zero3.yaml"
CPU_ACCELERATE = "config/accelerate/deepspeed_zero3_cpu.yaml"
CPU_PROCESSES = 2
# Model FLOPs per parameter and trained token: forward 2 + backward 4; DPO also runs the frozen
# reference model forward (2) on the same chosen and rejected tokens.
FLOPS_PER_PARAMETER_TOKEN = {"ref_teacher": 6, "dpo_teacher": 8}
# Peak dense bf16 TFLOP/s per GPU (no sparsity), matched in order against the device name.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


@dataclass(frozen=True)
class Size:
    """The base teacher's shape and the teacher stages' batches for one benchmark size."""

    random_init: dict[str, int] | None  # None keeps config/tiny.yaml's
    rows: int
    dpo_rows: int | None
    sft_batch: int
    sft_length: int
    dpo_batch: int
    dpo_length: int


SIZES = {
    "tiny": Size(None, rows=32, dpo_rows=None, sft_batch=2, sft_length=128, dpo_batch=2, dpo_length=128),
    # ~140M parameters (50M of them the tied 49152 x 1024 embedding), SmolLM2's family.
    "small": Size(
        {
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_hidden_layers": 8,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
        },
        rows=16384,
        dpo_rows=2048,
        sft_batch=8,
        sft_length=1024,
        dpo_batch=32,
        dpo_length=256,
    ),
}


def overrides(size: Size, processes: int, threads: int, gpu: bool, rows: int, dpo_rows: int | None) -> dict[str, Any]:
    """The `--config` values on top of config/tiny.yaml; accumulation 1 in every training stage."""
    from adpa.stages import REGISTRY
    from adpa.tasks import FAMILY_NAMES

    values: dict[str, Any] = {
        "precision": "bf16" if gpu else "fp32",
        "launch": {
            "accelerate_config": GPU_ACCELERATE if gpu else CPU_ACCELERATE,
            "num_processes": processes,
            "threads": threads,
            "save_steps": 1_000_000,  # no checkpoint inside the measured train time
        },
        # Every task family: the embedded default's four hold too few prompts for held-out rows beside 16k training rows.
        "datasets": {"generate": {"train_rows": rows, "families": list(FAMILY_NAMES)}},
    }
    if dpo_rows is not None:
        values["datasets"]["preference"] = {"max_train_rows": dpo_rows}
    if size.random_init is not None:
        values["models"] = {"base_teacher": {"random_init": dict(size.random_init)}}
    batches = {"ref_teacher": (size.sft_batch, size.sft_length), "dpo_teacher": (size.dpo_batch, size.dpo_length)}
    for section in dict.fromkeys(stage.section for stage in REGISTRY if stage.kind == "training"):
        # The student stages do not run, but the config check derives their accumulation too.
        batch, length = batches.get(section, (size.sft_batch, None))
        values[section] = {"per_device_batch_size": batch, "effective_batch_size": batch * processes}
        if length is not None:
            values[section]["max_length"] = length
    return values


def config_arguments(values: dict[str, Any]) -> list[str]:
    """KEY=VALUE entries for `snakemake --config`; JSON is YAML flow syntax, which Snakemake parses."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def achieved_tflops(stage: str, parameters: int, tokens_per_second: float) -> float:
    return FLOPS_PER_PARAMETER_TOKEN[stage] * parameters * tokens_per_second / 1e12


def mfu(tflops: float, peak_tflops_per_device: float | None, devices: int) -> float | None:
    """Model FLOPs utilization: achieved over the peak of all devices of the run."""
    if peak_tflops_per_device is None:
        return None
    return tflops / (peak_tflops_per_device * devices)


def peak_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def run_workflow(workdir: Path, values: dict[str, Any], gpus: int) -> None:
    command = [sys.executable, "-m", "snakemake", *TARGETS, "--cores", "all", "--configfile", "config/tiny.yaml"]
    if gpus:
        command += ["--resources", f"gpu={gpus}"]
    command += ["--config", *config_arguments(values)]
    print("$", shlex.join(command), flush=True)
    log = workdir / "bench_snakemake.log"
    # The hub is never needed (the model ships in a Python package): fail fast instead of retrying.
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    with log.open("w") as handle:
        result = subprocess.run(command, cwd=workdir, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        print(log.read_text()[-6000:], file=sys.stderr)
        for stage in STAGES:
            stage_log = workdir / "logs" / f"{stage}.log"
            if stage_log.is_file():
                print(f"--- {stage_log} (tail)\n{stage_log.read_text()[-3000:]}", file=sys.stderr)
        sys.exit(f"error: snakemake failed (exit {result.returncode}); full output in {log}")


def benchmark(workdir: Path, stage: str) -> dict[str, float]:
    with (workdir / "benchmarks" / f"{stage}.tsv").open() as handle:
        record = next(csv.DictReader(handle, delimiter="\t"))
    return {"s": float(record["s"]), "max_rss": float(record["max_rss"])}


def table(workdir: Path, device_name: str, peak: float | None) -> list[str]:
    lines = [
        "| stage | processes | precision | zero stage | device | steps | train tokens (incl. padding) | train s"
        " | tokens/s | model parameters | achieved TFLOP/s | MFU | job wall s | max RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        manifest = json.loads((workdir / "results" / stage / "adpa_manifest.json").read_text())
        metrics, job = manifest["metrics"], benchmark(workdir, stage)
        tokens_per_second = metrics["train_tokens_incl_padding"] / metrics["train_seconds"]
        tflops = achieved_tflops(stage, metrics["model_parameters"], tokens_per_second)
        utilization = mfu(tflops, peak, metrics["processes"]) if metrics["device"] == "cuda" else None
        device = device_name if metrics["device"] == "cuda" else metrics["device"]
        lines.append(
            f"| {stage} | {metrics['processes']} | {manifest['params']['precision']} | {metrics['zero_stage']}"
            f" | {device} | {metrics['global_step']} | {metrics['train_tokens_incl_padding']}"
            f" | {metrics['train_seconds']:.1f} | {tokens_per_second:,.0f} | {metrics['model_parameters'] / 1e6:.1f}M"
            f" | {tflops:.3g} | {'n/a' if utilization is None else f'{utilization:.1%}'}"
            f" | {job['s']:.0f} | {job['max_rss']:.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cpu", action="store_true", help=f"CPU smoke check: {CPU_ACCELERATE}, fp32, {CPU_PROCESSES} processes"
    )
    parser.add_argument(
        "--size", choices=sorted(SIZES), help="base teacher size (default: small on GPUs, tiny with --cpu)"
    )
    parser.add_argument("--rows", type=int, help="generated training rows (default: the size's)")
    parser.add_argument("--dpo-rows", type=int, help="of those, rows DPO trains on (default: the size's)")
    parser.add_argument("--workdir", "--keep", type=Path, help="scratch folder, new or empty, kept afterwards")
    parser.add_argument(
        "--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of one GPU (default: from its name)"
    )
    args = parser.parse_args()

    import torch

    # device_count() asks NVML: no CUDA context in this process while the jobs train.
    gpus = 0 if args.cpu else torch.cuda.device_count()
    if not args.cpu and gpus == 0:
        sys.exit("error: no CUDA GPU visible (torch.cuda.device_count() is 0); use --cpu for the CPU smoke check")
    size_name = args.size or ("tiny" if args.cpu else "small")
    size = SIZES[size_name]
    rows = args.rows if args.rows is not None else size.rows
    dpo_rows = args.dpo_rows if args.dpo_rows is not None else size.dpo_rows
    values = overrides(size, gpus or CPU_PROCESSES, os.cpu_count() or 1, not args.cpu, rows, dpo_rows)
    if args.workdir and args.workdir.exists() and any(args.workdir.iterdir()):
        sys.exit(f"error: --workdir {args.workdir} is not empty; name a new or empty folder")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="adpa-gpu-teachers-"))
    start = time.perf_counter()
    copy_workflow(workdir)
    run_workflow(workdir, values, gpus)  # a failed run keeps its folder for the logs
    device_name = torch.cuda.get_device_name(0) if gpus else "cpu"
    peak = (args.peak_tflops or peak_tflops(device_name)) if gpus else None
    print("\n".join(table(workdir, device_name, peak)))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    flops = ", ".join(f"{stage} {factor}" for stage, factor in FLOPS_PER_PARAMETER_TOKEN.items())
    print(
        f"\nAchieved TFLOP/s = F x N x tokens/s / 1e12, N = model parameters (tied embedding once), F = {flops}"
        " (DPO adds the reference forward); attention-score FLOPs are left out. tokens/s = all input tokens"
        " (padding included; packed SFT has none) of all processes / Trainer train_runtime (first step included)."
        f" MFU = achieved / (peak x processes), peak = {f'{peak:g}' if peak else 'n/a'} TFLOP/s dense bf16 per GPU"
        f"{' (unknown GPU: pass --peak-tflops)' if gpus and not peak else ''}."
        f" Size {size_name}, {rows} rows (DPO: {min(dpo_rows or rows, rows)}),"
        f" accumulation 1; whole script {time.perf_counter() - start:.0f} s."
    )


if __name__ == "__main__":
    main()
