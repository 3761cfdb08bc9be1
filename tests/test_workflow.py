"""Real Snakemake runs of config/tiny.yaml: 2-process accelerate launch with DeepSpeed ZeRO-3 on CPU.

The workflow is copied into a folder whose name holds a space, so every path through the shell
is exercised quoted. Tests run in file order: dry-run checks first, real reruns last.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, copy_project, paper_home, planned_jobs, run_snakemake

pytestmark = pytest.mark.workflow
TINY = ("--configfile", "config/tiny.yaml")
MODELS = (
    "base_teacher",
    "ref_teacher",
    "dpo_teacher",
    "base_student",
    "student_sft",
    "student_dpo",
    "dckd",
    "adpa",
    "adpa_plus",
    "simpo",
    "vanilla_kd",
    "seq_kd",
    "chosen_sft",
    "adpa_no_ref",
    "dpkd",
    "gkd",
    "adpa_chosen",
)
BASELINES = ("student_dpo", "simpo", "vanilla_kd", "seq_kd", "dpkd", "gkd")
# The controls (NLL on chosen alone; ADPA's advantage on the chosen answers) and the ablation without the REF teacher.
ATTRIBUTION = ("chosen_sft", "adpa_no_ref", "adpa_chosen")
TRAINED = ("ref_teacher", "dpo_teacher", "student_sft", "dckd", "adpa", "adpa_plus", *BASELINES, *ATTRIBUTION)
EVALUATED = ("base_teacher", *TRAINED)
AFTER_DPO_TEACHER = {
    "teacher_topk",
    "teacher_generations",
    "advantage",
    "dckd",
    "adpa",
    "adpa_plus",
    "vanilla_kd",
    "seq_kd",
    "adpa_no_ref",
    "chosen_advantage",
    "adpa_chosen",
    "dpkd",
    "gkd",
}
PER_SEED = ("student_sft", "student_generations", "advantage", "dckd", "adpa", "adpa_plus", *BASELINES, *ATTRIBUTION)
# Jobs per seed: the advantage stage writes two stores (with and without the REF teacher).
JOBS_PER_SEED = {"advantage": 2}
SEED = 0  # config/tiny.yaml's seed; its students live in results/seed0/


def stage_dir(workdir: Path, stage: str, seed: int = SEED) -> Path:
    return workdir / "results" / (f"seed{seed}/{stage}" if stage in PER_SEED else stage)


def stage_file(workdir: Path, kind: str, stage: str, suffix: str) -> Path:
    """logs/ or benchmarks/ file of a stage."""
    return workdir / kind / (f"seed{SEED}/{stage}{suffix}" if stage in PER_SEED else f"{stage}{suffix}")


def jobs(*stages, seeds: int = 1) -> dict[str, int]:
    """The dry-run job table expected when exactly these stages rerun: each changed model is
    evaluated again, and the summary is rebuilt."""
    table = {stage: JOBS_PER_SEED.get(stage, 1) * seeds if stage in PER_SEED else 1 for stage in stages}
    evaluations = sum(table[stage] for stage in stages if stage in EVALUATED)
    if evaluations:
        table["evaluate"] = evaluations
    return {**table, "summary": 1, "all": 1} if table else {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ref_teacher_project) -> Path:
    workdir = copy_project(ref_teacher_project, tmp_path_factory.mktemp("wf") / "adpa project")
    run_snakemake(workdir, *TINY)
    return workdir


def dry_run(workdir: Path, *args: str) -> dict[str, int]:
    return planned_jobs(run_snakemake(workdir, "-n", *TINY, *args))


def test_teachers_are_loadable_models_with_manifests(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for stage in MODELS:
        folder = stage_dir(tiny, stage)
        assert (folder / "model.safetensors").is_file()
        assert not list(folder.glob("*.bin")), "no pickles in a published model"
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.chat_template and model.config.vocab_size >= len(tokenizer)
        manifest = json.loads((folder / "adpa_manifest.json").read_text())
        assert manifest["stage"] == stage
        assert len(manifest["config_hash"]) == 16 and len(manifest["code_hash"]) == 16
    for stage in TRAINED:
        manifest = json.loads((stage_dir(tiny, stage) / "adpa_manifest.json").read_text())
        assert manifest["metrics"]["global_step"] >= 2 and manifest["metrics"]["train_loss_last"] > 0
        assert [step for step, _ in manifest["loss_history"]] == sorted({step for step, _ in manifest["loss_history"]})
        assert len(manifest["loss_history"]) == manifest["metrics"]["global_step"]
        # Start-up (bench/stages.py's column): imports and loading take seconds, not none or minutes.
        assert 1 < manifest["metrics"]["seconds_before_first_step"] < 300
        # The Trainer saves a resume point at the last step; its time is told apart from the loop's.
        assert 0 < manifest["metrics"]["checkpoint_seconds"] < manifest["metrics"]["train_seconds"]
    bench = subprocess.run(
        [sys.executable, str(REPO / "bench" / "stages.py"), "--workdir", str(tiny)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "| job | wall s | train s | of which checkpoint saves s | s before first step | max RSS MB |" in bench
    assert re.search(r"^\| ref_teacher \| \d+ \| \d+ \| \d+ \| \d+ \| \d+ \|$", bench, flags=re.M), bench
    assert not list((tiny / "results").glob("**/.*partial")), "no staging folders left behind"


def test_preflight_disk_estimate_covers_what_the_run_leaves(tiny):
    from adpa.workflow import config as adpa_config
    from adpa.workflow.preflight import other_files_bytes, parameter_count, required_disk_bytes

    config = adpa_config.load_config(tiny / "config" / "tiny.yaml")
    bases = {name: str(tiny / "results" / name) for name in ("base_teacher", "base_student")}
    counts = {name: parameter_count(folder) for name, folder in bases.items()}
    estimate = required_disk_bytes(config, counts, {name: other_files_bytes(folder) for name, folder in bases.items()})
    left = sum(path.stat().st_size for path in (tiny / "results").rglob("*") if path.is_file())
    # The estimate (the largest stage's kept checkpoints plus every trained model) covers all the
    # run leaves, the base models, data, stores and evaluations included, without asking for
    # several times that. A checkpoint against its estimate: tests/test_disk_full.py.
    print(f"disk estimate {estimate / 1e6:.1f} MB, the run left {left / 1e6:.1f} MB")
    assert left <= estimate <= 3 * left


def test_every_training_stage_publishes_tensorboard_curves(tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage in TRAINED:
        events = list((stage_dir(tiny, stage) / "runs").rglob("events.out.tfevents.*"))
        assert events, stage
        accumulator = EventAccumulator(str(events[0].parent))
        accumulator.Reload()
        tags = set(accumulator.Tags()["scalars"])
        assert {"train/loss", "train/learning_rate"} <= tags, (stage, tags)
        assert len(accumulator.Scalars("train/loss")) >= 2
        if stage in ("dpo_teacher", "student_dpo"):
            assert "train/rewards/margins" in tags, tags


def test_training_went_through_two_deepspeed_zero3_processes(tiny):
    for stage in TRAINED:
        metrics = json.loads((stage_dir(tiny, stage) / "adpa_manifest.json").read_text())["metrics"]
        # tiny: effective batch 8 = 2 per device x 2 processes x 2 accumulation steps
        assert metrics["processes"] == 2 and metrics["distributed_type"] == "DEEPSPEED"
        assert metrics["zero_stage"] == 3 and metrics["gradient_accumulation_steps"] == 2
        assert f"{stage}: launch" in stage_file(tiny, "logs", stage, ".log").read_text()
        assert stage_file(tiny, "benchmarks", stage, ".tsv").is_file()


def test_second_dry_run_has_nothing_to_do(tiny):
    result = run_snakemake(tiny, "-n", *TINY)
    assert planned_jobs(result) == {}
    assert "Nothing to be done" in result.stdout + result.stderr


def test_dpo_beta_change_reruns_dpo_teacher_and_what_reads_it(tiny):
    assert dry_run(tiny, "--config", "dpo_teacher={beta: 0.25}") == jobs("dpo_teacher", *AFTER_DPO_TEACHER)


def test_sft_learning_rate_change_reruns_both_teachers_not_the_student_sft(tiny):
    expected = jobs("ref_teacher", "dpo_teacher", *AFTER_DPO_TEACHER)
    assert dry_run(tiny, "--config", "ref_teacher={learning_rate: 0.002}") == expected


def test_dckd_weights_rerun_dckd_and_adpa_plus_only(tiny):
    assert dry_run(tiny, "--config", "dckd={chosen_kl_weight: 0.3}") == jobs("dckd", "adpa_plus")


def test_adpa_lambda_reruns_the_adpa_stages_only(tiny):
    assert dry_run(tiny, "--config", "adpa={adpa_weight: 1.0}") == jobs(
        "adpa", "adpa_plus", "adpa_no_ref", "adpa_chosen"
    )


def test_control_settings_rerun_the_control_only(tiny):
    assert dry_run(tiny, "--config", "chosen_sft={learning_rate: 0.002}") == jobs("chosen_sft")


@pytest.mark.parametrize(
    "change,stages",
    [
        ("vanilla_kd={kl_weight: 0.5}", ("vanilla_kd",)),
        ("seq_kd={learning_rate: 0.002}", ("seq_kd",)),
        ("simpo={gamma: 1.0}", ("simpo",)),
        ("teacher_generations={max_new_tokens: 5}", ("teacher_generations", "seq_kd", "dpkd")),
        ("dpkd={beta: 0.2}", ("dpkd",)),
        ("gkd={lmbda: 1.0}", ("gkd",)),
    ],
)
def test_baseline_settings_rerun_that_baseline_only(tiny, change, stages):
    assert dry_run(tiny, "--config", change) == jobs(*stages)


def test_dropping_a_method_leaves_the_others_untouched(tiny):
    methods = "methods=[student_dpo, dpkd, gkd, chosen_sft, adpa_chosen, vanilla_kd, seq_kd, dckd, adpa, adpa_plus, adpa_no_ref]"
    # simpo's model is no longer in the table: its evaluation goes, the summary is rebuilt.
    assert dry_run(tiny, "--config", methods) == {"summary": 1, "all": 1}


def test_launch_settings_rerun_nothing(tiny):
    launch = "launch={save_steps: 7, logging_steps: 3, inference_batch_size: 3, report_to: [tensorboard, wandb]}"
    assert dry_run(tiny, "--config", launch) == {}
    # The trackers and the run name reach the training command (tests/test_trackers.py runs them).
    printed = run_snakemake(tiny, "-n", "-p", "--forcerun", "adpa", *TINY, "--config", launch)
    assert "--report-to tensorboard wandb --run-name tiny " in printed.stdout, printed.stdout[-3000:]


def test_evaluation_settings_rerun_the_evaluations_only(tiny):
    assert dry_run(tiny, "--config", "evaluation={max_new_tokens: 9}") == {
        "evaluate": len(EVALUATED),
        "summary": 1,
        "all": 1,
    }


def test_a_second_seed_runs_the_students_again_with_the_same_teachers(tiny):
    expected = jobs(*PER_SEED)
    assert dry_run(tiny, "--config", "seeds=[0, 5]") == expected
    # The first seed is the config's `seed`: listing it explicitly changes nothing.
    assert dry_run(tiny, "--config", "seeds=[0]") == {}


def edit(path: Path, addition: str) -> str:
    original = path.read_text()
    path.write_text(original + addition)
    return original


EVERYTHING_AFTER_SFT = (
    "dpo_teacher",
    "student_dpo",
    "simpo",
    "chosen_sft",
    "student_generations",
    *AFTER_DPO_TEACHER,
)


@pytest.mark.parametrize(
    "module,expected",
    [
        ("dpo.py", jobs("dpo_teacher", "student_dpo", *AFTER_DPO_TEACHER)),
        ("sft.py", jobs("ref_teacher", "student_sft", *EVERYTHING_AFTER_SFT)),
        ("distill.py", jobs("dckd", "adpa", "adpa_plus", "vanilla_kd", "chosen_sft", "adpa_no_ref", "adpa_chosen")),
        ("gkd.py", jobs("gkd")),
        # A new method's entry reruns no other method: only the summary, whose comparisons come from it.
        ("methods.py", {"summary": 1, "all": 1}),
        ("simpo.py", jobs("simpo")),
        ("config.py", {}),  # parse-time code only: no stage runs it
        ("stages.py", {}),
    ],
)
def test_code_edit_reruns_the_stage_that_runs_it(tiny, module, expected):
    (path,) = (tiny / "adpa").rglob(module)  # its place in the layout (adpa/training/sft.py)
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


# The base teacher is a hub id there: no job makes it, but it is evaluated.
PAPER_JOBS = jobs(
    "ref_teacher",
    "dpo_teacher",
    "student_sft",
    "student_dpo",
    "simpo",
    "chosen_sft",
    "student_generations",
    *AFTER_DPO_TEACHER,
) | {"evaluate": len(EVALUATED)}


@pytest.mark.parametrize(
    "recipe,teacher,student",
    [
        ("mistral-7b-deita.yaml", "mistralai/Mistral-7B-v0.1", "h2oai/h2o-danube3-500m-base"),
        ("llama3.1-8b-3.2-1b.yaml", "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.2-1B"),
    ],
)
def test_paper_config_dry_run_with_tilde_and_space(tiny, tmp_path, recipe, teacher, student):
    home = paper_home(tmp_path / "home")
    paper = ("--configfile", f"config/{recipe}")
    result = run_snakemake(
        tiny, "-n", "-p", *paper, "--directory", str(tmp_path / "paper run"), env={"HOME": str(home)}
    )
    assert planned_jobs(result) == PAPER_JOBS
    text = result.stdout
    assert "--num_processes 2" in text and "--mixed_precision bf16" in text
    assert "deepspeed_zero3.yaml" in text and "--gradient-checkpointing" in text
    assert f"--model {teacher}" in text and f"--model {student}" in text and f"--tokenizer {teacher}" in text
    assert "dpo-mix-7k" in text
    missing = run_snakemake(tiny, "-n", *paper, env={"HOME": str(tmp_path / "empty home")}, check=False)
    assert missing.returncode != 0
    assert "error: config key 'datasets.preference.path': no such file or directory:" in missing.stderr


def test_real_rerun_after_dckd_weight_change_touches_nothing_else(tiny):
    mtimes = {stage: (stage_dir(tiny, stage) / "adpa_manifest.json").stat().st_mtime_ns for stage in MODELS}
    old = json.loads((stage_dir(tiny, "dckd") / "adpa_manifest.json").read_text())
    result = run_snakemake(tiny, *TINY, "--config", "dckd={rejected_kl_weight: 0.3}")
    assert planned_jobs(result) == jobs("dckd", "adpa_plus")
    new = json.loads((stage_dir(tiny, "dckd") / "adpa_manifest.json").read_text())
    assert new["params"]["training"]["rejected_kl_weight"] == 0.3 and new["config_hash"] != old["config_hash"]
    for stage, mtime in mtimes.items():
        changed = (stage_dir(tiny, stage) / "adpa_manifest.json").stat().st_mtime_ns != mtime
        assert changed == (stage in ("dckd", "adpa_plus")), stage
    shutil.rmtree(tiny / "work", ignore_errors=True)


def test_prompt_cached_evaluation_matches_plain_forwards_and_generation(tiny):
    import torch
    from reference_losses import sequence_logprobs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adpa.infer.evaluate import evaluate_model, load_test_rows, score_and_answer
    from adpa.infer.generation import greedy_responses
    from adpa.modeling.sequences import pad_exchanges, tokenize_rows

    folder = stage_dir(tiny, "student_sft")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = load_test_rows({"path": str(tiny / "results" / "data" / "preference"), "test_split": "test"})
    assert all(row["family"] and row["answer"] for row in rows)
    prompts = [row["prompt"] for row in rows]

    def plain(column):
        exchanges = tokenize_rows(tokenizer, prompts, [row[column] for row in rows], 4096, column)
        batch = pad_exchanges(exchanges, tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return sequence_logprobs(logits, batch["input_ids"][:, 1:], batch["response_mask"])

    answers, chosen, chosen_tokens, rejected, _ = score_and_answer(model, tokenizer, rows, 6, batch_size=3)
    assert torch.allclose(chosen, plain("chosen"), atol=1e-4) and torch.allclose(
        rejected, plain("rejected"), atol=1e-4
    )
    assert (chosen < 0).all() and (chosen_tokens >= 1).all()
    assert answers == greedy_responses(model, tokenizer, prompts, 6, batch_size=5)
    metrics, records = evaluate_model(model, tokenizer, rows, max_new_tokens=4, batch_size=3)
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["preference_accuracy"] <= 1
    assert len(records) == len(rows) and all(isinstance(record["correct"], bool) for record in records)


def test_every_model_is_evaluated_and_the_summary_holds_them_all(tiny):
    import pandas as pd

    for model in EVALUATED:
        name = f"seed{SEED}/{model}" if model in PER_SEED else model
        folder = tiny / "results" / "eval" / name
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["model"] == name and metrics["rows"] == 8
        answers = (folder / "answers.jsonl").read_text().splitlines()
        assert len(answers) == 8 and (folder / "adpa_manifest.json").is_file()
    table = pd.read_csv(tiny / "results" / "summary.csv")
    students = [
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
    ]
    assert list(table["model"]) == list(EVALUATED[:3]) + students, "registry order"
    assert set(table["config"]) == {"tiny"} and set(table["seed"]) == {SEED}
    assert table[["preference_accuracy", "margin", "win_rate_vs_student_sft"]].notna().all().all()
    assert table.loc[table["model"] == "student_sft", "win_rate_vs_student_sft"].item() == 0.5
    markdown = (tiny / "results" / "summary.md").read_text()
    models_table, paired_table = markdown.split("## Paired differences")
    assert models_table.count("\n| ") == 1 + len(EVALUATED) and "| adpa_plus | 1 |" in models_table
    assert "| adpa_plus − student_sft |" in paired_table and "| dpo_teacher − ref_teacher |" in paired_table
    assert "| simpo − student_sft |" in paired_table and "| seq_kd − student_sft |" in paired_table
    paired = pd.read_csv(tiny / "results" / "summary_paired.csv")
    assert {"model", "baseline", "metric", "difference", "low", "high", "excludes_zero"} <= set(paired.columns)
    assert "| adpa_plus | 1 |" in (tiny / "logs" / "summary.log").read_text(), "the summary prints its table"
    for plot in ("metrics.svg", "training_loss.svg"):
        assert "<svg" in (tiny / "results" / "plots" / plot).read_text()


def test_every_model_folder_carries_a_hub_card_with_its_lineage_and_held_out_metrics(tiny):
    """What `hf upload ORG/NAME FOLDER` publishes: the card parses with huggingface_hub's own class,
    and evaluation (run after training, no retraining) put the held-out metrics in."""
    from huggingface_hub import ModelCard

    for model in ("base_student", *EVALUATED):
        folder = stage_dir(tiny, model)
        card = ModelCard.load(folder / "README.md")
        data = card.data
        assert data.library_name == "transformers" and data.pipeline_tag == "text-generation", model
        assert {"adpa-workflow", model} <= set(data.tags), (model, data.tags)
        assert data.base_model is None, "tiny.yaml's base teacher is random: no Hub model above any of them"
        manifest = json.loads((folder / "adpa_manifest.json").read_text())
        assert manifest["config_hash"] in card.text and manifest["code_hash"] in card.text
        for parent in manifest["parents"].values():  # each parent's folder and hashes
            assert parent["path"] in card.text and parent["config_hash"] in card.text, (model, parent)
        if model == "base_student":
            assert not data.eval_results, "not evaluated"
            continue
        name = f"seed{SEED}/{model}" if model in PER_SEED else model
        metrics = json.loads((tiny / "results" / "eval" / name / "metrics.json").read_text())
        found = {result.metric_type: result.metric_value for result in data.eval_results}
        assert found == {key: round(metrics[key], 4) for key in ("accuracy", "preference_accuracy")}, model
        assert data.eval_results[0].dataset_split == "test" and data.model_name == f"results/{name}"
    adpa = ModelCard.load(stage_dir(tiny, "adpa") / "README.md")
    assert "Teachers: `results/dpo_teacher`, `results/ref_teacher`." in adpa.text  # through the advantage store
    assert {"distillation", "adpa", "trl"} <= set(adpa.data.tags) and "| adpa_weight | 1.6 |" in adpa.text
    assert json.loads((stage_dir(tiny, "adpa") / "adpa_manifest.json").read_text())["parents"]["model"]["stage"] == (
        "student_sft"
    )


def test_report_holds_the_table_and_plots(tiny):
    run_snakemake(tiny, *TINY, "--report", "report.html")
    html = (tiny / "report.html").read_text()
    for item in ("summary.csv", "metrics.svg", "training_loss.svg", "win rate"):
        assert item in html, item


def test_evaluate_stage_writes_judge_inputs_when_configured(tiny, tmp_path):
    import subprocess
    import sys

    import yaml

    config = yaml.safe_load((tiny / "config" / "tiny.yaml").read_text())
    (tmp_path / "judges").mkdir()
    alpaca, questions = tmp_path / "judges" / "alpaca eval.json", tmp_path / "judges" / "question.jsonl"
    alpaca.write_text(json.dumps([{"instruction": "Name a color.", "dataset": "oasst"}]))
    questions.write_text(json.dumps({"question_id": 81, "turns": ["Hi.", "Bye."]}) + "\n")
    config["evaluation"] = {"alpaca_eval": str(alpaca), "mt_bench": str(questions), "answer_max_new_tokens": 4}
    (tmp_path / "judged.yaml").write_text(yaml.safe_dump(config))
    output = tmp_path / "eval out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "adpa",
            "evaluate",
            "--configfile",
            str(tmp_path / "judged.yaml"),
            "--model",
            "results/dpo_teacher",
            "--name",
            "dpo_teacher",
            "--run-name",
            "tiny",
            "--output",
            str(output),
        ],
        cwd=tiny,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = json.loads((output / "alpaca_eval" / "model_outputs.json").read_text())
    assert outputs[0]["generator"] == "tiny-dpo_teacher" and outputs[0]["dataset"] == "oasst"
    answer = json.loads((output / "mt_bench" / "model_answer" / "tiny-dpo_teacher.jsonl").read_text())
    assert answer["question_id"] == 81 and len(answer["choices"][0]["turns"]) == 2
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["alpaca_eval_answers"] == 1 and metrics["mt_bench_answers"] == 1
    assert "evaluate: wrote" in result.stderr, "the metrics end the stage's log"


def test_alpaca_eval_and_mt_bench_answers_in_their_judges_formats(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adpa.infer.evaluate import alpaca_eval_outputs, mt_bench_answers

    folder = tiny / "results" / "dpo_teacher"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    instructions = tmp_path / "alpaca_eval.json"
    instructions.write_text(
        json.dumps([{"instruction": "Name a color.", "dataset": "helpful_base"}, {"instruction": "Say hi."}])
    )
    outputs = alpaca_eval_outputs(model, tokenizer, str(instructions), "tiny-dpo_teacher", 5, batch_size=2)
    assert [set(o) for o in outputs] == [
        {"instruction", "output", "generator", "dataset"},
        {"instruction", "output", "generator"},
    ]
    assert outputs[0]["generator"] == "tiny-dpo_teacher" and outputs[0]["dataset"] == "helpful_base"
    questions = tmp_path / "question.jsonl"
    questions.write_text(
        json.dumps({"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now shorter."]})
        + "\n"
        + json.dumps({"question_id": 82, "category": "math", "turns": ["What is 2+2?"]})
        + "\n"
    )
    answers = mt_bench_answers(model, tokenizer, str(questions), "tiny-dpo_teacher", 5, batch_size=2)
    assert [a["question_id"] for a in answers] == [81, 82]
    assert [len(a["choices"][0]["turns"]) for a in answers] == [2, 1]
    assert {"question_id", "answer_id", "model_id", "choices", "tstamp"} == set(answers[0])
    assert answers[0]["answer_id"] != answers[1]["answer_id"] and answers[0]["model_id"] == "tiny-dpo_teacher"


def test_stored_topk_lines_up_with_the_tokens_the_student_trains_on(tiny, tmp_path):
    """With the student as its own teacher, the stored top-k equal its logits at the trained positions."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adpa.infer.inference import write_teacher_topk
    from adpa.inputs.data import load_preference
    from adpa.modeling.sequences import template_fingerprint, tokenize_rows
    from adpa.training.distill import DistillationCollator, check_store
    from adpa.training.losses import TopKBatch, topk_forward_kl
    from adpa.training.topk_store import TopKStore

    folder = stage_dir(tiny, "student_sft")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pairs = load_preference({"path": str(tiny / "results" / "data" / "preference")}, "train").select(range(6))
    exchanges = tokenize_rows(tokenizer, pairs["prompt"], pairs["chosen"], 128, "chosen")
    assert len({len(e.input_ids) for e in exchanges}) > 1, "rows of different lengths exercise the padding"
    fingerprint = {"template": template_fingerprint(tokenizer)}
    responses = {"chosen": exchanges}
    write_teacher_topk(model, responses, tokenizer.pad_token_id, 8, tmp_path, batch_size=4, metadata=fingerprint)
    store = TopKStore(tmp_path / "chosen")
    check_store(store, tokenizer, exchanges, "self-distillation store")
    features = [
        {
            "row": i,
            "chosen_ids": e.input_ids,
            "chosen_start": e.response_start,
            "rejected_ids": e.input_ids,
            "rejected_start": e.response_start,
        }
        for i, e in enumerate(exchanges)
    ]
    batch = DistillationCollator(tokenizer.pad_token_id, {"chosen": store, "rejected": store})(features)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    positions = batch["logit_positions"]
    logits = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))
    mask = batch["response_mask"]
    assert mask.sum() == 2 * sum(e.response_length for e in exchanges)
    assert torch.equal(batch["labels"][mask], batch["input_ids"].gather(1, positions + 1)[mask])
    logprobs = torch.log_softmax(logits.float(), -1)
    assert torch.equal(batch["topk_ids"][mask][:, 0], logprobs.argmax(-1)[mask])
    gathered = logprobs.gather(-1, batch["topk_ids"])[mask]
    assert torch.allclose(gathered, batch["topk_values"][mask], atol=2e-2)
    kl = topk_forward_kl(logits, TopKBatch(batch["topk_ids"], batch["topk_values"], batch["topk_rest"]), mask)
    assert -1e-5 < kl.item() < 1e-3  # zero up to the rounding of the fp16-stored log-probs


