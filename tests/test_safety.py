"""Safe defaults: no remote code unless configured, safetensors only, every value quoted for the
shell, and a finished model is never replaced by a failing run."""

from __future__ import annotations

import shlex

import pytest
from conftest import REPO, copy_workflow, run_snakemake

from adpa.core import artifacts

REPO_CONFIG = REPO / "config" / "tiny.yaml"


def test_models_load_without_remote_code_and_as_safetensors_only(tmp_path, monkeypatch):
    import transformers

    from adpa.modeling.models import load_model, load_tokenizer

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"")  # never opened: from_pretrained is replaced
    calls = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda path, **kw: calls.append(kw))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda path, **kw: calls.append(kw))
    load_model(str(tmp_path))
    load_tokenizer(str(tmp_path))
    assert calls[0]["use_safetensors"] is True and calls[0]["trust_remote_code"] is False
    assert calls[1]["trust_remote_code"] is False
    load_model(str(tmp_path), trust_remote_code=True)  # only when the config says so
    assert calls[2]["trust_remote_code"] is True


def test_config_values_reach_the_shell_quoted(tmp_path):
    workdir = copy_workflow(tmp_path / "quoting project")
    work = "my work; rm -rf x $HOME `id`"
    result = run_snakemake(workdir, "-n", "-p", "--configfile", "config/tiny.yaml", "--config", f"work_dir={work}")
    commands = [line for line in result.stdout.splitlines() if "python -m adpa" in line]
    train = next(line for line in commands if "ref_teacher --params" in line)
    assert shlex.split(train.split("2>&1")[0])[shlex.split(train.split("2>&1")[0]).index("--work-dir") + 1] == work


def test_run_name_must_be_a_plain_name(tmp_path):
    """It becomes part of file names (judge answers): nothing may point outside results/."""
    workdir = copy_workflow(tmp_path / "run name project")
    for name in ("../../x/y", "a/b", ".hidden", "run's $HOME"):
        result = run_snakemake(
            workdir, "-n", "--configfile", "config/tiny.yaml", "--config", f"run_name={name}", check=False
        )
        assert result.returncode != 0
        assert f"error: config key 'run_name': {name!r} must be a plain name" in result.stderr


def test_a_finished_model_is_never_replaced(tmp_path):
    finished = tmp_path / "results" / "dpo_teacher"
    finished.mkdir(parents=True)
    (finished / "model.safetensors").write_text("trained for days")
    staging = artifacts.fresh_staging_dir(finished)
    (staging / "model.safetensors").write_text("new")
    with pytest.raises(FileExistsError, match="refusing to overwrite finished output"):
        artifacts.publish(staging, finished)
    assert (finished / "model.safetensors").read_text() == "trained for days"


class _Loaded(Exception):
    """Raised by the recording loaders: the test needs the call, not a model."""


def test_a_pinned_revision_reaches_every_load_of_a_hub_model(tmp_path, monkeypatch):
    """Reproducible runs: the config's `revision` of a hub id reaches the student cut, the student's
    tokenizer (the teacher's), the vocabulary check and the base teacher's evaluation."""
    from types import SimpleNamespace

    from adpa.infer import evaluate, generation
    from adpa.inputs.datagen import generate_datasets
    from adpa.modeling import models
    from adpa.training import sft
    from adpa.workflow.config import load_config, stage_params

    generate_datasets(
        {"seed": 0, "train_rows": 4, "test_rows": 2, "multi_turn_fraction": 0.0, "families": None},
        tmp_path / "sft",
        tmp_path / "preference",
    )
    config = load_config(REPO_CONFIG)
    config["models"]["base_teacher"] = {
        "path": "someorg/teacher",
        "revision": "teacher-rev",
        "trust_remote_code": False,
    }
    config["models"]["base_student"] = {
        "path": "someorg/student",
        "revision": "student-rev",
        "trust_remote_code": False,
    }
    config["datasets"]["preference"]["path"] = str(tmp_path / "preference")
    calls: list[tuple[str, str | None]] = []

    def record(reference, *args, **kwargs):
        calls.append((reference, kwargs.get("revision", args[-1] if args else None)))
        raise _Loaded

    for module in (models, generation, sft):
        for name in ("load_model", "load_tokenizer"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, record)
    expected = {
        "base_student cut": (
            lambda: models.cut_student_from_teacher(
                "someorg/teacher",
                1,
                tmp_path / "cut",
                False,
                stage_params(config, "base_student")["teacher"].get("revision"),
            ),
            ("someorg/teacher", "teacher-rev"),
        ),
        "student tokenizer": (
            lambda: sft.run_sft(
                SimpleNamespace(params=stage_params(config, "student_sft")),
                model="someorg/student",
                tokenizer="someorg/teacher",
            ),
            ("someorg/teacher", "teacher-rev"),
        ),
        "base teacher evaluation": (
            lambda: evaluate.run_evaluate(
                stage_params(config, "evaluate"),
                tmp_path,
                model="someorg/teacher",
                name="base_teacher",
                run_name="tiny",
                batch_size=1,
            ),
            ("someorg/teacher", "teacher-rev"),
        ),
        "vocabulary check": (
            lambda: models.check_same_vocabulary(
                None, "someorg/student", False, config["models"]["base_student"]["revision"]
            ),
            ("someorg/student", "student-rev"),
        ),
    }
    for name, (call, wanted) in expected.items():
        calls.clear()
        with pytest.raises(_Loaded):
            call()
        assert calls == [wanted], name
