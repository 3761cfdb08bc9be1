"""The sweep table (adpa.report.sweep_summary): each value's means and paired differences against the config's value."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from adpa.core.errors import InputError
from adpa.report.summary import METRICS
from adpa.report.sweep_summary import CSV_COLUMNS, run_sweep_summary

ROWS = 8
SEEDS = (1, 2)
POINTS = [
    {"value": 0.0, "folder": "sweeps/adpa_weight/adpa_weight~0.0"},
    {"value": 0.5, "folder": None},
    {"value": 1.6, "folder": "sweeps/adpa_weight/adpa_weight~1.6"},
]
PARAMS = {
    "name": "adpa_weight",
    "setting": "adpa.adpa_weight",
    "baseline": 0.5,
    "points": POINTS,
    "models": ["adpa", "adpa_plus"],
    "seeds": list(SEEDS),
    "run_name": "demo",
}
# Per model and value: how many of the first rows each seed gets right, and log pi(chosen) - log pi(rejected)
# on every row. adpa at 1.6 is right on two more rows of each seed than at 0.5 (+0.25 accuracy, an interval
# covering 0 on 8 rows) and its margin is higher by 1 on every row (an interval of one point, excluding 0).
FAKE = {
    "adpa": {0.0: ((2, 3), 0.5), 0.5: ((4, 5), 1.0), 1.6: ((6, 7), 2.0)},
    "adpa_plus": {0.0: ((3, 3), 1.5), 0.5: ((3, 3), 1.5), 1.6: ((3, 3), 1.5)},
}


def write_eval(folder: Path, right: int, margin: float, rows: int = ROWS) -> None:
    """An evaluation whose first `right` rows are verified; every row's margin `margin`, over 2 tokens each."""
    folder.mkdir(parents=True)
    records = [
        {
            "row": i,
            "family": "addition",
            "response": "",
            "correct": i < right,
            "chosen_logprob": -10.0,
            "rejected_logprob": -10.0 - margin,
            "chosen_tokens": 2,
            "rejected_tokens": 2,
        }
        for i in range(rows)
    ]
    metrics = {"model": folder.name, "rows": rows, "accuracy": right / rows, "margin": margin}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "answers.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def folder_of(results: Path, point: dict, seed: int, model: str) -> Path:
    return (results if point["folder"] is None else results / point["folder"]) / "eval" / f"seed{seed}" / model


@pytest.fixture
def sweep(tmp_path):
    results = tmp_path / "results"
    for seed in SEEDS:
        write_eval(
            results / "eval" / f"seed{seed}" / "student_sft", 0, 0.0
        )  # wrong everywhere: win = accuracy / 2 + 0.5
    for model, by_value in FAKE.items():
        for point in POINTS:
            rights, margin = by_value[point["value"]]
            for seed, right in zip(SEEDS, rights):
                write_eval(folder_of(results, point, seed, model), right, margin)
    outputs = {"csv": tmp_path / "sweeps/adpa_weight.csv", "markdown": tmp_path / "sweeps/adpa_weight.md"}
    return results, {**outputs, "plot": tmp_path / "sweeps/adpa_weight.svg"}


