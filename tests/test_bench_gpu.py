"""bench/gpu_bench.py: its arithmetic, the configs it asks for (through the schema), its flips of the speed
switches, its GPU sampling and tables, its refusals, and one real CPU smoke run of its code paths."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO

from adpa.training.train import throughput
from adpa.workflow.config import gradient_accumulation_steps

spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "bench" / "gpu_bench.py")
bench = sys.modules["gpu_bench"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(bench)

TEACHER = "/models/teacher"


def teacher_config(processes: int, cpu: bool, rows: int = 4096, launch: dict | None = None) -> dict:
    """What the teacher part hands the workflow: config/tiny.yaml and its changes, checked as the workflow checks."""
    sizes = bench.machine_sizes(cpu)
    overrides = bench.teacher_overrides(sizes, processes, 16, cpu, rows, launch)
    return bench.checked(bench.compose_config(REPO / "config" / "tiny.yaml", overrides, TEACHER))


def test_flops_and_mfu():
    # 6 x 1e9 parameters x 1e4 tokens/s = 60 TFLOP/s; DPO adds the reference forward: 8 x.
    assert bench.achieved_tflops("ref_teacher", 10**9, 1e4) == pytest.approx(60.0)
    assert bench.achieved_tflops("dpo_teacher", 10**9, 1e4) == pytest.approx(80.0)
    # Precomputed reference log-probs: the reference forward ran before the measured train_runtime.
    assert bench.achieved_tflops("dpo_teacher", 10**9, 1e4, precomputed=True) == pytest.approx(60.0)
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
def test_gpu_teacher_config_passes_the_schema(processes):
    config = teacher_config(processes, cpu=False)
    launch = config["launch"]
    assert config["precision"] == "bf16"
    assert launch["accelerate_config"] == "auto" and launch["device"] == "gpu"
    assert [launch[key] for key in ("padding_free", "liger_kernel", "precompute_ref_log_probs")] == ["auto"] * 3
    assert launch["num_processes"] == processes and launch["threads"] == 16
    assert config["models"]["base_teacher"] == {"path": TEACHER, "trust_remote_code": False}  # no gguf beside it
    assert config["datasets"]["generate"]["train_rows"] == 4096
    assert config["datasets"]["generate"]["families"] is None
    assert config["datasets"]["preference"]["max_train_rows"] == 20 * 32 * processes
    assert config["ref_teacher"]["max_length"] == 2048 and config["ref_teacher"]["packing"] is True
    assert config["dpo_teacher"]["max_length"] == 512
    assert config["dpo_teacher"]["per_device_batch_size"] == 32
    for stage in ("ref_teacher", "dpo_teacher", "student_sft", "dckd"):
        assert gradient_accumulation_steps(config, stage) == 1


def test_cpu_teacher_config_keeps_tiny_shapes():
    config = teacher_config(1, cpu=True, rows=16)
    assert config["precision"] == "fp32" and config["launch"]["device"] == "cpu"
    assert config["launch"]["num_processes"] == 1
    assert config["ref_teacher"]["max_length"] == 128
    assert bench.machine_sizes(True).teacher_shape["hidden_size"] == 64  # config/tiny.yaml's random init


@pytest.mark.parametrize("cpu", [False, True])
def test_dag_config_is_the_embedded_default_on_a_local_teacher(cpu):
    sizes = bench.machine_sizes(cpu)
    overrides = bench.dag_overrides(sizes, cpu, 16)
    config = bench.checked(bench.compose_config(REPO / "config" / "config.yaml", overrides, TEACHER))
    assert config["run_name"] == "embedded-smollm2"
    assert config["models"]["base_teacher"]["path"] == TEACHER and "gguf" not in config["models"]["base_teacher"]
    assert config["launch"]["accelerate_config"] == "auto"
    assert config["launch"]["device"] == ("cpu" if cpu else "gpu")
    # On GPUs the data and the student's cut are the default's; on CPU a few rows and a 1-layer cut of tiny's 2.
    assert config["datasets"]["generate"]["train_rows"] == (32 if cpu else 512)
    assert config["models"]["base_student"]["teacher_layers"] == (1 if cpu else [0, 1, *range(22, 30)])


@pytest.mark.parametrize("item", ["engine", "attention", "liger_kernel", "precompute_ref_log_probs"])
def test_each_flip_passes_the_schema(item, monkeypatch):
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: SimpleNamespace())  # liger installed
    baseline = {"engine": "plain", "attention": "sdpa", "liger_kernel": True, "precompute_ref_log_probs": True}
    launch, note = bench.flipped_launch(item, baseline, cpu=False)
    config = teacher_config(1, cpu=False, launch=launch)
    if item == "engine":
        assert note == "forced ZeRO-3"
        assert (REPO / bench.ZERO3_CONFIG["gpu"]).is_file() and (REPO / bench.ZERO3_CONFIG["cpu"]).is_file()
        assert config["launch"]["accelerate_config"] == bench.ZERO3_CONFIG["gpu"]
    elif item == "attention":
        assert config["launch"]["attention"] == "flex_attention" and note == "attention flex_attention"
    else:
        assert config["launch"][item] is False and note == f"{item} off"


def test_flips_turn_what_auto_chose(monkeypatch):
    assert bench.flipped_launch("padding_free", {"padding_free": False}, cpu=False) == (
        {"padding_free": True},
        "padding_free on",
    )
    assert bench.flipped_launch("engine", {"engine": "zero3"}, cpu=False) == (None, "auto already runs ZeRO-3")
    assert bench.flipped_launch("engine", None, cpu=True)[0] == {"accelerate_config": bench.ZERO3_CONFIG["cpu"]}
    # No baseline ran: auto's documented choice (on GPUs padding-free and precompute on; on CPUs off).
    assert bench.flipped_launch("precompute_ref_log_probs", None, cpu=False)[0] == {"precompute_ref_log_probs": False}
    assert bench.flipped_launch("padding_free", None, cpu=True)[0] == {"padding_free": True}
    assert bench.flipped_launch("attention", {"attention": "flex_attention"}, cpu=False)[0] == {"attention": "sdpa"}
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    assert bench.flipped_launch("liger_kernel", {"liger_kernel": False}, cpu=False) == (
        None,
        "liger_kernel is not installed",
    )


@pytest.mark.parametrize("processes", [1, 8])
def test_generated_rows_fill_the_steps_within_capacity(processes):
    sizes = bench.machine_sizes(False)
    rows = bench.sft_rows(sizes, processes, tokens_per_row=45.0)
    # 20 steps x 4 sequences x 2048 tokens per process, 45 tokens a row, 10% packing slack.
    assert rows == pytest.approx(20 * 4 * 2048 * processes / 45 * 1.1, abs=1)
    assert rows >= bench.dpo_rows(sizes, processes)
    teacher_config(processes, cpu=False, rows=rows)  # the held-out capacity check passes


def test_rows_beyond_capacity_are_a_one_line_error_before_any_job():
    sizes = bench.machine_sizes(False)
    overrides = bench.teacher_overrides(sizes, 1, 16, False, 4096)
    overrides["datasets"]["generate"]["families"] = ["next_day"]  # 7 distinct prompts
    overrides["datasets"]["generate"]["sft_error_rates"] = {}
    with pytest.raises(SystemExit) as raised:
        bench.checked(bench.compose_config(REPO / "config" / "tiny.yaml", overrides, TEACHER))
    message = str(raised.value)
    assert message.startswith("error: config key 'datasets.generate.test_rows'") and "\n" not in message


def test_parts_selection():
    assert "dpo:liger" in bench.select_parts(None, None)
    assert bench.select_parts(None, None)[:3] == ["dag", "sft", "sft:engine"]
    assert bench.select_parts("dpo,sft", None) == ["sft", "dpo"]  # the bench's order
    assert bench.select_parts(None, "dag,sft:liger") == [
        p for p in bench.DEFAULT_PARTS if p not in {"dag", "sft:liger"}
    ]
    with pytest.raises(SystemExit, match="unknown part 'gpu'"):
        bench.select_parts("gpu", None)


def test_gpu_busy_from_samples():
    assert bench.parse_smi_line("2026/12/04 10:00:00.500, 87") == (
        pytest.approx(time.mktime(time.strptime("2026/12/04 10:00:00", "%Y/%m/%d %H:%M:%S")) + 0.5),
        87.0,
    )
    assert bench.parse_smi_line("2026/12/04 10:00:00.500, [N/A]") is None
    samples = [(0.0, 100.0), (1.0, 50.0), (2.0, 0.0), (3.0, 100.0)]
    assert bench.busy_fraction(samples, 0.5, 2.5) == pytest.approx(0.25)
    assert bench.busy_fraction(samples, 0.0, 3.0) == pytest.approx(0.625)
    assert bench.busy_fraction(samples, 5.0, 6.0) is None
    assert bench.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == [2, 3]
    assert bench.visible_gpus({}) is None and bench.visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-5f1e"}) is None


def test_training_window_and_job_counts():
    started = {"metrics": {"started_at": 100.0, "finished_at": 160.5}}
    assert bench.training_window(started, 99.0) == (100.0, 160.5)
    # Without the training process's times: the job's wall seconds up to the manifest's creation.
    created = {"metrics": {}, "created": "2026-12-04T10:00:00+0000"}
    start, end = bench.training_window(created, 30.0)
    assert end - start == pytest.approx(31.0) and end == pytest.approx(1796378400 + 1)
    assert bench.training_window({"metrics": {}}, None) == (None, None)
    log = "5 of 23 steps (22%) done\n...\n23 of 23 steps (100%) done\nComplete log: x"
    assert bench.jobs_done(log) == 23 and bench.jobs_done("Nothing to be done.") is None
    assert bench.engine_of({"engine": "zero2"}) == "zero2"
    assert bench.engine_of({"engine": "explicit", "zero_stage": 3}) == "zero3"
    assert bench.engine_of({"zero_stage": None}) == "plain"


def test_dag_report_reads_what_the_run_left(tmp_path):
    """Per training stage: its job's wall (benchmarks/ under the output's own path), its manifest's numbers
    and the GPU samples of its window; stages that do not train (generated data) have no row."""
    manifests = {
        "ref_teacher": {
            "train_seconds": 20.0,
            "engine": "plain",
            "started_at": 100.0,
            "finished_at": 130.0,
            "seconds_imports": 2.5,
            "seconds_before_first_step": 6.0,
            "seconds_after_training": 4.0,
        },
        "seed42/dckd": {"train_seconds": 5.0, "zero_stage": 3},  # no start/finish: the job's window
        "data/sft": None,
    }
    for output, metrics in manifests.items():
        folder = tmp_path / "results" / output
        folder.mkdir(parents=True)
        manifest = {"stage": output, "created": "2026-12-04T10:00:00+0000", "metrics": metrics or {"rows": 3}}
        (folder / "adpa_manifest.json").write_text(json.dumps(manifest))
        benchmark = tmp_path / "benchmarks" / f"{output}.tsv"
        benchmark.parent.mkdir(parents=True, exist_ok=True)
        benchmark.write_text("s\th:m:s\tmax_rss\n40.5\t0:00:40\t2048.0\n")
    log = tmp_path / "bench-dag.log"
    log.write_text("1 of 3 steps (33%) done\n3 of 3 steps (100%) done\n")
    sampler = bench.GpuSampler()
    created = 1796378400.0
    sampler.samples = [(50.0, 0.0), (110.0, 60.0), (120.0, 80.0), (created - 10, 50.0), (created + 500, 0.0)]
    report = bench.dag_report(tmp_path, bench.Run(0, 0.0, created + 1000, log), sampler)
    assert report["jobs"] == 3 and report["wall_s"] == pytest.approx(created + 1000)
    assert report["gpu_busy"] == pytest.approx(0.38)
    stages = {stage["stage"]: stage for stage in report["stages"]}
    assert sorted(stages) == ["ref_teacher", "seed42/dckd"]
    assert stages["ref_teacher"]["gpu_busy"] == pytest.approx(0.7) and stages["ref_teacher"]["job_wall_s"] == 40.5
    assert stages["seed42/dckd"]["gpu_busy"] == pytest.approx(0.5) and stages["seed42/dckd"]["engine"] == "zero3"
    table = bench.dag_table({"model_setup_s": 3.0, **report})
    assert table[2] == "| dag | 0 | " + f"{created + 1000:.0f}" + " | 3 | 38.0% | 3 |"
    assert "| ref_teacher | 40.5 | 20.0 | 2.5 | 6.0 | 4.0 | plain | n/a | 70.0% | training process |" in table


def test_table_reads_what_training_writes(tmp_path):
    parameter = SimpleNamespace(numel=lambda: 0, ds_numel=10**9)  # a ZeRO-3 shard: the full size is ds_numel
    trainer = SimpleNamespace(
        state=SimpleNamespace(num_input_tokens_seen=150_000), model=SimpleNamespace(parameters=lambda: [parameter])
    )
    written = throughput(trainer, SimpleNamespace(metrics={"train_runtime": 10.0}), tokens_before=50_000)
    assert written == {"train_seconds": 10.0, "train_tokens_incl_padding": 100_000, "model_parameters": 10**9}
    metrics = {
        **written,
        "processes": 1,
        "zero_stage": 3,
        "engine": "zero3",
        "device": "cuda",
        "global_step": 7,
        "padding_free": True,
        "liger_kernel": False,
        "attention": "flash_attention_2",
        "peak_memory_gb": 41.25,
        "seconds_before_first_step": 12.5,
        "started_at": 1000.0,
        "finished_at": 1010.0,
    }
    sampler = bench.GpuSampler()
    sampler.samples = [(999.0, 0.0), (1001.0, 80.0), (1009.0, 90.0), (1011.0, 0.0)]
    context = SimpleNamespace(peak=989.0, sampler=sampler)
    rows = []
    for part, stage in bench.STAGE_OF.items():
        numbers = bench.teacher_numbers(context, stage, {"metrics": metrics}, 42.5)
        rows.append({"variant": part, "note": "every switch auto", "launch": {}, "returncode": 0, **numbers})
    precomputed = bench.teacher_numbers(
        context, "dpo_teacher", {"metrics": {**metrics, "precompute_ref_log_probs": True}}, 42.5
    )
    rows.append({"variant": "dpo:precompute", "note": "on", "launch": {}, "returncode": 0, **precomputed})
    rows.append({"variant": "sft:liger", "note": "liger_kernel is not installed", "launch": None})
    cells = [line.strip("| ").split(" | ") for line in bench.teacher_table(rows)[2:]]
    # 1e4 tokens/s: 60 TFLOP/s for SFT (6.1% of 989), 80 for DPO (8.1%); busy 85% in [1000, 1010].
    assert cells[0] == [
        "sft",
        "every switch auto",
        "zero3",
        "on",
        "off",
        "n/a",
        "flash_attention_2",
        "1",
        "7",
        "100000",
        "10.0",
        "10,000",
        "60",
        "6.1%",
        "41.2",
        "12.5",
        "42",
        "85.0%",
    ]
    assert cells[1][12:14] == ["80", "8.1%"]
    assert cells[2][5] == "on" and cells[2][12:14] == ["60", "6.1%"]  # no reference forward in the window
    assert cells[3][:2] == ["sft:liger", "not run: liger_kernel is not installed"]


def test_without_cuda_one_line_error():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_bench.py")],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: no CUDA GPU visible (torch.cuda.device_count() is 0); use --cpu for the CPU smoke check"
    ]


def test_non_empty_workdir_is_refused_before_running(tmp_path):
    (tmp_path / "old").write_text("")
    with pytest.raises(SystemExit, match="is not empty"):
        bench.main(["--cpu", "--keep", str(tmp_path)])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["old"]


@pytest.mark.workflow
def test_cpu_smoke_run_prints_the_tables(tmp_path):
    """The same code paths as on a GPU, on CPU: a model built from SmolLM2's tokenizer (out of the GGUF
    package here), the teacher baselines and one flip, each through Snakemake; tables with numbers."""
    report = tmp_path / "report.json"
    command = [sys.executable, str(REPO / "bench" / "gpu_bench.py"), "--cpu", "--only", "sft,dpo,dpo:engine"]
    result = subprocess.run(
        [*command, "--json", str(report), "--tokenizer", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Machine: no GPU (CPU run);")
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ") for line in lines if line.startswith("| ")}
    header = rows["variant"]
    for name in ("sft", "dpo", "dpo:engine"):
        row = dict(zip(header, rows[name]))
        assert float(row["tokens/s"].replace(",", "")) > 0 and float(row["train s"]) > 0
        assert float(row["job wall s"]) > 0 and float(row["s before first step"]) > 0
        assert int(row["steps"]) >= 1 and row["MFU"] == "n/a" and row["GPU busy"] == "n/a"
    assert dict(zip(header, rows["sft"]))["engine"] == "plain"
    assert dict(zip(header, rows["dpo:engine"]))["engine"] == "zero3"
    raw = json.loads(report.read_text())
    assert raw["machine"]["gpus"] == [] and raw["failed"] == []
    assert [row["variant"] for row in raw["teachers"]] == ["sft", "dpo", "dpo:engine"]
    assert not Path(raw["teachers"][0]["log"]).exists()  # a run without --workdir removes its scratch folder
