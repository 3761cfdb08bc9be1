from __future__ import annotations

import shutil

from adpa import provenance

from conftest import REPO


def names(stage: str) -> set[str]:
    return {path.name for path in provenance.stage_sources(stage)}


def test_each_stage_hashes_the_modules_it_runs():
    assert {"dpo.py", "train.py", "data.py", "models.py", "config.py", "tasks.py"} <= names("dpo_teacher")
    assert "sft.py" not in names("dpo_teacher")
    assert "dpo.py" not in names("ref_teacher")
    assert "sft.py" in names("ref_teacher")


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
