from __future__ import annotations

import shutil

from conftest import REPO

from adpa import provenance


def names(stage: str) -> set[str]:
    return {path.name for path in provenance.stage_sources(stage)}


# Every trained stage runs these: loading (data, models, precision), the trainer's shared code, errors.
TRAINED = {
    "__init__.py",
    "artifacts.py",
    "batching.py",
    "data.py",
    "errors.py",
    "models.py",
    "paths.py",
    "precision.py",
    "train.py",
}
LOADS_MODELS = {"data.py", "errors.py", "generation.py", "models.py", "paths.py", "precision.py", "sequences.py"}
DISTILLED = TRAINED | {"distill.py", "losses.py", "sequences.py", "topk_store.py"}
# The exact modules each stage's code hash covers: what it executes, nothing more.
MODULES = {
    "generate_data": {"data.py", "datagen.py", "errors.py", "paths.py", "tasks.py"},
    "base_teacher": {"errors.py", "models.py", "paths.py", "precision.py"},
    "base_student": {"errors.py", "models.py", "paths.py", "precision.py"},
    "ref_teacher": TRAINED | {"sft.py", "lm_head.py"},
    "dpo_teacher": TRAINED | {"dpo.py", "lm_head.py"},
    "student_sft": TRAINED | {"sft.py", "lm_head.py"},
    "teacher_topk": LOADS_MODELS | {"inference.py", "topk_store.py"},
    "teacher_generations": LOADS_MODELS,
    "student_generations": LOADS_MODELS,
    "advantage": LOADS_MODELS | {"inference.py", "topk_store.py"},
    "student_dpo": TRAINED | {"dpo.py", "lm_head.py"},
    "simpo": TRAINED | {"simpo.py"},
    "vanilla_kd": DISTILLED,
    "seq_kd": TRAINED | {"sft.py", "lm_head.py"},
    "dckd": DISTILLED,
    "adpa": DISTILLED,
    "adpa_plus": DISTILLED,
    "evaluate": LOADS_MODELS | {"evaluate.py", "judges.py", "results.py", "tasks.py"},
    "summary": {"artifacts.py", "results.py", "stats.py", "summary.py"},
}


def test_each_stage_hashes_exactly_the_modules_it_runs():
    assert set(MODULES) == set(provenance.STAGE_MODULES), "every registered stage has a row here"
    for stage, modules in MODULES.items():
        assert names(stage) == modules, stage


def test_edits_outside_a_stages_code_rerun_nothing_of_it(tmp_path):
    """An error message in config.py, the task generator under a recipe whose data is not generated,
    or the stage registry's help text: no trained stage's hash moves."""
    package = tmp_path / "adpa"
    shutil.copytree(REPO / "adpa", package, ignore=shutil.ignore_patterns("__pycache__"))
    before = {stage: provenance.code_hash(stage, package) for stage in provenance.STAGE_MODULES}
    for name, old, new in (
        ("config.py", "must be a finite number", "must be a finite number (no .nan or .inf)"),
        ("tasks.py", "from __future__ import annotations", "from __future__ import annotations\nEDITED = True"),
        ("stages.py", "SFT of the base teacher (TRL SFTTrainer)", "SFT of the base teacher"),
        ("cli.py", "print a free TCP port", "print one free TCP port"),
    ):
        path = package / name
        assert old in path.read_text(), name
        path.write_text(path.read_text().replace(old, new, 1))
    after = {stage: provenance.code_hash(stage, package) for stage in provenance.STAGE_MODULES}
    changed = {stage for stage in before if after[stage] != before[stage]}
    assert changed == {"generate_data", "evaluate"}, "only the stages that run tasks.py"


def test_comments_do_not_change_the_hash_but_code_does(tmp_path):
    package = tmp_path / "adpa"
    shutil.copytree(REPO / "adpa", package, ignore=shutil.ignore_patterns("__pycache__"))
    before = {stage: provenance.code_hash(stage, package) for stage in provenance.STAGE_MODULES}
    dpo = package / "dpo.py"
    dpo.write_text(dpo.read_text() + "\n# a comment, and blank lines\n\n")
    assert provenance.code_hash("dpo_teacher", package) == before["dpo_teacher"]
    dpo.write_text(dpo.read_text() + "\nUNUSED = 1\n")
    after = {stage: provenance.code_hash(stage, package) for stage in provenance.STAGE_MODULES}
    assert after["dpo_teacher"] != before["dpo_teacher"]
    assert after["ref_teacher"] == before["ref_teacher"]
    assert after["generate_data"] == before["generate_data"]
