"""Safe defaults: no remote code unless configured, safetensors only, every value quoted for the
shell, and a finished model is never replaced by a failing run."""

from __future__ import annotations

import shlex

import pytest

from adpa import artifacts
from conftest import copy_workflow, run_snakemake


def test_models_load_without_remote_code_and_as_safetensors_only(tmp_path, monkeypatch):
    import transformers

    from adpa.models import load_model, load_tokenizer

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
        result = run_snakemake(workdir, "-n", "--configfile", "config/tiny.yaml", "--config", f"run_name={name}", check=False)
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
