"""Sweeps (adpa/dag/sweeps.py): which stages a swept setting retrains, where its points live, and its errors."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO

from adpa.core.errors import ConfigError
from adpa.dag.stages import METHODS
from adpa.workflow import config as adpa_config

EVERY_METHOD = list(METHODS)


def tiny(**changes) -> dict:
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config.update(changes)
    return config


def plan_config(**changes) -> dict:
    return adpa_config.validate_config(tiny(**changes))


def plan(sweeps: dict, **changes) -> dict:
    return adpa_config.plan_sweeps(adpa_config.validate_config(tiny(sweeps=sweeps, **changes)))


def test_a_lambda_sweep_retrains_what_reads_lambda_and_reuses_the_rest():
    sweep = plan({"lam": {"setting": "adpa.adpa_weight", "values": [3.0, 0.0, 1.6]}})["lam"]
    # adpa, adpa_plus, adpa_no_ref and adpa_chosen read section adpa; the advantage stores, generations,
    # student_sft and dckd do not change.
    assert sweep.retrained == {"adpa_chosen", "adpa", "adpa_plus", "adpa_no_ref"}
    assert sweep.methods == ("adpa_chosen", "adpa", "adpa_plus", "adpa_no_ref")
    # The config's own value (tiny: the default 1.6) is the main run: no folder of its own.
    assert [(point.value, point.folder) for point in sweep.points] == [
        (0.0, "sweeps/lam/adpa_weight~0.0"),
        (1.6, None),
        (3.0, "sweeps/lam/adpa_weight~3.0"),
    ]
    assert sweep.point("adpa_weight~3.0").value == 3.0 and len(sweep.swept) == 2
    # Each swept point's validated config, by folder: the setting at the point's value, the rest the main one's.
    assert set(sweep.configs) == {"adpa_weight~0.0", "adpa_weight~3.0"}
    assert sweep.configs["adpa_weight~3.0"]["adpa"]["adpa_weight"] == 3.0
    assert sweep.configs["adpa_weight~0.0"]["dckd"] == plan_config()["dckd"]


def test_values_given_as_text_take_the_settings_type():
    """Snakemake's --config hands nested lists over as text."""
    sweep = plan({"lam": {"setting": "adpa.adpa_weight", "values": ["3.0", "0"]}})["lam"]
    assert [point.value for point in sweep.points] == [0, 1.6, 3.0]
    assert [point.folder for point in sweep.swept] == ["sweeps/lam/adpa_weight~0", "sweeps/lam/adpa_weight~3.0"]


def test_a_topk_sweep_reruns_the_store_and_only_what_reads_it():
    sweep = plan({"k": {"setting": "teacher_topk.k", "values": [4, 16]}})["k"]
    # Both the top-k store and the advantage stores keep k tokens per position.
    assert sweep.retrained == {
        "teacher_topk",
        "advantage",
        "chosen_advantage",
        "dckd",
        "vanilla_kd",
        "adpa",
        "adpa_plus",
        "adpa_no_ref",
        "adpa_chosen",
    }
    assert "student_sft" not in sweep.retrained and "student_generations" not in sweep.retrained
    assert [point.folder for point in sweep.points] == ["sweeps/k/k~4", None, "sweeps/k/k~16"]


def test_sweep_methods_limit_the_points_to_what_those_methods_need():
    sweeps = plan(
        {
            "k": {"setting": "teacher_topk.k", "values": [4], "methods": ["dckd"]},
            "kl": {"setting": "dckd.chosen_kl_weight", "values": [0.0], "methods": ["adpa_plus"]},
            "sft": {"setting": "student_sft.learning_rate", "values": [3.0e-4], "methods": ["adpa"]},
        }
    )
    assert sweeps["k"].retrained == {"teacher_topk", "dckd"}
    # ADPA+ starts from DCKD: a DCKD setting retrains both.
    assert sweeps["kl"].retrained == {"dckd", "adpa_plus"}
    # A student_sft setting retrains everything downstream that ADPA reads: its generations and advantage too.
    assert sweeps["sft"].retrained == {"student_sft", "student_generations", "advantage", "adpa"}


def test_sweep_summary_params_name_every_point_and_seed():
    config = adpa_config.validate_config(
        tiny(seeds=[3, 4], sweeps={"lam": {"setting": "adpa.adpa_weight", "values": [0.5], "methods": ["adpa"]}})
    )
    params = adpa_config.sweep_summary_params(config, "lam")
    assert params["points"] == [{"value": 0.5, "folder": "sweeps/lam/adpa_weight~0.5"}, {"value": 1.6, "folder": None}]
    assert params["models"] == ["adpa"] and params["seeds"] == [3, 4] and params["baseline"] == 1.6
    assert adpa_config.stage_params(config, "sweep_summary") == params, "the only sweep by default"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"setting": "ref_teacher.learning_rate", "values": [1.0]},
            r"'sweeps.bad.setting': ref_teacher.learning_rate is not a student-side setting",
        ),
        ({"setting": "adpa.lambda", "values": [1.0]}, r"'sweeps.bad.setting': section 'adpa' has no setting 'lambda'"),
        (
            {"setting": "adpa.adpa_weight", "values": [1.0, -1.0]},
            r"'sweeps.bad.values\[1\]': -1.0: config key 'adpa.adpa_weight': -1.0 is less than the minimum of 0",
        ),
        (
            {"setting": "adpa.adpa_weight", "values": [1.0], "methods": ["dckd"]},
            r"'sweeps.bad.methods': adpa.adpa_weight changes nothing dckd reads",
        ),
        (
            {"setting": "simpo.gamma", "values": [1.0]},
            r"'sweeps.bad.setting': simpo.gamma changes no stage of the configured methods",
        ),
        ({"setting": "adpa.adpa_weight", "values": []}, r"'sweeps.bad.values': \[\] should be non-empty"),
    ],
)
def test_bad_sweeps_fail_in_one_line_naming_the_key(spec, message):
    methods = ["dckd", "adpa"] if spec["setting"] == "simpo.gamma" else EVERY_METHOD
    with pytest.raises(ConfigError, match=message):
        plan({"bad": spec}, methods=methods)


def test_a_sweep_of_only_the_configs_own_value_is_named_not_blamed_on_the_method():
    # A tuning overlay run after its winner went into the config: the sweep point is the main run.
    baseline = plan_config()["adpa"]["adpa_weight"]
    with pytest.raises(
        ConfigError, match=r"'sweeps.bad.values': only the config's own adpa.adpa_weight = .*the main run"
    ):
        plan({"bad": {"setting": "adpa.adpa_weight", "values": [baseline], "methods": ["adpa"]}})
    assert plan({"ok": {"setting": "adpa.adpa_weight", "values": [baseline, baseline + 1], "methods": ["adpa"]}})


def test_a_sweep_method_must_be_in_the_main_run():
    with pytest.raises(ConfigError, match=r"'sweeps.lam.methods': adpa_no_ref is not in `methods`"):
        plan({"lam": {"setting": "adpa.adpa_weight", "values": [1.0], "methods": ["adpa_no_ref"]}}, methods=["adpa"])


def test_ablation_overlay_plans_its_sweeps_on_the_embedded_default():
    config = adpa_config.load_config([REPO / "config" / "config.yaml", REPO / "config" / "ablations.yaml"])
    sweeps = adpa_config.plan_sweeps(config)
    assert sweeps["adpa_weight"].retrained == {"adpa"} and sweeps["adpa_weight"].baseline == 0.5
    assert sweeps["topk"].retrained == {"teacher_topk", "advantage", "dckd", "adpa"}
    assert set(config["methods"]) == set(EVERY_METHOD)
