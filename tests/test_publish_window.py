"""The publish window: a trained model stays reusable until Snakemake has recorded its job."""

from __future__ import annotations

import json

from adpa.core import artifacts


def staged_model(output, stage: str = "dpo_teacher", config_hash: str = "c0ffee", code: str = "abc") -> None:
    staging = artifacts.fresh_staging_dir(output)
    (staging / "model.safetensors").write_bytes(b"weights")
    (staging / "sub").mkdir()
    (staging / "sub" / "events").write_text("log")
    (staging / artifacts.MANIFEST).write_text(
        json.dumps({"stage": stage, "config_hash": config_hash, "code_hash": code})
    )
    return staging


def test_published_model_is_kept_by_hard_links_and_the_checkpoints_go(tmp_path):
    output, work = tmp_path / "results" / "dpo_teacher", tmp_path / "work" / "dpo_teacher" / "c0ffee-abc"
    (work / "checkpoint-4").mkdir(parents=True)
    (work / "checkpoint-4" / "optimizer.pt").write_bytes(b"big")
    staging = staged_model(output)
    artifacts.keep_exported(staging, work)
    artifacts.publish(staging, output)
    artifacts.clear_checkpoints(work)
    assert sorted(path.name for path in work.iterdir()) == [artifacts.EXPORTED]
    exported = work / artifacts.EXPORTED
    for name in ("model.safetensors", "sub/events", artifacts.MANIFEST):
        assert (exported / name).stat().st_ino == (output / name).stat().st_ino, "a hard link: no second copy"


def test_a_killed_job_is_republished_not_retrained(tmp_path):
    output, work = tmp_path / "results" / "dpo_teacher", tmp_path / "work" / "dpo_teacher" / "c0ffee-abc"
    assert not artifacts.republish(work, output), "nothing exported: train"
    staging = staged_model(output)
    artifacts.keep_exported(staging, work)
    artifacts.publish(staging, output)
    published = {path.relative_to(output): path.read_bytes() for path in output.rglob("*") if path.is_file()}
    artifacts.discard(output)  # what Snakemake does to an output it never recorded, before the rerun
    assert artifacts.republish(work, output)
    assert {path.relative_to(output): path.read_bytes() for path in output.rglob("*") if path.is_file()} == published
    assert not artifacts.staging_dir(output).exists()
    # An export cut off before its manifest is not a model.
    (work / artifacts.EXPORTED / artifacts.MANIFEST).unlink()
    artifacts.discard(output)
    assert not artifacts.republish(work, output) and not output.exists()


def test_clean_work_removes_only_what_is_published(tmp_path):
    results, work = tmp_path / "results", tmp_path / "work"
    published, old = artifacts.work_key("c0ffee", "abc", {}), artifacts.work_key("0ld", "abc", {})
    for stage, key in (("dpo_teacher", published), ("dpo_teacher", old), ("adpa", published)):
        (work / stage / key / artifacts.EXPORTED).mkdir(parents=True)
    artifacts.publish(staged_model(results / "dpo_teacher"), results / "dpo_teacher")
    artifacts.publish(staged_model(results / "seed1" / "adpa", "adpa"), results / "seed1" / "adpa")
    removed = artifacts.clean_work(results, work)
    assert sorted(str(path.relative_to(work)) for path in removed) == [f"adpa/{published}", f"dpo_teacher/{published}"]
    assert (work / "dpo_teacher" / old).is_dir(), "a model no output holds is kept (its job may be rerun)"
    assert artifacts.clean_work(results, tmp_path / "no work") == []
