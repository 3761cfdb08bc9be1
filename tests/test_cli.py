from __future__ import annotations

import subprocess
import sys

import yaml
from conftest import REPO


def adpa(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adpa", *args], cwd=cwd, capture_output=True, text=True)


def test_check_prints_derived_accumulation():
    result = adpa("check", "--configfile", "config/tiny.yaml")
    assert result.returncode == 0, result.stderr
    assert "ref_teacher: gradient_accumulation_steps = 2" in result.stdout
    assert result.stdout.strip().endswith("config/tiny.yaml: ok")


def test_bad_config_key_is_one_line_before_anything_runs(tmp_path):
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["ref_teacher"]["learning_rte"] = 1.0e-3
    path = tmp_path / "bad config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = adpa("ref_teacher", "--configfile", str(path), "--model", "x", "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: config key 'ref_teacher.learning_rte': unknown key; did you mean 'learning_rate'?"
    ]
    assert not (tmp_path / "out").exists()


def test_missing_model_path_is_named_before_training(tmp_path):
    missing = tmp_path / "my models" / "teacher"
    result = adpa(
        "ref_teacher",
        "--configfile",
        "config/tiny.yaml",
        "--model",
        str(missing),
        "--output",
        str(tmp_path / "out"),
        "--work-dir",
        str(tmp_path / "work"),
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: model '{missing}': no model folder with config.json at {missing}"
    )
    assert not (tmp_path / "out").exists()


def test_work_dir_tilde_is_expanded_by_the_stage_cli(monkeypatch, tmp_path):
    """The rule passes work_dir quoted (no shell expansion): `~/ckpts` must not become a literal `~` folder."""
    from adpa.cli import build_parser

    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_parser().parse_args(
        ["ref_teacher", "--params", "{}", "--model", "m", "--output", "o", "--work-dir", "~/ckpts"]
    )
    assert args.work_dir == tmp_path / "ckpts"


def test_a_stage_module_imports_with_the_gc_paused_and_stays_frozen():
    """Importing a stage's stack rescanned ~500k objects ~1500 times (1 s of every job's start): the
    import runs without collections, its objects are frozen, and the GC is on again afterwards."""
    probe = (
        "import gc\n"
        "from adpa.cli import _runner\n"
        "from adpa.dag.stages import STAGES\n"
        "before = sum(generation['collections'] for generation in gc.get_stats())\n"
        "_runner(STAGES['evaluate'])\n"
        "during = sum(generation['collections'] for generation in gc.get_stats()) - before\n"
        "import torch, transformers\n"
        "print(during, gc.isenabled(), gc.get_freeze_count())\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    during, enabled, frozen = result.stdout.split()
    assert (int(during), enabled) == (0, "True")
    assert int(frozen) > 100_000  # torch and transformers among them


def test_check_prints_each_training_stage_engine_and_its_estimate(tmp_path):
    overlay = tmp_path / "one gpu.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {"launch": {"accelerate_config": "auto", "device": "gpu", "gpu_memory_gb": 80, "num_processes": 1}}
        )
    )
    result = adpa("check", "--configfile", "config/tiny.yaml", str(overlay), "--slurm")
    assert result.returncode == 0, result.stderr
    lines = {line.split(":")[0]: line for line in result.stdout.splitlines() if ": engine " in line}
    assert lines["ref_teacher"].startswith("ref_teacher: engine plain (config/accelerate/gpu.yaml): ")
    assert (
        "parameters x 1 GPU(s) of 80 GB" in lines["dpo_teacher"]
        and "GB of model state per GPU fit 75%" in lines["dckd"]
    )
    tiny = adpa("check", "--configfile", "config/tiny.yaml")
    assert (
        "ref_teacher: engine from config/accelerate/deepspeed_zero3_cpu.yaml (launch.accelerate_config)" in tiny.stdout
    )
