from __future__ import annotations

import copy
import json

import pytest
import yaml
from conftest import REPO

from adpa.core.errors import ConfigError
from adpa.workflow import config as adpa_config


def load(name: str) -> dict:
    return yaml.safe_load((REPO / "config" / name).read_text())


@pytest.mark.parametrize(
    "name,processes",
    [("config.yaml", 1), ("tiny.yaml", 2), ("mistral-7b-deita.yaml", 2), ("llama3.1-8b-3.2-1b.yaml", 2)],
)
def test_shipped_configs_validate(name, processes):
    config = adpa_config.validate_config(load(name))
    assert config["launch"]["num_processes"] == processes
    assert set(config["dpo_teacher"]) >= {"beta", "learning_rate", "effective_batch_size"}


def test_defaults_are_filled_from_the_schema():
    config = adpa_config.validate_config(load("tiny.yaml"))
    assert config["dpo_teacher"]["loss_type"] == "sigmoid"
    assert config["models"]["base_teacher"]["trust_remote_code"] is False
    assert config["work_dir"] == "work"
    assert config["datasets"]["sft"]["train_split"] == "train"


def test_seed_guide_accumulation_is_derived_as_64():
    config = adpa_config.validate_config(load("mistral-7b-deita.yaml"))
    assert adpa_config.gradient_accumulation_steps(config, "ref_teacher") == 64
    assert adpa_config.gradient_accumulation_steps(config, "dpo_teacher") == 64
    config["launch"]["num_processes"] = 8
    assert adpa_config.gradient_accumulation_steps(config, "ref_teacher") == 16


def test_unknown_key_is_named_with_a_suggestion():
    config = load("tiny.yaml")
    config["dpo_teacher"]["betta"] = 0.1
    with pytest.raises(ConfigError) as error:
        adpa_config.validate_config(config)
    message = str(error.value)
    assert "dpo_teacher.betta" in message and "did you mean 'beta'" in message
    assert "\n" not in message


def test_unknown_top_level_key():
    config = load("tiny.yaml")
    config["ref_teacherr"] = {}
    with pytest.raises(ConfigError, match="'ref_teacherr': unknown key; did you mean 'ref_teacher'"):
        adpa_config.validate_config(config)


@pytest.mark.parametrize(
    "section,key,value",
    [("ref_teacher", "learning_rate", -1.0), ("dpo_teacher", "beta", 0.0), ("ref_teacher", "epochs", "three")],
)
def test_wrong_type_or_range_names_the_key(section, key, value):
    config = load("tiny.yaml")
    config[section][key] = value
    with pytest.raises(ConfigError, match=f"config key '{section}.{key}'"):
        adpa_config.validate_config(config)


def test_effective_batch_that_does_not_divide_is_refused():
    config = load("tiny.yaml")
    config["dpo_teacher"]["effective_batch_size"] = 10  # 2 per device x 2 processes
    with pytest.raises(ConfigError, match=r"'dpo_teacher.effective_batch_size': 10 is not a multiple .* = 4"):
        adpa_config.validate_config(config)


def test_model_needs_exactly_one_source():
    config = load("tiny.yaml")
    config["models"]["base_teacher"]["path"] = "org/model"
    with pytest.raises(ConfigError, match="models.base_teacher.*exactly one of 'path'.*'gguf'"):
        adpa_config.validate_config(config)


def test_override_text_is_read_as_the_schema_type():
    # snakemake --config 'dpo_teacher={beta: 0.2}' delivers "0.2".
    config = load("tiny.yaml")
    config["dpo_teacher"]["beta"] = "0.2"
    config["ref_teacher"]["epochs"] = "2"
    adpa_config.validate_config(config)
    assert config["dpo_teacher"]["beta"] == 0.2 and config["ref_teacher"]["epochs"] == 2


def test_missing_local_dataset_with_tilde_and_space_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = adpa_config.validate_config(load("mistral-7b-deita.yaml"))
    with pytest.raises(ConfigError) as error:
        adpa_config.check_local_sources(config)
    assert str(error.value) == (
        "config key 'datasets.preference.path': no such file or directory: "
        f"{tmp_path}/Datasets/preference alignment/dpo-mix-7k"
    )
    (tmp_path / "Datasets" / "preference alignment" / "dpo-mix-7k").mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"'evaluation.alpaca_eval': no such file or directory: {tmp_path}/Datasets"):
        adpa_config.check_local_sources(config)
    for judge_input in ("alpaca_eval/alpaca_eval.json", "mt_bench/question.jsonl"):
        (tmp_path / "Datasets" / judge_input).parent.mkdir()
        (tmp_path / "Datasets" / judge_input).write_text("")
    adpa_config.check_local_sources(config)  # hub ids are not checked here


