"""Preflight: each problem is one line naming the key, file or row, before any job runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, copy_project, copy_workflow, run_snakemake
from test_bad_inputs import MODEL_CONFIG, WEIGHTS, _tokenizer_files

from adpa.core.artifacts import CHECKPOINT_STATE_BYTES
from adpa.core.errors import ConfigError, InputError
from adpa.workflow import config as adpa_config
from adpa.workflow.preflight import check_devices, check_disk, check_models, check_vocabularies, required_disk_bytes

GOOD_ROW = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
PAIR = {
    "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
}


def tiny() -> dict:
    return adpa_config.validate_config(yaml.safe_load((REPO / "config" / "tiny.yaml").read_text()))


def tokenizer_folder(path, extra_token=None):
    """A small real tokenizer saved as a model folder (config.json + tokenizer files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "a": 1, "b": 2, "q": 3}
    if extra_token:
        vocab[extra_token] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(str(path))
    (path / "config.json").write_text("{}")
    return str(path)


def test_missing_local_model_is_named_with_its_key(tmp_path):
    config = tiny()
    config["models"]["base_student"] = {"path": str(tmp_path / "my models" / "student"), "trust_remote_code": False}
    with pytest.raises(ConfigError, match=r"'models.base_student.path': model '.*my models/student': no model folder"):
        check_models(config)


def test_uncached_hub_id_is_refused_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty cache"))
    config = tiny()
    config["models"]["base_student"] = {"path": "someorg/never-downloaded-model", "trust_remote_code": False}
    with pytest.raises(ConfigError, match="hub id 'someorg/never-downloaded-model' is not in the local cache"):
        check_models(config)


def test_teacher_and_student_vocabularies_must_match(tmp_path):
    config = tiny()
    config["models"]["base_teacher"] = {"path": tokenizer_folder(tmp_path / "teacher"), "trust_remote_code": False}
    config["models"]["base_student"] = {"path": tokenizer_folder(tmp_path / "same"), "trust_remote_code": False}
    check_vocabularies(config)
    config["models"]["base_student"]["path"] = tokenizer_folder(tmp_path / "other", extra_token="z")
    with pytest.raises(InputError, match="teacher and student vocabularies differ"):
        check_vocabularies(config)


def test_gpus_requested_by_a_gpu_config_must_exist():
    config = tiny()
    check_devices(config, REPO, available=0)  # CPU accelerate config: no GPU needed
    config["launch"]["accelerate_config"] = "config/accelerate/deepspeed_zero3.yaml"
    check_devices(config, REPO, available=2)
    with pytest.raises(ConfigError, match=r"'launch.num_processes': 2 GPUs requested .*this machine has 1"):
        check_devices(config, REPO, available=1)


def test_disk_estimate_counts_checkpoints_and_final_models(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    config = tiny()
    config["launch"]["save_total_limit"] = 2
    config["seeds"] = [1, 2]
    needed = required_disk_bytes(config, {"base_teacher": 1000, "base_student": 100})
    # 2 teacher checkpoints of 1000 x (12 optimizer + 4 fp32 weights), plus fp32 finals: 2 teachers
    # + 13 student stages (student_sft and tiny.yaml's 12 methods) x 2 seeds
    assert len(config["methods"]) == 12
    assert needed == (1000 * 16 + CHECKPOINT_STATE_BYTES) * 2 + 4 * (2 * 1000 + 13 * 100 * 2)
    # The tokenizer and config files of the base models come with each checkpoint and model.
    assert required_disk_bytes(config, {"base_teacher": 1000, "base_student": 100}, {"base_teacher": 7}) == (
        needed + 7 * (2 + 2)
    )
    # A sweep adds its retrained training stages per point and seed: 2 points x (dckd, adpa_plus).
    config["sweeps"] = {"kl": {"setting": "dckd.chosen_kl_weight", "values": [0.0, 0.5], "methods": ["adpa_plus"]}}
    assert required_disk_bytes(config, {"base_teacher": 1000, "base_student": 100}) == needed + 4 * 100 * 2 * 2 * 2
    config["sweeps"] = {}
    assert required_disk_bytes(config, {}) == 0
    monkeypatch.setattr("adpa.workflow.preflight.parameter_count", lambda reference: 10**12)
    config["models"]["base_teacher"] = {"path": str(tmp_path), "trust_remote_code": False}
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 10**9))
    with pytest.raises(ConfigError, match=r"'work_dir': about .* GB of checkpoints and models to write, 1.0 GB free"):
        check_disk(config, tmp_path)


