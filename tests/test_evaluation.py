"""The evaluation's judging, win rates and results table, without models."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from adpa.core.errors import InputError
from adpa.infer import evaluate
from adpa.infer.evaluate import judge
from adpa.infer.judges import check_judge_inputs, read_records
from adpa.report.summary import markdown, model_intervals, paired_differences, split_model, win_rate, write_summary


def row(family, answer, prompt="What is 2 + 3? Answer with the number only."):
    return {"prompt": [{"role": "user", "content": prompt}], "family": family, "answer": answer}


def test_judge_accepts_equivalent_forms_and_rejects_wrong_answers():
    rows = [row("addition", "5"), row("addition", "5"), row("addition", "5"), row("uppercase_word", "DOG")]
    responses = ["The answer is 5.", "6", "", "dog"]
    assert judge(rows, responses) == [True, False, False, False]


def test_judge_returns_none_for_rows_without_a_task_family():
    assert judge([{"prompt": [{"role": "user", "content": "hi"}], "family": None, "answer": None}], ["hello"]) == [
        None
    ]


def test_win_rate_counts_wins_and_half_ties():
    model = [True, True, False, False]
    baseline = [False, True, False, True]
    # one win, one loss, two ties
    assert win_rate(model, baseline) == pytest.approx(0.5)
    assert win_rate([True, True], [False, False]) == 1.0
    assert win_rate([False], [True]) == 0.0
    assert win_rate([None], [True]) is None
    with pytest.raises(ValueError):
        win_rate([True], [True, False])


def test_split_model():
    assert split_model("seed7/adpa_plus") == ("adpa_plus", 7)
    assert split_model("dpo_teacher") == ("dpo_teacher", None)


def test_answer_records_carry_each_rows_log_probs(monkeypatch):
    rows = [row("addition", "5"), {"prompt": [{"role": "user", "content": "hi"}], "family": None, "answer": None}]
    scores = (
        ["5", "hello"],
        torch.tensor([-2.0, -9.0]),
        torch.tensor([2.0, 3.0]),
        torch.tensor([-4.0, -6.0]),
        torch.tensor([4.0, 2.0]),
    )
    monkeypatch.setattr(evaluate, "score_and_answer", lambda *args: scores)
    metrics, records = evaluate.evaluate_model(None, None, rows, max_new_tokens=4, batch_size=2)
    assert metrics["preference_accuracy"] == 0.5 and metrics["margin"] == pytest.approx(-0.5)
    assert [r["correct"] for r in records] == [True, None]
    fields = ("chosen_logprob", "rejected_logprob", "chosen_tokens", "rejected_tokens")
    assert [tuple(r[field] for field in fields) for r in records] == [(-2.0, -4.0, 2, 4), (-9.0, -6.0, 3, 2)]
    assert all(isinstance(r["chosen_tokens"], int) for r in records)
    json.dumps(records)


def test_markdown_shows_the_table_mean_where_answers_lack_per_row_values():
    """Answer records from before the log-prob fields: the metrics.json values, without an interval."""
    table = pd.DataFrame(
        [
            {
                "model": "dpo_teacher",
                "rows": 4,
                "accuracy": 0.5,
                "win_rate_vs_student_sft": 0.6,
                "preference_accuracy": 0.9,
                "preference_accuracy_per_token": 0.8,
                "margin": 1.0,
                "margin_per_token": 0.1,
            },
            {
                "model": "adpa",
                "rows": 4,
                "accuracy": 0.2,
                "win_rate_vs_student_sft": 0.5,
                "preference_accuracy": 0.7,
                "preference_accuracy_per_token": 0.6,
                "margin": -0.5,
                "margin_per_token": -0.05,
            },
            {
                "model": "adpa",
                "rows": 4,
                "accuracy": 0.4,
                "win_rate_vs_student_sft": 0.7,
                "preference_accuracy": 0.9,
                "preference_accuracy_per_token": 0.8,
                "margin": 0.5,
                "margin_per_token": 0.05,
            },
        ]
    )
    intervals = model_intervals(table, {})
    assert list(intervals.index) == ["dpo_teacher", "adpa"]
    assert intervals.loc["adpa", "accuracy"] == pytest.approx(0.3) and intervals.loc["adpa", "seeds"] == 2
    text = markdown(intervals, paired_differences({}), "demo", [1, 2])
    assert "seeds 1, 2 (2 runs)" in text and "Paired differences" not in text
    adpa_line = next(line for line in text.splitlines() if line.startswith("| adpa "))
    assert adpa_line == "| adpa | 2 | 4 | 0.300 | 0.600 | 0.800 | 0.700 | +0.000 | +0.000 |"


def _write_eval(results: Path, model: str, verdicts: list[bool], accuracy: float) -> None:
    folder = results / "eval" / model
    folder.mkdir(parents=True)
    metrics = {
        "model": model,
        "rows": len(verdicts),
        "accuracy": accuracy,
        "preference_accuracy": 0.5,
        "preference_accuracy_per_token": 0.5,
        "margin": 0.0,
        "margin_per_token": 0.0,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "answers.jsonl").write_text(
        "".join(json.dumps({"row": i, "correct": v}) + "\n" for i, v in enumerate(verdicts))
    )


def test_summary_holds_every_model_with_config_and_seed(tmp_path):
    results = tmp_path / "results"
    models = ["dpo_teacher", "seed1/student_sft", "seed1/adpa", "seed2/student_sft", "seed2/adpa"]
    _write_eval(results, "dpo_teacher", [True, True], 1.0)
    _write_eval(results, "seed1/student_sft", [False, True], 0.5)
    _write_eval(results, "seed1/adpa", [True, True], 1.0)
    _write_eval(results, "seed2/student_sft", [True, True], 1.0)
    _write_eval(results, "seed2/adpa", [False, True], 0.5)
    (results / "seed1" / "adpa").mkdir(parents=True)
    (results / "seed1" / "adpa" / "adpa_manifest.json").write_text(
        json.dumps(
            {"metrics": {"train_loss_first": 2.0, "train_loss_last": 1.0}, "loss_history": [[1, 2.0], [2, 1.0]]}
        )
    )
    outputs = [tmp_path / name for name in ("summary.csv", "summary.md", "plots/metrics.svg", "plots/loss.svg")]
    text = write_summary(results, models, "demo", 42, [1, 2], *outputs)
    table = pd.read_csv(outputs[0])
    assert list(table["model"]) == ["dpo_teacher", "student_sft", "adpa", "student_sft", "adpa"]
    assert list(table["seed"]) == [42, 1, 1, 2, 2] and set(table["config"]) == {"demo"}
    # seed 1: adpa wins row 0, ties row 1 -> 0.75; seed 2: loses row 0, ties row 1 -> 0.25
    adpa = table[table["model"] == "adpa"]
    assert list(adpa["win_rate_vs_student_sft"]) == [0.75, 0.25]
    # the teacher against both seeds' student_sft: 0.75 and 0.5
    assert table.loc[0, "win_rate_vs_student_sft"] == pytest.approx(0.625)
    assert table.loc[1, "train_loss_last"] != table.loc[1, "train_loss_last"]  # NaN: no manifest
    assert table.loc[2, "train_loss_last"] == 1.0
    # accuracy and win rate from the per-row verdicts, with intervals; the rest from metrics.json, without
    # (the worst resample: seed 2 twice, on row 0 twice)
    assert "| adpa | 2 | 2 | 0.750 [0.000, 1.000] | 0.500 [0.000, 1.000] | 0.500 | 0.500 | +0.000 | +0.000 |" in text
    assert "| dpo_teacher | 1 | 2 | 1.000 [1.000, 1.000] | 0.625 [0.500, 1.000] |" in text
    paired = "| adpa − student_sft | 2 | 2 | +0.000 [-1.000, +1.000] | +0.000 [-0.500, +0.500] | - | - | - | - |"
    assert paired in text
    for plot in outputs[2:]:
        assert plot.read_text().lstrip().startswith("<?xml")


def test_judge_input_files_are_checked_row_by_row(tmp_path):
    good = tmp_path / "questions.jsonl"
    good.write_text('{"question_id": 1, "turns": ["a", "b"]}\n\n{"question_id": 2, "turns": ["c"]}\n')
    assert [r["question_id"] for r in read_records(str(good), ("question_id", "turns"))] == [1, 2]
    listed = tmp_path / "alpaca.json"
    listed.write_text(json.dumps([{"instruction": "x", "dataset": "d"}]))
    assert read_records(str(listed), ("instruction",))[0]["dataset"] == "d"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x"}, {"prompt": "y"}]))
    with pytest.raises(InputError, match=r"bad.json' row 1: missing 'instruction'"):
        read_records(str(bad), ("instruction",))
    with pytest.raises(InputError, match="no such|No such"):
        read_records(str(tmp_path / "missing.json"), ("instruction",))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"turns": [}\n')
    with pytest.raises(InputError, match="not JSON or JSONL"):
        read_records(str(broken), ("turns",))
    check_judge_inputs({"evaluation": {"alpaca_eval": str(listed), "mt_bench": str(good)}})
    with pytest.raises(InputError, match=r"question.jsonl' row 0: missing 'question_id'"):
        (tmp_path / "question.jsonl").write_text('{"turns": ["a"]}\n')
        check_judge_inputs({"evaluation": {"alpaca_eval": None, "mt_bench": str(tmp_path / "question.jsonl")}})
