"""Experiment trackers (config launch.report_to) on a real training stage: W&B offline and MLflow's
local store hold the stage's loss history, its run named after the stage and grouped by run_name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, copy_tiny_inputs

from adpa.core.errors import ConfigError


def wandb_records(path: Path):
    """The records of a W&B run file (.wandb): a header, then LevelDB-log blocks of protobuf records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    offset, block, pending = 7, 32768, b""
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a record header is padding
            offset += block - offset % block
            continue
        length, kind = int.from_bytes(data[offset + 4 : offset + 6], "little"), data[offset + 6]
        payload = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        pending = payload if kind in (1, 2) else pending + payload  # full, first / middle, last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_and_mlflow_hold_the_stages_loss_history(tmp_path, ref_teacher_project):
    pytest.importorskip("wandb", reason="the test extra installs wandb")
    pytest.importorskip("mlflow", reason="the test extra installs mlflow-skinny")
    inputs = copy_tiny_inputs(ref_teacher_project, tmp_path / "inputs")
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["datasets"]["sft"] = {"path": str(inputs / "sft"), "test_split": None}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    output = tmp_path / "results" / "ref_teacher"
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow's local file store (a server or sqlite needs more packages)
    }
    for variable in ("WANDB_PROJECT", "WANDB_RUN_GROUP", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(variable, None)
    stage = [sys.executable, "-m", "adpa", "ref_teacher", "--configfile", str(tmp_path / "config.yaml")]
    stage += ["--model", str(inputs / "base_teacher"), "--output", str(output), "--work-dir", str(tmp_path / "work")]
    stage += ["--threads", "1", "--report-to", "tensorboard", "wandb", "mlflow", "--run-name", "tracked run"]
    result = subprocess.run(stage, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    history = [(step, loss) for step, loss in json.loads((output / "adpa_manifest.json").read_text())["loss_history"]]
    assert history and (output / "runs").is_dir(), "TensorBoard too, copied into the model folder"

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    logged, names = [], None
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            names = (record.run.project, record.run.run_group, record.run.display_name)
        elif kind == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
            }
            if "train/loss" in items:
                logged.append((items["train/global_step"], items["train/loss"]))
    assert names == ("tracked run", "tracked run", "ref_teacher")
    assert_same_history(logged, history)

    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tracked run")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "ref_teacher"
    losses = [(metric.step, metric.value) for metric in client.get_metric_history(run.info.run_id, "loss")]
    assert_same_history(sorted(losses), history)


def assert_same_history(logged: list, history: list) -> None:
    """The same steps, and the same losses up to float rounding (pytest.approx takes no nested lists)."""
    assert [step for step, _ in logged] == [step for step, _ in history]
    assert [loss for _, loss in logged] == pytest.approx([loss for _, loss in history])


def test_a_tracker_that_is_not_installed_is_one_line_before_any_job(monkeypatch):
    import importlib.util

    from adpa.workflow import preflight

    config = {"launch": {"report_to": ["tensorboard", "trackio"]}}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "trackio" else real(name))
    with pytest.raises(ConfigError, match=r"^config key 'launch.report_to': trackio is not installed \(pip install"):
        preflight.check_trackers(config)
    preflight.check_trackers({"launch": {"report_to": []}})  # no tracker: nothing to check


def test_no_tracker_is_none_and_runs_are_named_after_the_output(tmp_path, monkeypatch):
    from adpa.training.train import LaunchOptions, StageRun, tracker_arguments

    environment = {key: value for key, value in os.environ.items() if key != "WANDB_PROJECT"}
    monkeypatch.setattr(os, "environ", environment)  # the stage sets the trackers' defaults in its own

    launch = LaunchOptions(1, 1, 1, 1, report_to=(), run_name="sweep run")
    run = StageRun("adpa", {}, "{}", "code", Path("results/sweeps/lam/adpa_weight~0.0/seed0/adpa"), tmp_path, launch)
    arguments = tracker_arguments(run)
    assert arguments == {
        "report_to": "none",
        "run_name": "sweeps/lam/adpa_weight~0.0/seed0/adpa",
        "project": "sweep run",
    }
