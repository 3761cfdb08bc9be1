from __future__ import annotations

import shutil

import pytest
from conftest import REPO

from adpa.workflow import provenance


def names(stage: str) -> set[str]:
    """The files a stage's hash covers, as paths inside adpa/ (training/sft.py)."""
    return {path.relative_to(provenance.PACKAGE_DIR).as_posix() for path in provenance.stage_sources(stage)}


def located(modules: set[str]) -> set[str]:
    """Module file names as paths inside adpa/, with the __init__.py of each package on the way."""
    paths = {"__init__.py"}
    for name in modules - {"__init__.py"}:
        (found,) = provenance.PACKAGE_DIR.rglob(name)
        where = found.relative_to(provenance.PACKAGE_DIR)
        paths |= {where.as_posix(), (where.parent / "__init__.py").as_posix()}
    return paths


# Every trained stage runs these: loading (data, models, precision), the trainer's shared code, errors.
TRAINED = {
    "__init__.py",
    "artifacts.py",
    "batching.py",
    "data.py",
    "errors.py",
    "lora.py",  # a LoRA model is merged before it is published (train.py)
    "models.py",
    "paths.py",
    "precision.py",
    "preemption.py",
    "train.py",
}
LOADS_MODELS = {"data.py", "errors.py", "generation.py", "models.py", "paths.py", "precision.py", "sequences.py"}
DISTILLED = TRAINED | {"distill.py", "lm_head.py", "losses.py", "objectives.py", "sequences.py", "topk_store.py"}
# TRL's trainers tokenize for themselves: these stages count the rows left with a loss token.
TRL_TRAINED = TRAINED | {"loss_rows.py"}
# The exact modules each stage's code hash covers: what it executes, nothing more.
MODULES = {
    "generate_data": {"data.py", "datagen.py", "errors.py", "paths.py", "tasks.py"},
    "base_teacher": {"errors.py", "models.py", "paths.py", "precision.py"},
    "base_student": {"errors.py", "models.py", "paths.py", "precision.py"},
    "ref_teacher": TRL_TRAINED | {"sft.py", "lm_head.py"},
    "dpo_teacher": TRL_TRAINED | {"dpo.py", "lm_head.py"},
    "student_sft": TRL_TRAINED | {"sft.py", "lm_head.py"},
    "teacher_topk": LOADS_MODELS | {"inference.py", "lm_head.py", "prompt_cache.py", "topk_store.py"},
    "teacher_generations": LOADS_MODELS,
    "student_generations": LOADS_MODELS,
    "advantage": LOADS_MODELS | {"inference.py", "lm_head.py", "prompt_cache.py", "topk_store.py"},
    "chosen_advantage": LOADS_MODELS | {"inference.py", "lm_head.py", "prompt_cache.py", "topk_store.py"},
    "student_dpo": TRL_TRAINED | {"dpo.py", "lm_head.py"},
    "simpo": TRL_TRAINED | {"simpo.py"},
    "vanilla_kd": DISTILLED,
    "seq_kd": TRL_TRAINED | {"sft.py", "lm_head.py"},
    "dckd": DISTILLED,
    "adpa": DISTILLED,
    "adpa_plus": DISTILLED,
    "chosen_sft": DISTILLED,
    "adpa_no_ref": DISTILLED,
    "adpa_chosen": DISTILLED,
    "dpkd": TRL_TRAINED | {"dpo.py", "lm_head.py"},
    "gkd": TRAINED | {"gkd.py"},
    "evaluate": LOADS_MODELS | {"evaluate.py", "judges.py", "lm_head.py", "prompt_cache.py", "results.py", "tasks.py"},
    # The paired comparisons come from the method registry: a new method reruns the summaries.
    "summary": {"artifacts.py", "methods.py", "objectives.py", "results.py", "stats.py", "summary.py"},
    "sweep_summary": {
        "artifacts.py",
        "errors.py",
        "methods.py",
        "objectives.py",
        "results.py",
        "stats.py",
        "summary.py",
        "sweep_summary.py",
    },
}


def test_no_stage_hashes_the_model_cards():
    """A card is documentation: editing it or adpa/report/model_card.py reruns nothing (adpa/cli.py writes it)."""
    assert all("report/model_card.py" not in names(stage) for stage in provenance.STAGE_MODULES)


