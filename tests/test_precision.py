"""precision: auto resolves per machine (CPUs with and without native bf16) and reaches the Trainer and the manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adpa.modeling import precision
from adpa.modeling.precision import Precision, autocast, cpu_flags, cpu_has_native_bf16, resolve

FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sep avx2 avx512f"
AVX512_BF16_FLAGS = FLAGS + " avx512_bf16"  # AMD Zen 4, Intel Cooper Lake
AMX_FLAGS = AVX512_BF16_FLAGS + " amx_bf16 amx_tile amx_int8"
ARM_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop"


def cpuinfo(tmp_path: Path, flags: str, key: str = "flags") -> Path:
    path = tmp_path / "cpuinfo"
    processor = f"processor\t: 0\nmodel name\t: some CPU\n{key}\t\t: {flags}\n\n"
    path.write_text(processor + processor.replace(": 0", ": 1"))
    return path


@pytest.mark.parametrize(
    ("flags", "key"),
    [(AMX_FLAGS, "flags"), (AVX512_BF16_FLAGS, "flags"), (ARM_FEATURES + " bf16 i8mm", "Features")],
    ids=["amx_bf16", "avx512_bf16", "arm_bf16"],
)
def test_native_bf16_cpu_gets_fp32_weights_under_bf16_autocast(tmp_path, monkeypatch, flags, key):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    resolved = resolve("auto", cpuinfo(tmp_path, flags, key))
    assert resolved == Precision("fp32", "bf16") and resolved.label == "fp32+bf16-autocast"
    with autocast(resolved, "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16


@pytest.mark.parametrize(("flags", "key"), [(FLAGS, "flags"), (ARM_FEATURES, "Features")], ids=["x86", "arm"])
def test_cpu_without_native_bf16_stays_fp32(tmp_path, monkeypatch, flags, key):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not cpu_has_native_bf16(cpuinfo(tmp_path, flags, key))
    resolved = resolve("auto", cpuinfo(tmp_path, flags, key))
    assert resolved == Precision("fp32", "no") and resolved.label == "fp32"
    with autocast(resolved, "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_unreadable_cpuinfo_means_no_native_bf16(tmp_path):
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert not cpu_has_native_bf16(tmp_path / "missing")


def test_gpu_with_bf16_gets_bf16(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve("auto", cpuinfo(tmp_path, AMX_FLAGS)) == Precision("bf16", "bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve("auto", cpuinfo(tmp_path, AMX_FLAGS)) == Precision("fp32", "no")


def test_fixed_precisions_do_not_depend_on_the_machine(tmp_path):
    for name in ("fp32", "bf16", "fp16"):
        assert resolve(name, cpuinfo(tmp_path, AMX_FLAGS)) == resolve(name, cpuinfo(tmp_path, FLAGS))
    assert resolve("bf16").label == "bf16" and resolve("fp32").label == "fp32"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve("int8")


@pytest.mark.parametrize(("flags", "bf16"), [(AMX_FLAGS, True), (FLAGS, False)])
def test_trainer_arguments_and_weights_follow_auto(tmp_path, monkeypatch, flags, bf16):
    from adpa.modeling.models import DTYPES
    from adpa.training.train import LaunchOptions, StageRun, trainer_arguments

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo(tmp_path, flags))
    training = {
        "epochs": 1,
        "learning_rate": 1e-4,
        "per_device_batch_size": 2,
        "effective_batch_size": 2,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "max_length": 64,
    }
    launch = LaunchOptions(gradient_checkpointing=False, save_steps=50, save_total_limit=2, logging_steps=1)
    run = StageRun(
        "ref_teacher",
        {"training": training, "precision": "auto", "seed": 0},
        "{}",
        "code",
        tmp_path / "out",
        tmp_path / "work",
        launch,
    )
    arguments = trainer_arguments(run)
    assert arguments["bf16"] is bf16 and arguments["fp16"] is False
    assert arguments["report_to"] == ["tensorboard"]
    # Weights stay fp32 on the CPU either way: autocast does the bf16 matmuls.
    assert DTYPES[resolve("auto").weights] == torch.float32


def test_accelerate_launch_leaves_auto_to_the_stage():
    from adpa.workflow.launch import PRECISION_TO_ACCELERATE

    assert PRECISION_TO_ACCELERATE["auto"] == "no" and PRECISION_TO_ACCELERATE["bf16"] == "bf16"
