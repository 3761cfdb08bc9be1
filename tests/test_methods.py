"""adpa/dag/methods.py: each student method is one entry, and every piece that derives from it is there."""

from __future__ import annotations

from pathlib import Path

import pytest

from adpa.core.errors import ConfigError
from adpa.dag.methods import BASELINE, CONTROL, METHOD_ENTRIES, Comparison, Method
from adpa.dag.objectives import sequences_of, store_kind, weights_of
from adpa.workflow.config import load_config, load_schema, stage_params

ROOT = Path(__file__).resolve().parent.parent


def readme_row(method: Method) -> str:
    return f"| `{method.name}` | `results/seed<N>/{method.name}` | {method.docs} |"


def missing_pieces(method: Method, readme: str, schema: dict) -> list[str]:
    """What a method lacks of the pieces derived from its entry (empty: none)."""
    from adpa.dag.stages import STAGES
    from adpa.report import model_card, summary

    properties = schema["properties"]
    missing = []
    if readme_row(method) not in readme.splitlines():
        missing.append(f"README.md's stage table row: {readme_row(method)}")
    section = properties.get(method.settings_section, {}).get("properties")
    if section is None:
        missing.append(f"schema section '{method.settings_section}'")
    elif method.terms is not None:
        missing += [
            f"schema key {method.settings_section}.{key}" for key in weights_of(method.terms) if key not in section
        ]
    if method.name not in properties["methods"]["items"].get("enum", []):
        missing.append("the `methods` enum")
    if method.name not in properties["resources"]["properties"]:
        missing.append(f"resources.{method.name}")
    if (method.name, BASELINE) not in summary.COMPARISONS:
        missing.append(f"the summary's {method.name} - {BASELINE}")
    if method.distillation and (method.name, CONTROL) not in summary.COMPARISONS:
        missing.append(f"the summary's {method.name} - {CONTROL}")
    if not model_card.STAGE_TAGS.get(method.name):
        missing.append("its model card's tags")
    if method.name not in STAGES or not STAGES[method.name].method:
        missing.append("its stage (adpa/dag/stages.py)")
    return missing


@pytest.mark.parametrize("method", METHOD_ENTRIES, ids=[method.name for method in METHOD_ENTRIES])
def test_every_method_has_every_derived_piece(method):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert missing_pieces(method, readme, load_schema()) == []