def test_stage_params_hold_hyperparameters_not_launch_settings():
    config = adpa_config.validate_config(load("tiny.yaml"))
    before = adpa_config.params_json(adpa_config.stage_params(config, "dpo_teacher"))
    changed = copy.deepcopy(config)
    changed["launch"]["save_steps"] = 999
    changed["ref_teacher"]["learning_rate"] = 0.5
    assert adpa_config.params_json(adpa_config.stage_params(changed, "dpo_teacher")) == before
    changed["dpo_teacher"]["beta"] = 0.3
    after = json.loads(adpa_config.params_json(adpa_config.stage_params(changed, "dpo_teacher")))
    assert after["training"]["beta"] == 0.3


def test_params_json_is_canonical():
    assert adpa_config.params_json({"b": 1, "a": {"d": 2, "c": 3}}) == '{"a":{"c":3,"d":2},"b":1}'


def test_hub_ids_and_paths_are_told_apart(tmp_path):
    assert not adpa_config.is_local("mistralai/Mistral-7B-v0.1")
    assert adpa_config.is_local("~/Models/Mistral-7B-v0.1")
    assert adpa_config.is_local("results/data/sft")
    assert adpa_config.is_local("/abs/path")
    assert adpa_config.is_local("preference alignment/dpo-mix-7k")


def test_config_readme_is_generated_from_the_schema():
    from adpa.workflow.config_docs import render

    documented = (REPO / "config" / "README.md").read_text()
    assert documented == render(), "run: python -m adpa config-docs > config/README.md"
    for key in ("dckd.chosen_kl_weight", "adpa.reference_clamp", "launch.num_processes", "teacher_layers"):
        assert f"`{key}`" in documented


def test_missing_accelerate_config_is_named():
    config = adpa_config.validate_config(load("tiny.yaml"))
    config["launch"]["accelerate_config"] = "config/accelerate/zero3 typo.yaml"
    with pytest.raises(ConfigError, match="'launch.accelerate_config': no such file: .*zero3 typo.yaml"):
        adpa_config.check_local_sources(config, REPO)


def test_student_seeds_change_only_the_student_stages_seed():
    config = adpa_config.validate_config(load("tiny.yaml"))
    assert adpa_config.student_seeds(config) == [config["seed"]]
    config["seeds"] = [3, 4]
    assert adpa_config.stage_params(config, "dckd")["seed"] == 3, "default: the first student seed"
    first, second = (adpa_config.stage_params(config, "adpa", seed) for seed in (3, 4))
    assert first["seed"] == 3 and second["seed"] == 4 and {**first, "seed": 4} == second
    # Teachers keep `seed`, whichever student seed is asked for.
    assert adpa_config.stage_params(config, "dpo_teacher", 4)["seed"] == config["seed"]
    assert adpa_config.evaluated_models(config) == [
        "base_teacher",
        "ref_teacher",
        "dpo_teacher",
        *[
            f"seed{seed}/{m}"
            for seed in (3, 4)
            for m in (
                "student_sft",
                "student_dpo",
                "simpo",
                "dpkd",
                "gkd",
                "chosen_sft",
                "adpa_chosen",
                "vanilla_kd",
                "seq_kd",
                "dckd",
                "adpa",
                "adpa_plus",
                "adpa_no_ref",
            )
        ],
    ]
    assert adpa_config.stage_params(config, "summary")["models"] == adpa_config.evaluated_models(config)


def test_methods_select_the_students_of_the_table():
    config = adpa_config.validate_config(load("config.yaml"))
    students = [model for model in adpa_config.evaluated_models(config) if model.startswith("seed")]
    assert students == [f"seed42/{m}" for m in ("student_sft", "student_dpo", "dckd", "adpa", "adpa_plus")]
    config = adpa_config.validate_config({**load("tiny.yaml"), "methods": ["seq_kd"]})
    assert [model.split("/")[1] for model in adpa_config.evaluated_models(config)[3:]] == ["student_sft", "seq_kd"]
    with pytest.raises(ConfigError, match=r"config key 'methods.0': 'simpoo' is not one of"):
        adpa_config.validate_config({**load("tiny.yaml"), "methods": ["simpoo"]})
    # vanilla_kd reads the top-k store cut at dckd's length: derived, so naming the method is enough.
    with pytest.raises(
        ConfigError, match=r"'vanilla_kd.max_length': derived from dckd.max_length, not set \(got 64\)"
    ):
        adpa_config.validate_config({**load("tiny.yaml"), "vanilla_kd": {"max_length": 64}})
    derived = adpa_config.validate_config(
        {**load("tiny.yaml"), "dckd": {**load("tiny.yaml")["dckd"], "max_length": 96}}
    )
    assert adpa_config.stage_params(derived, "vanilla_kd")["training"]["max_length"] == 96