def test_sweep_summary_end_to_end(sweep, capsys):
    results, outputs = sweep
    manifest = run_sweep_summary(PARAMS, results=results, **outputs)
    assert manifest["points"] == 3 and manifest["models"] == ["adpa", "adpa_plus"] and manifest["seeds"] == [1, 2]
    table = pd.read_csv(outputs["csv"])
    assert list(table.columns) == CSV_COLUMNS and len(table) == 6
    assert list(table["model"]) == ["adpa"] * 3 + ["adpa_plus"] * 3 and list(table["value"][:3]) == [0.0, 0.5, 1.6]
    assert list(table["is_baseline"]) == [False, True, False] * 2
    assert set(table["seeds"]) == {2} and set(table["rows"]) == {ROWS} and set(table["sweep"]) == {"adpa_weight"}
    adpa = table[table["model"] == "adpa"].set_index("value")
    # Means over seeds and rows: (2 + 3) / 16, (4 + 5) / 16, (6 + 7) / 16.
    assert list(adpa["accuracy"]) == [0.3125, 0.5625, 0.8125]
    assert list(adpa["win_rate_vs_student_sft"]) == [0.65625, 0.78125, 0.90625]
    assert list(adpa["margin"]) == [0.5, 1.0, 2.0] and list(adpa["margin_per_token"]) == [0.25, 0.5, 1.0]
    assert list(adpa["preference_accuracy"]) == [1.0, 1.0, 1.0]
    for metric in METRICS:
        assert (adpa[f"{metric}_low"] <= adpa[metric]).all() and (adpa[metric] <= adpa[f"{metric}_high"]).all()
    baseline = adpa.loc[0.5]
    assert all(
        math.isnan(baseline[f"{metric}_difference{end}"]) for metric in METRICS for end in ("", "_low", "_high")
    )
    raw = outputs["csv"].read_text().splitlines()
    assert ",True,2,8,0.5625," in raw[2] and raw[2].endswith(",,,"), "the baseline's differences are empty"
    higher = adpa.loc[1.6]
    assert higher["accuracy_difference"] == 0.25 and higher["win_rate_vs_student_sft_difference"] == 0.125
    assert higher["accuracy_difference_low"] <= 0 < higher["accuracy_difference_high"]
    assert (higher["margin_difference"], higher["margin_difference_low"], higher["margin_difference_high"]) == (
        1,
        1,
        1,
    )
    lower = adpa.loc[0.0]
    assert lower["accuracy_difference"] == -0.25 and lower["margin_difference_high"] == -0.5
    flat = table[table["model"] == "adpa_plus"]
    assert (flat["accuracy"] == 0.375).all() and (flat[~flat["is_baseline"]]["accuracy_difference"] == 0).all()

    text = outputs["markdown"].read_text()
    assert capsys.readouterr().out == text
    lines = text.splitlines()
    assert lines[0] == "# Sweep adpa_weight: adpa.adpa_weight (config: 0.5)"
    assert "**bold** where its interval excludes 0" in text and "## adpa" in lines and "## adpa_plus" in lines
    header = next(line for line in lines if line.startswith("| adpa.adpa_weight |")).split(" | ")
    assert header[3:7] == ["accuracy", "Δ accuracy", "win rate vs SFT", "Δ win rate vs SFT"]
    adpa_rows = [line.split(" | ") for line in lines[lines.index("## adpa") :] if line.startswith("| 0.5 (config) |")]
    assert adpa_rows[0][:5] == ["| 0.5 (config)", "2", "8", adpa_rows[0][3], "-"], "the config's value: no Δ"
    cells = dict(zip(header, next(line for line in lines if line.startswith("| 1.6 |")).split(" | ")))
    assert cells["accuracy"].startswith("0.812 [")
    assert cells["Δ accuracy"].startswith("+0.250 [+0.000, ") and "**" not in cells["Δ accuracy"]
    assert cells["Δ margin"] == "**+1.000 [+1.000, +1.000]**"
    assert cells["Δ pref. acc."] == "+0.000 [+0.000, +0.000]"
    lower_cells = dict(zip(header, next(line for line in lines if line.startswith("| 0.0 |")).split(" | ")))
    assert lower_cells["Δ margin"] == "**-0.500 [-0.500, -0.500]**"

    svg = outputs["plot"].read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "config" in svg and "adpa_plus" in svg


def test_a_missing_evaluation_is_named(sweep):
    results, outputs = sweep
    missing = folder_of(results, POINTS[2], 2, "adpa_plus")
    (missing / "answers.jsonl").unlink()
    with pytest.raises(InputError, match="no evaluation of adpa_plus") as error:
        run_sweep_summary(PARAMS, results=results, **outputs)
    assert str(missing) in str(error.value) and "\n" not in str(error.value)
    assert not outputs["csv"].exists()


def test_different_held_out_rows_cannot_be_paired(sweep):
    results, outputs = sweep
    other = folder_of(results, POINTS[0], 1, "adpa")
    for name in ("metrics.json", "answers.jsonl"):
        (other / name).unlink()
    other.rmdir()
    write_eval(other, 2, 0.5, rows=ROWS - 1)
    with pytest.raises(InputError, match="different held-out rows") as error:
        run_sweep_summary(PARAMS, results=results, **outputs)
    assert str(other) in str(error.value)


def test_the_baseline_is_the_point_without_a_folder(sweep):
    results, outputs = sweep
    with pytest.raises(InputError, match="exactly one"):
        run_sweep_summary(
            {**PARAMS, "points": [{**point, "folder": "x"} for point in POINTS]}, results=results, **outputs
        )
    with pytest.raises(InputError, match="baseline 1.6"):
        run_sweep_summary({**PARAMS, "baseline": 1.6}, results=results, **outputs)


@pytest.mark.parametrize("values", [[1e-5, 1e-3, 1e-1], [0.0, 1e-4, 0.1], ["cosine", "linear", "constant"]])
def test_plots_of_log_spaced_and_non_numeric_values(sweep, values, tmp_path):
    from adpa.report.sweep_summary import plot_sweep, sweep_table

    table = sweep_table(PARAMS, sweep[0])
    points = [{**point, "value": value} for point, value in zip(POINTS, values)]
    plot_sweep(table, {**PARAMS, "points": points, "baseline": values[1]}, tmp_path / "plot.svg")
    assert (tmp_path / "plot.svg").read_text().lstrip().startswith("<?xml")