def test_a_method_without_its_docs_row_or_settings_is_caught():
    """The check above fails for an entry that lacks derived pieces (it is not vacuous)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    schema = load_schema()
    unlisted = Method("unlisted_kd", "baseline", "help", "not in the README", ("kd",))
    missing = missing_pieces(unlisted, readme, schema)
    assert any("README" in piece for piece in missing) and any("schema section" in piece for piece in missing)
    assert any("summary" in piece for piece in missing) and any("stage" in piece for piece in missing)


def test_entries_are_consistent():
    names = [method.name for method in METHOD_ENTRIES]
    assert len(names) == len(set(names))
    for method in METHOD_ENTRIES:
        assert method.section is None or method.section in names, method.name
        for comparison in method.comparisons:
            assert comparison.baseline in (BASELINE, *names), (method.name, comparison)
        if method.terms is not None:
            assert sequences_of(method.terms)[0] == "chosen", "the collator's row count comes from chosen"
            kinds = {name: store_kind(method.terms, name) for name in sequences_of(method.terms)}
            assert ("advantage" in kinds.values()) == ("advantage" in method.inputs), method.name
            assert ("topk" in kinds.values()) == ("topk" in method.inputs), method.name


def test_a_method_section_comes_from_its_entry_with_training_and_own_defaults():
    config = load_config(ROOT / "config" / "tiny.yaml")
    assert config["simpo"]["gamma"] == 0.5 and config["seq_kd"]["packing"] is False
    assert config["dckd"]["chosen_kl_weight"] == pytest.approx(0.1) or "chosen_kl_weight" in config["dckd"]
    schema = load_schema()
    assert schema["properties"]["vanilla_kd"]["properties"]["epochs"]["default"] == 1
    assert list(schema["properties"]).index("student_dpo") > list(schema["properties"]).index("methods")


def test_a_derived_setting_is_refused_and_follows_its_source():
    with pytest.raises(ConfigError, match=r"vanilla_kd\.max_length': derived from dckd\.max_length"):
        load_config(ROOT / "config" / "tiny.yaml", {"vanilla_kd": {"max_length": 64}})
    config = load_config(ROOT / "config" / "tiny.yaml", {"dckd": {"max_length": 77}})
    for stage in ("vanilla_kd", "dckd"):
        assert stage_params(config, stage)["training"]["max_length"] == 77
    assert stage_params(config, "teacher_topk")["max_length"] == 77


def test_the_loss_is_a_stage_parameter_so_a_changed_term_reruns_its_method_only():
    config = load_config(ROOT / "config" / "tiny.yaml")
    loss = stage_params(config, "adpa")["loss"]
    assert loss == {
        "nll": ["nll", "chosen", "nll_weight", 1.0],
        "own_advantage": ["advantage", "own", "adpa_weight", -1.0],
    }
    assert stage_params(config, "adpa_no_ref")["advantage_reference"] is False
    assert stage_params(config, "adpa")["advantage_reference"] is True
    assert "loss" not in stage_params(config, "student_dpo")


def test_no_distillation_stage_hashes_the_method_registry():
    """Adding a method to adpa/dag/methods.py must not rerun the others: their code hashes exclude it."""
    from adpa.workflow.provenance import stage_sources

    for method in METHOD_ENTRIES:
        names = {path.name for path in stage_sources(method.name)}
        assert "methods.py" not in names and "stages.py" not in names, method.name


def test_comparisons_keep_their_order_and_name_trained_models():
    from adpa.report.summary import COMPARISONS, INGREDIENTS

    names = {method.name for method in METHOD_ENTRIES}
    assert COMPARISONS[0] == ("student_dpo", BASELINE) and COMPARISONS[-1] == ("dpo_teacher", "ref_teacher")
    assert all(model in names | {"dpo_teacher"} for model, _ in COMPARISONS)
    assert [row[0] for row in INGREDIENTS][:2] == ["clean answers", "the advantage on the chosen answers"]
    assert ("the student's own states", "adpa", "adpa_chosen") in INGREDIENTS
    assert Comparison("dckd") in next(m for m in METHOD_ENTRIES if m.name == "adpa").comparisons


@pytest.mark.parametrize("name", ["tiny.yaml", "ablations.yaml", "mistral-7b-deita.yaml", "llama3.1-8b-3.2-1b.yaml"])
def test_the_tiny_dag_the_ablations_and_the_paper_recipes_name_every_method(name):
    from adpa.workflow.config import read_config_file

    listed = read_config_file(ROOT / "config" / name)["methods"]
    assert listed == [method.name for method in METHOD_ENTRIES], f"config/{name}: methods in registry order"


def test_gkd_rows_are_conversations_ending_in_the_answer():
    from adpa.training.gkd import conversations

    prompt = [{"role": "user", "content": "2+2?"}]
    answer = [{"role": "assistant", "content": "4"}]
    assert conversations([prompt], [answer]) == [[*prompt, *answer]]


def test_new_inputs_become_cli_options_naming_their_folder():
    from adpa.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(
        [
            "dpkd",
            "--params",
            "{}",
            "--model",
            "m",
            "--dpo-teacher",
            "t",
            "--generations",
            "g",
            "--own-generations",
            "o",
            "--output",
            "out",
        ]
    )
    assert (args.dpo_teacher, args.own_generations) == ("t", "o")
    with pytest.raises(SystemExit):
        parser.parse_args(["gkd", "--params", "{}", "--model", "m", "--output", "out"])  # --dpo-teacher is required