def test_disk_estimate_counts_the_checkpoints_each_stage_writes(tmp_path, monkeypatch):
    """The Trainer saves every save_steps and at the last step, keeping save_total_limit: a stage of
    fewer steps than save_steps writes one checkpoint, not the limit."""
    import shutil
    from collections import namedtuple

    from adpa.workflow.preflight import TRAINING_RULES, training_steps

    config = tiny()
    config["launch"].update(save_total_limit=2, save_steps=1000)
    bases = {"base_teacher": 1000, "base_student": 100}
    checkpoint = 1000 * 16 + CHECKPOINT_STATE_BYTES
    limit = required_disk_bytes(config, bases)  # steps unknown: the limit, as before
    thirty = dict.fromkeys(TRAINING_RULES, 30)
    assert required_disk_bytes(config, bases, steps=thirty) == limit - checkpoint
    config["launch"]["save_steps"] = 10  # saves at 10, 20, 30: two kept
    assert required_disk_bytes(config, bases, steps=thirty) == limit
    # tiny.yaml's REF teacher: 2 per device x 2 processes x 2 accumulated; ceil(32 / 4) = 8 batches = 4 steps.
    assert training_steps(config, "ref_teacher", 32) == 4 and training_steps(config, "ref_teacher", 1) == 1

    # The case, scaled: the refusal where the estimate is real, none where the steps write fewer.
    config["launch"]["save_steps"] = 1000
    config["models"]["base_teacher"] = {"path": str(tmp_path), "trust_remote_code": False}
    monkeypatch.setattr("adpa.workflow.preflight.parameter_count", lambda reference: 10**9)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 30 * 10**9))
    check_disk(
        config, tmp_path
    )  # generated data: 32 rows, 4 steps, one checkpoint of 16 GB and two teachers of 4 GB: 24 GB
    config["launch"]["save_steps"] = 2
    with pytest.raises(
        ConfigError,
        match=r"'work_dir': about 40.0 GB .* 30.0 GB free .*save_total_limit = 2, launch.save_steps = 2\)",
    ):
        check_disk(config, tmp_path)


def test_check_command_runs_every_check(tmp_path):
    home = tmp_path / "home"
    (home / "Datasets" / "preference alignment" / "dpo-mix-7k").mkdir(parents=True)
    (home / "Datasets" / "preference alignment" / "dpo-mix-7k" / "train.jsonl").write_text(json.dumps(PAIR) + "\n")
    for name, text in (
        ("alpaca_eval/alpaca_eval.json", '[{"instruction": "hi"}]'),
        ("mt_bench/question.jsonl", '{"question_id": 1, "turns": ["hi"]}\n'),
    ):
        (home / "Datasets" / name).parent.mkdir(parents=True)
        (home / "Datasets" / name).write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "adpa", "check", "--configfile", "config/mistral-7b-deita.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].startswith("error: config key 'launch.num_processes': 2 GPUs requested")
    )