def test_advantage_is_signed_and_covers_the_students_own_responses(tiny):
    import datasets as hf_datasets

    from adpa.training.topk_store import TopKStore

    store = TopKStore(stage_dir(tiny, "advantage"))
    generations = hf_datasets.load_from_disk(str(stage_dir(tiny, "student_generations")))
    assert store.kind == "advantage" and len(store) == len(generations) and store.num_tokens > 0
    values = store.values.astype("float32")
    assert (values < 0).any() and (values > 0).any(), "advantages keep their sign (no clamp by default)"
    # adpa_no_ref's store: the same DPO-teacher top-k ids, valued by log pi_dpo alone (no REF teacher).
    without = TopKStore(tiny / "results" / f"seed{SEED}" / "advantage_no_ref")
    assert without.metadata["reference"] is False and store.metadata["reference"] is True
    assert (without.ids == store.ids).all() and (without.lengths == store.lengths).all()
    logprobs = without.values.astype("float32")
    assert (logprobs <= 1e-3).all() and (logprobs < -1e-2).any(), "log-probabilities, not differences"


def test_vocabulary_mismatch_is_refused(tiny, tmp_path):
    from transformers import AutoTokenizer

    from adpa.modeling.models import ModelSourceError, check_same_vocabulary

    teacher = AutoTokenizer.from_pretrained(tiny / "results" / "base_teacher")
    other = AutoTokenizer.from_pretrained(tiny / "results" / "base_student")
    other.add_tokens(["<extra_student_token>"])
    other.save_pretrained(tmp_path / "student")
    (tmp_path / "student" / "config.json").write_text("{}")
    check_same_vocabulary(teacher, str(tiny / "results" / "base_student"))
    with pytest.raises(ModelSourceError, match="teacher and student vocabularies differ"):
        check_same_vocabulary(teacher, str(tmp_path / "student"))


