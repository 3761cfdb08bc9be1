"""Bootstrap intervals (adpa.report.stats) and the results tables with intervals and paired differences."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adpa.report.stats import (
    Interval,
    bootstrap_mean,
    paired_difference,
    preference_scores,
    resample_indices,
    row_metrics,
    seed_mean,
    win_scores,
)
from adpa.report.summary import (
    interval_cell,
    markdown,
    model_intervals,
    paired_differences,
    rows_by_stage,
    write_summary,
)

ROWS = 300


def bernoulli(probability: float, rows: int = ROWS, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(rows) < probability).astype(float)


def test_the_interval_of_a_constant_is_a_point():
    ones = bootstrap_mean(np.ones(ROWS))
    assert (ones.estimate, ones.low, ones.high) == (1.0, 1.0, 1.0)
    constant = bootstrap_mean(np.full((3, ROWS), 0.7))
    assert constant.estimate == pytest.approx(0.7) and constant.high - constant.low == pytest.approx(0.0, abs=1e-12)


def test_the_interval_of_a_bernoulli_sample_is_close_to_the_normal_approximation():
    sample = bernoulli(0.3)
    interval = bootstrap_mean(sample)
    mean = sample.mean()
    half_width = 1.96 * math.sqrt(mean * (1 - mean) / ROWS)
    assert interval.estimate == pytest.approx(mean) and interval.low < mean < interval.high
    assert interval.low == pytest.approx(mean - half_width, abs=0.01)
    assert interval.high == pytest.approx(mean + half_width, abs=0.01)


def test_a_paired_difference_of_identical_models_is_exactly_zero():
    sample = np.stack([bernoulli(0.4, seed=1), bernoulli(0.6, seed=2)])
    assert paired_difference(sample, sample) == Interval(0.0, 0.0, 0.0)
    assert not Interval(0.0, 0.0, 0.0).excludes_zero


def test_a_paired_difference_excludes_zero_only_when_the_models_differ_enough():
    right_where_wrong = paired_difference(np.ones(ROWS), np.zeros(ROWS))
    assert right_where_wrong == Interval(1.0, 1.0, 1.0) and right_where_wrong.excludes_zero
    baseline = bernoulli(0.5)
    one_row = baseline.copy()
    one_row[np.flatnonzero(baseline == 0)[0]] = 1.0
    differ_once = paired_difference(one_row, baseline)
    assert differ_once.estimate == pytest.approx(1 / ROWS) and differ_once.low == 0.0
    assert not differ_once.excludes_zero
    worse = paired_difference(np.zeros(ROWS), np.ones(ROWS))
    assert worse.high == -1.0 and worse.excludes_zero


def test_pairing_narrows_the_interval_of_correlated_models():
    """Two models right on mostly the same rows: the paired interval is narrower than either mean's alone."""
    baseline = bernoulli(0.5)
    better = baseline.copy()
    better[np.flatnonzero(baseline == 0)[:30]] = 1.0
    paired = paired_difference(better, baseline)
    assert paired.estimate == pytest.approx(0.1) and paired.excludes_zero
    alone = bootstrap_mean(better)
    assert paired.high - paired.low < 0.7 * (alone.high - alone.low)


def test_seeds_that_disagree_widen_the_interval():
    rows = bernoulli(0.5)
    agree = bootstrap_mean(np.stack([rows, rows, rows]))
    seeds = np.stack([bernoulli(0.3, seed=1), rows, bernoulli(0.7, seed=2)])
    disagree = bootstrap_mean(seeds)
    assert agree.estimate == pytest.approx(rows.mean()) and agree == bootstrap_mean(rows)
    assert disagree.high - disagree.low > 2 * (agree.high - agree.low)
    assert disagree.estimate == pytest.approx(seed_mean(seeds)) == pytest.approx(seeds.mean())


def test_the_bootstrap_is_deterministic():
    sample = np.stack([bernoulli(0.4, seed=3), bernoulli(0.5, seed=4)])
    assert bootstrap_mean(sample) == bootstrap_mean(sample)
    assert bootstrap_mean(sample, random_seed=1) != bootstrap_mean(sample, random_seed=2)
    seeds, rows = resample_indices(2, ROWS, resamples=50, random_seed=5)
    assert seeds.shape == (50, 2) and rows.shape == (50, ROWS)
    assert np.array_equal(rows, resample_indices(2, ROWS, resamples=50, random_seed=5)[1])


