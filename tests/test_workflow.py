"""Real Snakemake runs of config/tiny.yaml: 2-process accelerate launch with DeepSpeed ZeRO-3 on CPU.

The workflow is copied into a folder whose name holds a space, so every path through the shell
is exercised quoted. Tests run in file order: dry-run checks first, real reruns last.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import datasets
import pytest

from conftest import copy_workflow, planned_jobs, run_snakemake

pytestmark = pytest.mark.workflow
TINY = ("--configfile", "config/tiny.yaml")
MODELS = ("base_teacher", "ref_teacher", "dpo_teacher")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    workdir = copy_workflow(tmp_path_factory.mktemp("wf") / "adpa project")
    run_snakemake(workdir, *TINY)
    return workdir


def dry_run(workdir: Path, *args: str) -> dict[str, int]:
    return planned_jobs(run_snakemake(workdir, "-n", *TINY, *args))


def test_teachers_are_loadable_models_with_manifests(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for stage in MODELS:
        folder = tiny / "results" / stage
        assert (folder / "model.safetensors").is_file()
        assert not list(folder.glob("*.bin")), "no pickles in a published model"
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.chat_template and model.config.vocab_size >= len(tokenizer)
        manifest = json.loads((folder / "adpa_manifest.json").read_text())
        assert manifest["stage"] == stage
        assert len(manifest["config_hash"]) == 16 and len(manifest["code_hash"]) == 16
    for stage in ("ref_teacher", "dpo_teacher"):
        metrics = json.loads((tiny / "results" / stage / "adpa_manifest.json").read_text())["metrics"]
        assert metrics["global_step"] >= 2 and metrics["eval_loss"] > 0
    assert not list((tiny / "results").glob(".*partial")), "no staging folders left behind"


def test_training_went_through_two_deepspeed_zero3_processes(tiny):
    for stage in ("ref_teacher", "dpo_teacher"):
        metrics = json.loads((tiny / "results" / stage / "adpa_manifest.json").read_text())["metrics"]
        # tiny: effective batch 8 = 2 per device x 2 processes x 2 accumulation steps
        assert metrics["processes"] == 2 and metrics["distributed_type"] == "DEEPSPEED"
        assert metrics["zero_stage"] == 3 and metrics["gradient_accumulation_steps"] == 2
        assert f"{stage}: launch" in (tiny / "logs" / f"{stage}.log").read_text()
        assert (tiny / "benchmarks" / f"{stage}.tsv").is_file()


def test_second_dry_run_has_nothing_to_do(tiny):
    result = run_snakemake(tiny, "-n", *TINY)
    assert planned_jobs(result) == {}
    assert "Nothing to be done" in result.stdout + result.stderr


def test_dpo_beta_change_reruns_dpo_teacher_only(tiny):
    assert dry_run(tiny, "--config", "dpo_teacher={beta: 0.25}") == {"dpo_teacher": 1, "all": 1}


def test_sft_learning_rate_change_reruns_both_teachers(tiny):
    jobs = dry_run(tiny, "--config", "ref_teacher={learning_rate: 0.002}")
    assert jobs == {"ref_teacher": 1, "dpo_teacher": 1, "all": 1}


def test_launch_settings_rerun_nothing(tiny):
    assert dry_run(tiny, "--config", "launch={save_steps: 7, logging_steps: 3}") == {}


def edit(path: Path, addition: str) -> str:
    original = path.read_text()
    path.write_text(original + addition)
    return original


@pytest.mark.parametrize(
    "module,expected",
    [
        ("dpo.py", {"dpo_teacher": 1, "all": 1}),
        ("sft.py", {"ref_teacher": 1, "dpo_teacher": 1, "all": 1}),
    ],
)
def test_code_edit_reruns_the_stage_that_runs_it(tiny, module, expected):
    path = tiny / "adpa" / module
    original = edit(path, "\n# only a comment: no rerun\n")
    try:
        assert dry_run(tiny) == {}
        path.write_text(original + "\nEDITED = True\n")
        assert dry_run(tiny) == expected
    finally:
        path.write_text(original)


def test_bad_config_fails_in_one_line_before_any_job(tiny):
    result = run_snakemake(tiny, *TINY, "--config", "dpo_teacher={betta: 0.2}", check=False)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert lines == ["error: config key 'dpo_teacher.betta': unknown key; did you mean 'beta'?"]
    result = run_snakemake(tiny, *TINY, "--config", "dpo_teacher={effective_batch_size: 6}", check=False)
    assert result.returncode != 0
    assert "error: config key 'dpo_teacher.effective_batch_size': 6 is not a multiple" in result.stderr


def test_dag_renders_with_graphviz(tiny):
    dot = run_snakemake(tiny, "--dag", *TINY).stdout
    assert "ref_teacher" in dot and "dpo_teacher" in dot
    svg = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, check=True).stdout
    assert svg.lstrip().startswith("<?xml") or "<svg" in svg
    assert "ref_teacher" in run_snakemake(tiny, "--rulegraph", *TINY).stdout


def test_lint_is_clean(tiny):
    result = run_snakemake(tiny, "--lint", *TINY, check=False)
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_paper_config_dry_run_with_tilde_and_space(tiny, tmp_path):
    home = tmp_path / "home"
    dpo_mix = home / "Datasets" / "preference alignment" / "dpo-mix-7k"
    row = {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
    }
    datasets.DatasetDict({"train": datasets.Dataset.from_list([row])}).save_to_disk(str(dpo_mix))
    paper = ("--configfile", "config/mistral-7b-deita.yaml")
    result = run_snakemake(tiny, "-n", "-p", *paper, "--directory", str(tmp_path / "paper run"), env={"HOME": str(home)})
    assert planned_jobs(result) == {"ref_teacher": 1, "dpo_teacher": 1, "all": 1}
    text = result.stdout
    assert "--num_processes 2" in text and "--mixed_precision bf16" in text
    assert "deepspeed_zero3.yaml" in text and "--gradient-checkpointing" in text
    assert "--model mistralai/Mistral-7B-v0.1" in text
    missing = run_snakemake(tiny, "-n", *paper, env={"HOME": str(tmp_path / "empty home")}, check=False)
    assert missing.returncode != 0
    assert "error: config key 'datasets.preference.path': no such file or directory:" in missing.stderr


def test_real_rerun_after_beta_change_keeps_ref_teacher(tiny):
    ref = tiny / "results" / "ref_teacher" / "model.safetensors"
    ref_mtime = ref.stat().st_mtime_ns
    old_dpo = json.loads((tiny / "results" / "dpo_teacher" / "adpa_manifest.json").read_text())
    result = run_snakemake(tiny, *TINY, "--config", "dpo_teacher={beta: 0.25}")
    assert planned_jobs(result) == {"dpo_teacher": 1, "all": 1}
    new_dpo = json.loads((tiny / "results" / "dpo_teacher" / "adpa_manifest.json").read_text())
    assert new_dpo["params"]["training"]["beta"] == 0.25
    assert new_dpo["config_hash"] != old_dpo["config_hash"]
    assert ref.stat().st_mtime_ns == ref_mtime
    shutil.rmtree(tiny / "work", ignore_errors=True)


def test_batched_evaluation_matches_one_row_at_a_time(tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adpa.evaluate import evaluate_model, response_logprobs

    folder = tiny / "results" / "dpo_teacher"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = datasets.load_from_disk(str(tiny / "results" / "data" / "preference"))["test"].to_list()
    prompts = [row["chosen"][:-1] for row in rows]
    responses = [row["chosen"][-1:] for row in rows]
    batched = response_logprobs(model, tokenizer, prompts, responses, batch_size=len(rows))
    single = torch.cat([response_logprobs(model, tokenizer, [p], [r]) for p, r in zip(prompts, responses)])
    assert torch.allclose(batched, single, atol=1e-4)
    assert (batched < 0).all()
    metrics = evaluate_model(model, tokenizer, rows)
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["preference_accuracy"] <= 1
