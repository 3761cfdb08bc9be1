"""No stage learns from nothing (real stages, one process): a max_length shorter than the prompts is
one error line before any step and publishes nothing; a few rows too long are left out with a
warning and counted in the manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, copy_tiny_inputs

TINY = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())


def adpa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adpa", *args], cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ref_teacher_project) -> Path:
    """The tiny config's random base teacher and generated data."""
    return copy_tiny_inputs(ref_teacher_project, tmp_path_factory.mktemp("learned") / "inputs dir")


def run_stage(inputs: Path, tmp_path: Path, stage: str, **settings) -> tuple[subprocess.CompletedProcess, Path]:
    config = json.loads(json.dumps(TINY))
    config["datasets"]["sft"] = {"path": str(inputs / "sft"), "test_split": None}
    config["datasets"]["preference"] = {"path": str(inputs / "preference"), "test_split": None}
    config[stage].update(settings)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    output = tmp_path / "results" / stage
    result = adpa(
        stage,
        "--configfile",
        str(path),
        "--model",
        str(inputs / "base_teacher"),
        "--output",
        str(output),
        "--work-dir",
        str(tmp_path / "work"),
        "--threads",
        "1",
    )
    return result, output


@pytest.mark.parametrize(
    "stage, settings",
    [
        ("ref_teacher", {"max_length": 12, "packing": True, "completion_only_loss": True}),  # trained at loss 0 before
        ("ref_teacher", {"max_length": 12, "packing": False, "completion_only_loss": True}),
        ("dpo_teacher", {"max_length": 12}),
    ],
    ids=["sft-packed", "sft", "dpo"],
)
def test_max_length_shorter_than_every_prompt_is_one_line_and_publishes_nothing(inputs, tmp_path, stage, settings):
    result, output = run_stage(inputs, tmp_path, stage, **settings)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert errors[0].startswith(
        f"error: {stage}: none of the 32 training rows keeps a loss token within {stage}.max_length = 12"
    )
    assert errors[0].endswith(f"tokens; raise {stage}.max_length") and "the shortest prompt has " in errors[0]
    assert not output.exists() and "'loss'" not in result.stderr, "no step ran"


def test_a_distillation_stage_names_the_row_and_its_key(inputs, tmp_path):
    """Distillation rows align with the stores row by row: any prompt that fills max_length is the error."""
    result, output = run_stage(inputs, tmp_path, "chosen_sft", max_length=12)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and not output.exists()
    assert errors[0].startswith("error: chosen_sft: chosen row 0: prompt has ")
    assert errors[0].endswith("tokens, chosen_sft.max_length is 12; no response token would be left")


def test_rows_too_long_are_left_out_with_a_warning_and_counted(inputs, tmp_path):
    result, output = run_stage(
        inputs, tmp_path, "ref_teacher", max_length=40, packing=False, completion_only_loss=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    warning = next(line for line in result.stderr.splitlines() if "keep no loss token" in line)
    dropped = int(warning.split("ref_teacher: ")[1].split(" of 32")[0])
    assert 0 < dropped < 32 and warning.endswith("within ref_teacher.max_length = 40 and are left out")
    metrics = json.loads((output / "adpa_manifest.json").read_text())["metrics"]
    assert metrics["rows_without_loss_tokens"] == dropped and metrics["train_rows"] == 32 - dropped