def test_seeds_given_on_the_command_line_are_read_as_integers():
    config = load("tiny.yaml")
    config["seeds"] = ["42", "1", "2"]  # what snakemake --config 'seeds=[42,1,2]' passes
    assert adpa_config.validate_config(config)["seeds"] == [42, 1, 2]


@pytest.mark.parametrize("seeds", [[], [1, 1], [-1], "7", ["x"]])
def test_bad_seeds_are_refused(seeds):
    config = load("tiny.yaml")
    config["seeds"] = seeds
    with pytest.raises(ConfigError, match="'seeds"):
        adpa_config.validate_config(config)


def test_missing_judge_input_is_named(tmp_path):
    config = adpa_config.validate_config(load("tiny.yaml"))
    config["evaluation"]["mt_bench"] = str(tmp_path / "mt bench" / "question.jsonl")
    with pytest.raises(ConfigError, match="'evaluation.mt_bench': no such file or directory: .*mt bench"):
        adpa_config.check_local_sources(config, REPO)


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        (
            "ref_teacher",
            "learning_rate",
            -1e-5,
            "'ref_teacher.learning_rate': -1e-05 is less than or equal to the minimum of 0",
        ),
        ("teacher_topk", "k", 0, "'teacher_topk.k': 0 is less than the minimum of 1"),
        ("dpo_teacher", "beta", 0, "'dpo_teacher.beta': 0 is less than or equal to the minimum of 0"),
        ("student_dpo", "beta", -0.1, "'student_dpo.beta': -0.1 is less than or equal to the minimum of 0"),
        ("dckd", "per_device_batch_size", "two", "'dckd.per_device_batch_size': 'two' is not of type 'integer'"),
    ],
)
def test_wrong_type_or_range_is_named(section, key, value, message):
    config = load("tiny.yaml")
    config[section][key] = value
    with pytest.raises(ConfigError) as error:
        adpa_config.validate_config(config)
    assert str(error.value) == f"config key {message}"


def test_showcase_overlay_adds_student_seeds_only():
    main = adpa_config.load_config(REPO / "config" / "config.yaml")
    showcase = adpa_config.load_config([REPO / "config" / "config.yaml", REPO / "config" / "showcase.yaml"])
    assert showcase["seeds"] == [42, 1, 2] and main["seeds"] == [42]
    assert {key: value for key, value in showcase.items() if key != "seeds"} == {
        key: value for key, value in main.items() if key != "seeds"
    }
    # The teachers' settings are untouched: the overlay reuses the main job's teachers.
    for stage in ("ref_teacher", "dpo_teacher", "teacher_topk", "base_student"):
        assert adpa_config.stage_params(showcase, stage) == adpa_config.stage_params(main, stage)


def test_noisy_pairs_overlay_changes_the_preference_labels_only():
    """The second data design keeps every training setting of the embedded default (none tuned on held-out rows)."""
    main = adpa_config.load_config(REPO / "config" / "config.yaml")
    noisy = adpa_config.load_config([REPO / "config" / "config.yaml", REPO / "config" / "noisy_pairs.yaml"])
    flips = noisy["datasets"]["generate"].pop("flipped_pair_rates")
    assert set(flips) <= set(main["datasets"]["generate"]["sft_error_rates"]) and all(
        0 < rate < 0.5 for rate in flips.values()
    )
    assert main["datasets"]["generate"]["flipped_pair_rates"] == {}
    assert {"chosen_sft", "adpa"} <= set(noisy["methods"])
    assert {key: value for key, value in noisy.items() if key not in ("methods", "datasets")} == {
        key: value for key, value in main.items() if key not in ("methods", "datasets")
    }
    main["datasets"]["generate"].pop("flipped_pair_rates")
    assert noisy["datasets"] == main["datasets"]