def test_each_stage_hashes_exactly_the_modules_it_runs():
    assert set(MODULES) == set(provenance.STAGE_MODULES), "every registered stage has a row here"
    for stage, modules in MODULES.items():
        assert names(stage) == located(modules), stage


def test_edits_outside_a_stages_code_rerun_nothing_of_it(tmp_path):
    """An error message in config.py, the task generator under a recipe whose data is not generated,
    or the stage registry's help text: no trained stage's hash moves."""
    package = tmp_path / "adpa"
    shutil.copytree(REPO / "adpa", package, ignore=shutil.ignore_patterns("__pycache__"))
    before = {stage: provenance.code_hash(stage, package) for stage in provenance.STAGE_MODULES}
    for name, old, new in (
        ("workflow/config.py", "must be a finite number", "must be a finite number (no .nan or .inf)"),
        ("inputs/tasks.py", "from __future__ import annotations", "from __future__ import annotations\nEDITED = True"),
        ("dag/stages.py", "SFT of the base teacher (TRL SFTTrainer)", "SFT of the base teacher"),
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
    dpo = package / "training" / "dpo.py"
    dpo.write_text(dpo.read_text() + "\n# a comment, and blank lines\n\n")
    assert provenance.code_hash("dpo_teacher", package) == before["dpo_teacher"]
    dpo.write_text(dpo.read_text() + "\nUNUSED = 1\n")
    after = {stage: provenance.code_hash(stage, package) for stage in provenance.STAGE_MODULES}
    assert after["dpo_teacher"] != before["dpo_teacher"]
    assert after["ref_teacher"] == before["ref_teacher"]
    assert after["generate_data"] == before["generate_data"]


def test_a_word_list_edit_reruns_exactly_the_stages_that_run_tasks_py(tmp_path):
    """adpa/inputs/tasks.py reads its word lists from adpa/inputs/task_data/ (its `_DATA_FOLDER`): their bytes are part of
    the hash of every stage that runs tasks.py, and of no other."""
    package = tmp_path / "adpa"
    shutil.copytree(REPO / "adpa", package, ignore=shutil.ignore_patterns("__pycache__"))
    runs_tasks = {stage for stage in provenance.STAGE_MODULES if "inputs/tasks.py" in names(stage)}
    assert "generate_data" in runs_tasks
    before = {stage: provenance.code_hash(stage, package) for stage in provenance.STAGE_MODULES}
    words = package / "inputs" / "task_data" / "many_words.txt"
    words.write_text(words.read_text().replace("\nable\n", "\nabel\n", 1))
    after = {stage: provenance.code_hash(stage, package) for stage in provenance.STAGE_MODULES}
    assert {stage for stage in before if after[stage] != before[stage]} == runs_tasks
    # A new file in the folder counts too: the folder is hashed whole.
    (package / "inputs" / "task_data" / "new_family.txt").write_text("word\n")
    assert provenance.code_hash("generate_data", package) != after["generate_data"]


def test_data_files_are_those_of_the_declared_folders():
    data = {
        path.relative_to(provenance.PACKAGE_DIR).as_posix() for path in provenance.stage_data_files("generate_data")
    }
    assert data == {f"inputs/task_data/{path.name}" for path in (REPO / "adpa" / "inputs" / "task_data").iterdir()}
    assert provenance.stage_data_files("summary") == []
    # Every folder in adpa/ that is not a package is some module's declared data folder: none escapes the hash.
    package = REPO / "adpa"
    declared = {
        (path.parent / folder).relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if (folder := provenance._parsed(path)[2]) is not None
    }
    folders = {
        path.relative_to(package).as_posix()
        for path in package.rglob("*")
        if path.is_dir() and path.name != "__pycache__" and not (path / "__init__.py").is_file()
    }
    assert folders == declared


def test_a_data_folder_must_be_named_by_a_string_literal(tmp_path):
    package = tmp_path / "adpa"
    shutil.copytree(REPO / "adpa", package, ignore=shutil.ignore_patterns("__pycache__"))
    tasks = package / "inputs" / "tasks.py"
    tasks.write_text(tasks.read_text().replace('_DATA_FOLDER = "task_data"', '_DATA_FOLDER = "task_" + "data"', 1))
    with pytest.raises(ValueError, match="_DATA_FOLDER must be a string literal"):
        provenance.code_hash("generate_data", package)
