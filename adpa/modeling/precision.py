"""Numeric precision: what `precision: auto` becomes on this machine, and the autocast it needs.

`auto` is resolved where the stage runs (a Slurm login node may differ from its compute nodes):
bf16 where a GPU supports it; on a CPU with native bf16 arithmetic fp32 weights under bf16 autocast
(AMX-BF16: a training step 2.5x faster than fp32; AVX512-BF16 without AMX, an AMD EPYC: 2.4-3.7x
per step in bench/precision.py, the main job 1683 s in fp32 -> 800 s; Arm's `bf16` feature too);
fp32 on CPUs without it (not measured here: no such machine was at hand).
The config's word stays the rerun trigger; each manifest records what really ran.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Precision:
    """weights: dtype the model is loaded in; mixed: the Trainer's mixed precision (autocast), or "no"."""

    weights: str
    mixed: str

    @property
    def label(self) -> str:
        if self.mixed == "no":
            return self.weights
        return self.weights if self.weights == self.mixed else f"{self.weights}+{self.mixed}-autocast"


FIXED = {
    "fp32": Precision("fp32", "no"),
    "bf16": Precision("bf16", "bf16"),
    "fp16": Precision("fp16", "fp16"),
}


# CPU flags of native bf16 arithmetic: x86 AMX tiles and AVX512 dot products, Arm's BF16 extension.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})


def cpu_flags(cpuinfo: Path | None = None) -> frozenset[str]:
    """The feature flags of /proc/cpuinfo (x86 `flags`, Arm `Features`); none when unreadable."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_has_native_bf16(cpuinfo: Path | None = None) -> bool:
    """True when the CPU computes bf16 natively (autocast pays off there)."""
    return bool(cpu_flags(cpuinfo) & NATIVE_BF16_FLAGS)


def resolve(precision: str, cpuinfo: Path | None = None) -> Precision:
    """The weights dtype and mixed precision a stage runs with for the config's `precision`."""
    if precision in FIXED:
        return FIXED[precision]
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r} (expected auto, {', '.join(FIXED)})")
    import torch

    if torch.cuda.is_available():
        return FIXED["bf16"] if torch.cuda.is_bf16_supported() else FIXED["fp32"]
    return Precision("fp32", "bf16") if cpu_has_native_bf16(cpuinfo) else FIXED["fp32"]


def under_deepspeed() -> bool:
    """This process was started by `accelerate launch` with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def for_training(precision: str, deepspeed: bool, frozen_base: bool = False) -> Precision:
    """What a model the optimizer updates is loaded in: fp32 master weights whenever the mixed
    precision is half, unless DeepSpeed's optimizer keeps the fp32 master copy itself. AdamW on
    bf16 parameters drops every update below half a bf16 step (2^-8 of the weight): at the DPO
    teacher's lr 5e-7 nearly all of them. A LoRA base is frozen and stays half (PEFT keeps its
    adapters in fp32)."""
    resolved = resolve(precision)
    if resolved.weights != "fp32" and not deepspeed and not frozen_base:
        return Precision("fp32", resolved.mixed)
    return resolved


def autocast(precision: Precision, device_type: str):
    """The autocast context for inference with `precision` (a no-op without mixed precision)."""
    import torch

    if precision.mixed == "no" or precision.weights == precision.mixed:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision.mixed])