def test_rows_without_a_verdict_are_left_out():
    values = np.array([1.0, 0.0, math.nan, math.nan])
    assert bootstrap_mean(values).estimate == 0.5
    assert not bootstrap_mean(np.full(4, math.nan)).measured
    assert list(win_scores(np.array([1.0, 1.0, 0.0, 0.0, math.nan]), np.array([0.0, 1.0, 0.0, 1.0, 1.0]))[:4]) == [
        1.0,
        0.5,
        0.5,
        0.0,
    ]
    assert math.isnan(win_scores(np.array([math.nan]), np.array([1.0]))[0])
    with pytest.raises(ValueError):
        paired_difference(np.ones(3), np.ones(4))


def test_row_metrics_from_answer_records():
    records = [
        {"correct": True, "chosen_logprob": -4.0, "rejected_logprob": -6.0, "chosen_tokens": 4, "rejected_tokens": 2},
        {"correct": None, "chosen_logprob": -9.0, "rejected_logprob": -8.0, "chosen_tokens": 9, "rejected_tokens": 2},
    ]
    metrics = row_metrics(records)
    assert np.isnan(metrics["accuracy"][1]) and metrics["accuracy"][0] == 1.0
    assert list(metrics["preference_accuracy"]) == [1.0, 0.0] and list(metrics["margin"]) == [2.0, -1.0]
    # per token: -1 - (-3) = 2 and -1 - (-4) = 3: the second row prefers chosen per token only
    assert list(metrics["margin_per_token"]) == [2.0, 3.0] and list(metrics["preference_accuracy_per_token"]) == [1, 1]
    older = preference_scores([{"correct": True}])
    assert all(np.isnan(values).all() for values in older.values())


def test_cells_show_the_interval_and_the_marker():
    assert interval_cell(0.5, 0.4, 0.6) == "0.500 [0.400, 0.600]"
    assert interval_cell(0.05, 0.01, 0.09, signed=True, marked=True) == "**+0.050 [+0.010, +0.090]**"
    assert interval_cell(0.5, math.nan, math.nan) == "0.500" and interval_cell(math.nan, math.nan, math.nan) == "-"


# Accuracy, and the mean margin of log pi(chosen) over log pi(rejected), of each fake model.
FAKE_MODELS = {
    "base_teacher": (0.45, 0.0),
    "ref_teacher": (0.6, 0.1),
    "dpo_teacher": (0.65, 2.0),
    "student_sft": (0.35, 0.0),
    "student_dpo": (0.4, 0.6),
    "dckd": (0.45, 0.5),
    "adpa": (0.5, 0.8),
    "adpa_plus": (0.7, 1.2),
}
UNJUDGED = 10  # the first rows name no task family