@pytest.mark.workflow
def test_workflow_stops_on_a_bad_row_before_any_job(tmp_path):
    workdir = copy_workflow(tmp_path / "preflight project")
    data = tmp_path / "my data"
    data.mkdir()
    rows = [
        GOOD_ROW,
        GOOD_ROW,
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
    ]
    (data / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (data / "pairs.jsonl").write_text(json.dumps(PAIR) + "\n")
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["datasets"] = {
        "sft": {"path": str(data / "sft.jsonl"), "test_split": None},
        "preference": {"path": str(data / "pairs.jsonl"), "test_split": None},
    }
    config.setdefault("evaluation", {})["split"] = "train"  # a single file holds one split
    (workdir / "config" / "bad rows.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(workdir, "--configfile", "config/bad rows.yaml", check=False)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: dataset '{data / 'sft.jsonl'}' split 'train': 1 bad row of 3: row 2 (line 3): no non-empty "
        "assistant turn (drop_bad_rows: true drops them)"
    ]
    assert not (workdir / "results").exists() and not (workdir / "logs").exists(), "no job ran"


@pytest.mark.workflow
def test_tilde_and_spaces_in_dataset_and_work_paths(tmp_path, ref_teacher_project):
    import shutil

    from adpa.inputs.datagen import generate_datasets

    home = tmp_path / "home dir"
    spec = {"seed": 0, "train_rows": 16, "test_rows": 4, "multi_turn_fraction": 0.1, "families": None}
    generate_datasets(spec, home / "data sets" / "sft", home / "data sets" / "preference")
    # The project's base teacher (its tokenizer) is reused; the student to fine-tune is a model
    # folder under ~ with a space: the base teacher, copied.
    workdir = copy_project(ref_teacher_project, tmp_path / "paths project")
    shutil.copytree(workdir / "results" / "base_teacher", home / "my models" / "student")
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["datasets"] = {"sft": {"path": "~/data sets/sft"}, "preference": {"path": "~/data sets/preference"}}
    config["work_dir"] = "~/adpa work"
    config["models"]["base_student"] = {"path": "~/my models/student"}
    (workdir / "config" / "tilde paths.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(
        workdir, "results/seed0/student_sft", "--configfile", "config/tilde paths.yaml", env={"HOME": str(home)}
    )
    assert "student_sft" in result.stderr and "rule base_teacher" not in result.stderr, "the base teacher was reused"
    manifest = json.loads((workdir / "results" / "seed0" / "student_sft" / "adpa_manifest.json").read_text())
    assert manifest["params"]["dataset"]["path"] == "~/data sets/sft" and manifest["metrics"]["global_step"] >= 1
    assert manifest["params"]["base_model"]["path"] == "~/my models/student"
    assert list((home / "adpa work").rglob("student_sft")), "checkpoints went to the expanded ~ work folder"
    assert not (workdir / "~").exists()


def model_folder(path) -> str:
    """A loadable local model folder: a config, one small safetensors file and a tokenizer with a chat template."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama", "vocab_size": 4, "num_hidden_layers": 2}')
    save_file({"weight": torch.zeros(2, 2)}, str(path / "model.safetensors"))
    for name, content in _tokenizer_files("{{ messages }}").items():
        (path / name).write_bytes(content)
    return str(path)


def test_preflight_checks_only_what_the_planned_jobs_read(tmp_path, monkeypatch):
    """The seed guide's `results/dpo_teacher` with a local teacher reads neither the student nor
    the held-out split; the whole DAG does, and an unreachable hub id is one line."""
    from adpa.workflow.preflight import Plan, run_preflight

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    config = tiny()
    config["models"]["base_teacher"] = {"path": model_folder(tmp_path / "teacher"), "trust_remote_code": False}
    config["models"]["base_student"] = {"path": "someorg/not-downloaded-student", "trust_remote_code": False}
    config["datasets"]["preference"]["test_split"] = None
    teachers = Plan.of_jobs([("generate_data", {}), ("ref_teacher", {}), ("dpo_teacher", {})])
    run_preflight(config, REPO, local_jobs=False, plan=teachers)
    with pytest.raises(
        ConfigError,
        match=r"'models.base_student.path': 'someorg/not-downloaded-student' is not a local "
        r"folder .* and the hub cannot be reached .*hf download someorg/not-downloaded-student",
    ):
        run_preflight(config, REPO, local_jobs=False, plan=Plan.of_jobs([("student_sft", {"seed": "0"})]))
    # A sweep point's job reads what its stage reads.
    sweep_point = Plan.of_jobs([("student_sft_sweep", {"seed": "0", "sweep": "lr", "point": "learning_rate~0.1"})])
    assert sweep_point.runs("student_sft")
    with pytest.raises(ConfigError, match=r"'models.base_student.path'"):
        run_preflight(config, REPO, local_jobs=False, plan=sweep_point)
    with pytest.raises(
        ConfigError, match=r"'datasets.preference.test_split': null, but evaluation needs a held-out split"
    ):
        run_preflight(config, REPO, local_jobs=False, plan=Plan.of_jobs([("evaluate", {"model": "dpo_teacher"})]))
    config["datasets"]["preference"]["test_split"] = "test"
    with pytest.raises(ConfigError, match=r"'models.base_student.path'"):
        run_preflight(config, REPO, local_jobs=False)  # `python -m adpa check`: everything


def test_cached_hub_model_passes_offline_and_online(tmp_path, monkeypatch):
    """A hub id whose config is in the local cache needs no network (a cluster node without internet)."""
    from adpa.workflow.preflight import check_models

    snapshot = tmp_path / "cache" / "models--someorg--cached-model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    for name, content in _tokenizer_files("{{ messages }}").items():  # offline, the jobs need the tokenizer too
        (snapshot / name).write_bytes(content)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    config = tiny()
    config["models"]["base_student"] = {"path": "someorg/cached-model", "trust_remote_code": False}
    for offline in ("1", "0"):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        # Libraries read the variable once, at import: set their flag too (a real run sets it before).
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", offline == "1")
        check_models(config)
    config["models"]["base_student"]["revision"] = "b" * 40  # a pinned revision that was never downloaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="hub id 'someorg/cached-model' is not in the local cache"):
        check_models(config)


def test_a_model_folder_that_loads_passes(tmp_path):
    """The loadability check accepts what the jobs accept: a chat template of its own or the config's."""
    from adpa.workflow.preflight import check_models

    for chat_template, own in ((None, "{{ messages }}"), ("{{ messages }}", None)):
        model = tmp_path / f"teacher {own is None}"
        model.mkdir()
        (model / "config.json").write_bytes(MODEL_CONFIG)
        (model / "model.safetensors").write_bytes(WEIGHTS)
        for name, content in _tokenizer_files(own).items():
            (model / name).write_bytes(content)
        config = tiny()
        config["models"]["base_teacher"], config["chat_template"] = {"path": str(model)}, chat_template
        check_models(config)


@pytest.mark.workflow
def test_workflow_preflight_follows_the_targets(tmp_path):
    """An unreachable student hub id does not stop a run whose targets never read it."""
    workdir = copy_workflow(tmp_path / "targets project")
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["models"]["base_student"] = {"path": "someorg/not-downloaded-student"}
    (workdir / "config" / "hub student.yaml").write_text(yaml.safe_dump(config))
    env = {"HF_HUB_CACHE": str(tmp_path / "empty cache"), "HF_HUB_OFFLINE": "1"}
    run_snakemake(workdir, "--cores", "1", "results/base_teacher", "--configfile", "config/hub student.yaml", env=env)
    assert (workdir / "results" / "base_teacher" / "adpa_manifest.json").is_file()
    result = run_snakemake(
        workdir,
        "--cores",
        "1",
        "results/seed0/student_sft",
        "--configfile",
        "config/hub student.yaml",
        env=env,
        check=False,
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert (
        result.returncode != 0
        and len(lines) == 1
        and "'models.base_student.path': hub id 'someorg/not-downloaded-student'" in lines[0]
    )
    assert not (workdir / "logs" / "ref_teacher.log").exists(), "no job ran after the refusal"


def test_prompt_lengths_are_checked_against_each_planned_stage(tmp_path):
    """With a local teacher the preflight counts what each stage will: all rows cut is an error for any stage,
    one row cut is an error where rows align with stores (distillation) and a warning where TRL drops it."""
    from adpa.inputs import data
    from adpa.modeling.models import load_tokenizer
    from adpa.workflow.preflight import Plan, check_prompt_lengths

    teacher = model_folder(tmp_path / "teacher")
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    rows = [
        {
            "prompt": user("short"),
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        {
            "prompt": user("a much longer prompt " * 5),
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
    ]
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tiny()
    config["models"]["base_teacher"] = {"path": teacher, "trust_remote_code": False}
    config["datasets"]["preference"] = {"path": str(tmp_path / "pairs"), "train_split": "train", "test_split": None}
    loaded = {"preference": data.load_preference(config["datasets"]["preference"], "train")}
    tokenizer = load_tokenizer(teacher)
    short, long = (
        len(
            tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        for row in rows
    )
    assert short < long
    dpo = Plan.of_jobs([("dpo_teacher", {})])
    config["dpo_teacher"]["max_length"] = long
    assert check_prompt_lengths(config, dpo, loaded) == [
        f"warning: dpo_teacher: 1 of 2 rows of datasets.preference keep no response token within "
        f"dpo_teacher.max_length = {long} and will be left out"
    ]
    config["dpo_teacher"]["max_length"] = short
    with pytest.raises(
        ConfigError,
        match=rf"'dpo_teacher.max_length': {short} tokens leave no response token in any row "
        rf"of datasets.preference for dpo_teacher \(the shortest prompt has {short} tokens\)",
    ):
        check_prompt_lengths(config, dpo, loaded)
    config["dckd"]["max_length"] = long  # vanilla_kd and the top-k store read dckd's
    with pytest.raises(
        ConfigError,
        match=rf"'dckd.max_length': {long} tokens leave no response token in "
        rf"datasets.preference row 1 for vanilla_kd \(its prompt has {long} tokens; 1 rows like it\)",
    ):
        check_prompt_lengths(config, Plan.of_jobs([("vanilla_kd", {"seed": "0"})]), loaded)
    config["dckd"]["max_length"] = config["dpo_teacher"]["max_length"] = long + 1
    assert check_prompt_lengths(config, Plan.all(), loaded) == [], "nothing cut: nothing said"