def test_student_cut_keeps_the_listed_teacher_layers(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from adpa.modeling.models import ModelSourceError, cut_student_from_teacher

    teacher_dir = tiny / "results" / "base_teacher"
    cut_student_from_teacher(str(teacher_dir), [1], tmp_path / "student")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 1
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    with pytest.raises(ModelSourceError, match="teacher_layers"):
        cut_student_from_teacher(str(teacher_dir), [0, 1], tmp_path / "too many")


# The state the two-seed run below leaves on disk (dckd's rejected weight: the real rerun's above).
ON_DISK = ("seeds=[0, 5]", "dckd={rejected_kl_weight: 0.3}", "methods=[dckd, adpa]")


def test_two_seeds_share_the_teachers_and_the_table_reports_their_spread(tiny):
    import pandas as pd

    shared = ("ref_teacher", "dpo_teacher", "base_student", "teacher_topk")
    mtimes = {stage: (stage_dir(tiny, stage) / "adpa_manifest.json").stat().st_mtime_ns for stage in shared}
    # The second seed for two methods (every method's run per seed is the first seed's, checked
    # above): dckd reads the shared top-k store, adpa the seed's own advantage. The dckd weight is
    # the real rerun's above, so that seed 0 is up to date.
    result = run_snakemake(tiny, *TINY, "--config", *ON_DISK)
    per_seed = {"student_sft": 1, "student_generations": 1, "advantage": 1, "dckd": 1, "adpa": 1}
    assert planned_jobs(result) == {**per_seed, "evaluate": 3, "summary": 1, "all": 1}
    for stage, mtime in mtimes.items():
        assert (stage_dir(tiny, stage) / "adpa_manifest.json").stat().st_mtime_ns == mtime, stage
    second = json.loads((stage_dir(tiny, "adpa", seed=5) / "adpa_manifest.json").read_text())
    assert second["params"]["seed"] == 5
    table = pd.read_csv(tiny / "results" / "summary.csv")
    assert sorted(table.loc[table["model"] == "adpa", "seed"]) == [0, 5] and len(table) == 3 + 2 * 3
    markdown = (tiny / "results" / "summary.md").read_text()
    assert "seeds 0, 5 (2 runs)" in markdown
    adpa_line = next(line for line in markdown.splitlines() if line.startswith("| adpa |"))
    assert adpa_line.startswith("| adpa | 2 |") and "[" in adpa_line  # mean [95% interval over seeds and rows]
    teacher_line = next(line for line in markdown.splitlines() if line.startswith("| dpo_teacher |"))
    assert teacher_line.startswith("| dpo_teacher | 1 |")


# Sweeps: a per-seed setting (lambda, read by adpa, adpa_plus and adpa_no_ref) and a shared stage's
# (teacher_topk.k).
SWEEPS = "sweeps={lam: {setting: adpa.adpa_weight, values: [0.0]}, k: {setting: teacher_topk.k, values: [4], methods: [dckd]}}"


def test_sweeps_plan_only_what_the_swept_setting_changes(tiny):
    # Two seeds on disk, for dckd and adpa: k's top-k store once (shared by the seeds), then dckd per
    # seed; lambda's points of adpa per seed. Students, generations and advantages are reused.
    assert dry_run(tiny, "--config", *ON_DISK, SWEEPS) == {
        "adpa_sweep": 2,
        "teacher_topk_sweep": 1,
        "dckd_sweep": 2,
        "evaluate_sweep": 4,
        "sweep_summary": 2,
        "all": 1,
    }
    # One seed, every method: lambda reaches adpa, adpa_plus, adpa_no_ref and adpa_chosen, and nothing else.
    assert dry_run(tiny, "--config", "dckd={rejected_kl_weight: 0.3}", SWEEPS) == {
        "adpa_sweep": 1,
        "adpa_plus_sweep": 1,
        "adpa_no_ref_sweep": 1,
        "adpa_chosen_sweep": 1,
        "teacher_topk_sweep": 1,
        "dckd_sweep": 1,
        "evaluate_sweep": 5,
        "sweep_summary": 2,
        "summary": 1,  # seed 5 and its two methods leave the table
        "all": 1,
    }


def test_sweep_points_are_trained_evaluated_and_tabulated(tiny):
    import pandas as pd

    # The lambda sweep for adpa alone here: the dry run above covers what it plans for the others.
    # Two top-k points: dckd with the same settings and code on two stores, in one run.
    sweeps = SWEEPS.replace("values: [0.0]}", "values: [0.0], methods: [adpa]}").replace("[4]", "[4, 6]")
    arguments = ("--config", "seeds=[0]", "dckd={rejected_kl_weight: 0.3}", sweeps)
    mtimes = {stage: (stage_dir(tiny, stage) / "adpa_manifest.json").stat().st_mtime_ns for stage in MODELS}
    result = run_snakemake(tiny, *TINY, *arguments)
    assert planned_jobs(result) == {
        "adpa_sweep": 1,
        "teacher_topk_sweep": 2,
        "dckd_sweep": 2,
        "evaluate_sweep": 3,
        "sweep_summary": 2,
        "summary": 1,  # seed 5 leaves the table, the other methods come back
        "all": 1,
    }
    for stage, mtime in mtimes.items():
        assert (stage_dir(tiny, stage) / "adpa_manifest.json").stat().st_mtime_ns == mtime, f"{stage} was reused"
    point = tiny / "results" / "sweeps" / "lam" / "adpa_weight~0.0" / "seed0" / "adpa"
    trained = json.loads((point / "adpa_manifest.json").read_text())
    assert trained["params"]["training"]["adpa_weight"] == 0.0 and trained["metrics"]["global_step"] > 0
    from adpa.training.topk_store import TopKStore

    assert TopKStore(tiny / "results" / "sweeps" / "k" / "k~4" / "teacher_topk" / "chosen").k == 4
    # Each top-k point trained from its own store (a shared work folder republished one as the other).
    for k in (4, 6):
        point = f"results/sweeps/k/k~{k}"
        manifest = json.loads((tiny / point / "seed0" / "dckd" / "adpa_manifest.json").read_text())
        assert manifest["parents"]["topk"]["path"] == f"{point}/teacher_topk"
        assert "republished" not in (tiny / "logs" / "sweeps" / "k" / f"k~{k}" / "seed0" / "dckd.log").read_text()
    table = pd.read_csv(tiny / "results" / "sweeps" / "lam.csv")
    assert list(table["model"]) == ["adpa", "adpa"]
    assert list(table["value"]) == [0.0, 1.6] and list(table["is_baseline"]) == [False, True]
    assert table.loc[~table["is_baseline"], "accuracy_difference"].notna().all()
    assert (tiny / "results" / "sweeps" / "k.svg").read_text().lstrip().startswith("<?xml")
    markdown = (tiny / "results" / "sweeps" / "k.md").read_text()
    assert "teacher_topk.k" in markdown and "8 (config)" in markdown
    run_snakemake(tiny, *TINY, "--report", "sweeps.html", *arguments)
    html = (tiny / "sweeps.html").read_text()
    for item in ("lam.csv", "k.svg", "Sweeps", "paired difference against the config's value"):
        assert item in html, item
    # A new value plans its point alone; the trained point and the main run are reused.
    changed = sweeps.replace("values: [0.0]", "values: [0.0, 2.0]")
    assert dry_run(tiny, *arguments[:-1], changed) == {
        "adpa_sweep": 1,
        "evaluate_sweep": 1,
        "sweep_summary": 1,
        "all": 1,
    }