def _write_fake_eval(results: Path, model: str, accuracy: float, margin: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder = results / "eval" / model
    folder.mkdir(parents=True)
    correct = rng.random(ROWS) < accuracy
    chosen = -30.0 + rng.normal(0.0, 1.0, ROWS)
    rejected = chosen - margin + rng.normal(0.0, 1.0, ROWS)
    tokens = rng.integers(5, 40, size=(2, ROWS))
    records = [
        {
            "row": i,
            "family": None if i < UNJUDGED else "addition",
            "response": "",
            "correct": None if i < UNJUDGED else bool(correct[i]),
            "chosen_logprob": float(chosen[i]),
            "rejected_logprob": float(rejected[i]),
            "chosen_tokens": int(tokens[0, i]),
            "rejected_tokens": int(tokens[1, i]),
        }
        for i in range(ROWS)
    ]
    judged = correct[UNJUDGED:]
    per_token = chosen / tokens[0] - rejected / tokens[1]
    metrics = {
        "model": model,
        "rows": ROWS,
        "accuracy": float(judged.mean()),
        "preference_accuracy": float((chosen > rejected).mean()),
        "preference_accuracy_per_token": float((per_token > 0).mean()),
        "margin": float((chosen - rejected).mean()),
        "margin_per_token": float(per_token.mean()),
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "answers.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


@pytest.fixture
def fake_results(tmp_path):
    results = tmp_path / "results"
    models = ["base_teacher", "ref_teacher", "dpo_teacher"]
    for index, model in enumerate(models):
        _write_fake_eval(results, model, *FAKE_MODELS[model], seed=index)
    for seed in (1, 2):
        for index, stage in enumerate(("student_sft", "student_dpo", "dckd", "adpa", "adpa_plus")):
            model = f"seed{seed}/{stage}"
            _write_fake_eval(results, model, *FAKE_MODELS[stage], seed=10 * seed + index)
            models.append(model)
    manifest = results / "seed1" / "adpa" / "adpa_manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(
        json.dumps(
            {"metrics": {"train_loss_first": 2.0, "train_loss_last": 1.0}, "loss_history": [[1, 2.0], [2, 1.0]]}
        )
    )
    return results, models


def test_write_summary_end_to_end(fake_results, tmp_path):
    results, models = fake_results
    outputs = [tmp_path / name for name in ("summary.csv", "summary.md", "plots/metrics.svg", "plots/loss.svg")]
    text = write_summary(results, models, "demo", 42, [1, 2], *outputs, paired_csv=tmp_path / "summary_paired.csv")
    print(text)
    table = pd.read_csv(outputs[0])
    assert len(table) == 3 + 5 * 2 and list(table["seed"][:5]) == [42, 42, 42, 1, 1]
    assert set(table["rows"]) == {ROWS} and set(table["judged_rows"]) == {ROWS - UNJUDGED}
    lines = text.splitlines()
    adpa_plus = next(line for line in lines if line.startswith("| adpa_plus |"))
    assert adpa_plus.startswith(f"| adpa_plus | 2 | {ROWS} | ")
    estimate = (table.loc[table["model"] == "adpa_plus", "accuracy"]).mean()
    assert f"| {estimate:.3f} [" in adpa_plus
    teacher = next(line for line in lines if line.startswith("| dpo_teacher |"))
    assert teacher.startswith(f"| dpo_teacher | 1 | {ROWS} | ") and teacher.count("[") == len(FAKE_MODELS) - 2
    sft = next(line for line in lines if line.startswith("| student_sft |"))
    assert sft.split(" | ")[4] == "-", "student_sft's win rate against itself is not shown"
    assert "## Paired differences" in text and "**bold** where the interval excludes 0" in text
    paired_section, ingredients = text.split("## Paired differences", 1)[1].split("## What each ingredient adds")
    paired_lines = [line for line in paired_section.splitlines() if " − " in line and line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in paired_lines[1:]] == [
        "student_dpo − student_sft",
        "dckd − student_sft",
        "adpa − student_sft",
        "adpa_plus − student_sft",
        "adpa_plus − adpa",
        "adpa − dckd",
        "adpa_plus − dckd",
        "adpa_plus − student_dpo",
        "dpo_teacher − ref_teacher",
    ]
    # Of the attribution pairs, this run (no chosen_sft, vanilla_kd or adpa_no_ref) has the DCKD start only.
    ingredient_lines = [line for line in ingredients.splitlines() if line.startswith("| ") and "---" not in line]
    assert [line.split(" | ")[:2] for line in ingredient_lines[1:]] == [["| the DCKD start", "adpa_plus − adpa"]]
    same = next(line for line in paired_lines if line.startswith("| adpa_plus − adpa |"))
    assert ingredient_lines[1].split(" | ", 2)[2] == same.split(" | ", 1)[1], "the same paired difference"
    dpo_vs_ref = next(line for line in paired_lines if line.startswith("| dpo_teacher − ref_teacher | 1 |"))
    assert dpo_vs_ref.split(" | ")[5].startswith("**+"), "pref. acc. of the DPO teacher is clearly higher"
    paired = pd.read_csv(tmp_path / "summary_paired.csv")
    versus_sft = paired[(paired["model"] == "adpa_plus") & (paired["baseline"] == "student_sft")].set_index("metric")
    row = versus_sft.loc[["accuracy"]]
    assert row["excludes_zero"].item() and row["low"].item() > 0 and row["seeds"].item() == 2
    sft_accuracy = table.loc[table["model"] == "student_sft", "accuracy"].mean()
    assert row["difference"].item() == pytest.approx(estimate - sft_accuracy)
    # against student_sft the win-rate difference is the win rate - 0.5, half the accuracy difference
    win = versus_sft.loc[["win_rate_vs_student_sft"]]
    assert win["difference"].item() == pytest.approx(row["difference"].item() / 2)
    assert table.loc[table["model"] == "adpa_plus", "win_rate_vs_student_sft"].mean() - 0.5 == pytest.approx(
        win["difference"].item()
    )
    svg = outputs[2].read_text()
    assert svg.lstrip().startswith("<?xml") and "dpo_teacher − ref_teacher" in svg


def test_intervals_and_paired_differences_from_rows(fake_results):
    results, models = fake_results
    from adpa.report.summary import collect, read_evaluations

    evaluations = read_evaluations(results, models)
    table = collect(results, evaluations, "demo", 42)
    stages = rows_by_stage(evaluations)
    assert stages["dpo_teacher"]["accuracy"].keys() == {None}
    assert stages["dpo_teacher"]["win_rate_vs_student_sft"].keys() == {1, 2}, "teachers play every seed's SFT"
    assert stages["adpa"]["win_rate_vs_student_sft"].keys() == {1, 2}
    intervals = model_intervals(table, stages)
    for metric in ("accuracy", "preference_accuracy", "margin_per_token"):
        mean = table.groupby("model", sort=False)[metric].mean()
        assert intervals[metric].to_numpy() == pytest.approx(mean.loc[intervals.index].to_numpy(), abs=1e-9)
        assert (intervals[f"{metric}_low"] <= intervals[metric]).all()
        assert (intervals[metric] <= intervals[f"{metric}_high"]).all()
    teachers = table[table["seed"] == 42].set_index("model")["win_rate_vs_student_sft"]
    assert intervals.loc[teachers.index, "win_rate_vs_student_sft"].to_numpy() == pytest.approx(teachers.to_numpy())
    paired = paired_differences(stages, [("adpa", "adpa"), ("adpa", "missing")])
    assert (paired["difference"] == 0).all() and not paired["excludes_zero"].any() and len(paired) == 6
    text = markdown(intervals, paired, "demo", [1, 2])
    line = next(line for line in text.splitlines() if line.startswith("| adpa − adpa |"))
    assert line.startswith("| adpa − adpa | 2 | 300 | +0.000 [+0.000, +0.000] |") and "**" not in line


def test_a_table_of_the_validation_split_says_so_in_its_first_words():
    """A tuning table must not read as a held-out result (evaluation.split: validation)."""
    from adpa.report.summary import split_description

    assert split_description(None).startswith("Held-out test split")
    assert split_description("test").startswith("Held-out test split")
    assert "not the held-out test split" in split_description("validation")
    empty = pd.DataFrame()
    held_out, tuning = markdown(empty, empty, "demo", [1]), markdown(empty, empty, "demo", [1], "validation")
    assert "Held-out test split" in held_out and "Validation split" not in held_out
    assert "**Validation split**" in tuning.splitlines()[2]


def _answer(family: str, correct: bool, prefers_chosen: bool) -> dict:
    chosen, rejected = (-1.0, -2.0) if prefers_chosen else (-2.0, -1.0)
    return {
        "family": family,
        "correct": correct,
        "chosen_logprob": chosen,
        "rejected_logprob": rejected,
        "chosen_tokens": 2,
        "rejected_tokens": 2,
    }


def test_per_family_table_averages_each_seed_then_the_seeds():
    from adpa.report.summary import family_lines, family_table

    # Family a: seed 1 right on 1 of 2 rows, seed 2 on 2 of 2 -> 0.75; family b: always wrong, always prefers chosen.
    def answers(right_on_a: int) -> list[dict]:
        return [_answer("a", index < right_on_a, False) for index in range(2)] + [_answer("b", False, True)]

    evaluations = {"seed1/adpa": ({}, answers(1)), "seed2/adpa": ({}, answers(2)), "dpo_teacher": ({}, answers(0))}
    table = family_table(evaluations).set_index(["model", "family"])
    assert table.loc[("adpa", "a"), "accuracy"] == pytest.approx(0.75)
    assert (
        table.loc[("adpa", "a"), "preference_accuracy"] == 0.0
        and table.loc[("adpa", "b"), "preference_accuracy"] == 1.0
    )
    assert table.loc[("dpo_teacher", "a"), "accuracy"] == 0.0 and table.loc[("adpa", "a"), "rows"] == 2
    lines = family_lines(family_table(evaluations))
    assert lines[5] == "| model | a (2 rows) | b (1 rows) |" and lines[7] == "| adpa | 0.750 / 0.000 | 0.000 / 1.000 |"
    # Rows without a family (a real dataset), or a single family: no section.
    unnamed = [{key: value for key, value in row.items() if key != "family"} for row in answers(1)]
    assert family_table({"seed1/adpa": ({}, unnamed)}).empty
    assert family_table({"seed1/adpa": ({}, [_answer("a", True, True)])}).empty
