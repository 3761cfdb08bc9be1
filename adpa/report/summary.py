"""The results table and plots (rule summary): one row per model and seed, and 95% bootstrap intervals.

Reads what the evaluate stage wrote under results/eval/<model>/ and the training loss history in
each model's manifest. Win rate against student_sft (of the same seed; teachers against every
seed's) counts a win where only this model's answer verifies, a tie where both or neither do.
Every metric is also recomputed per held-out row from the answer records, so the Markdown table
gives each model's mean with a percentile bootstrap interval (over rows, and over seeds where there
are several), and a paired comparison of chosen models on the same rows and seeds (adpa.report.stats).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adpa.core.artifacts import MANIFEST
from adpa.core.results import read_evaluation
from adpa.dag.methods import BASELINE, METHOD_ENTRIES, comparisons, ingredients
from adpa.report.stats import (
    CONFIDENCE,
    RESAMPLES,
    Interval,
    bootstrap_mean,
    paired_difference,
    row_metrics,
    seed_mean,
    win_scores,
)

WIN_RATE = f"win_rate_vs_{BASELINE}"
METRICS = (
    "accuracy",
    WIN_RATE,
    "preference_accuracy",
    "preference_accuracy_per_token",
    "margin",
    "margin_per_token",
)
# Shown in the Markdown table, in this order, with these headers.
TABLE_COLUMNS = {
    "accuracy": "accuracy",
    WIN_RATE: "win rate vs SFT",
    "preference_accuracy": "pref. acc.",
    "preference_accuracy_per_token": "pref. acc./token",
    "margin": "margin",
    "margin_per_token": "margin/token",
}
# (model, baseline) pairs of the paired-differences table: model - baseline on the same rows and seeds,
# from the method entries (adpa/dag/methods.py). Pairs naming a model the config did not train (see
# `methods`) are left out.
BASELINE_METHODS = tuple(method.name for method in METHOD_ENTRIES if method.kind == "baseline")
DISTILLATION_METHODS = tuple(method.name for method in METHOD_ENTRIES if method.distillation)
# What each ingredient adds, one paired difference each (docs/embedded-default.md).
INGREDIENTS: tuple[tuple[str, str, str], ...] = ingredients()
COMPARISONS: tuple[tuple[str, str], ...] = comparisons(teachers=(("dpo_teacher", "ref_teacher"),))
Evaluation = tuple[dict[str, Any], list[dict[str, Any]]]
# One model's per-row values of one metric, by seed (None: a teacher; for a teacher's win rate, student_sft's seed).
RowsBySeed = dict[int | None, np.ndarray]


def split_model(model: str) -> tuple[str, int | None]:
    """'seed7/adpa' -> ('adpa', 7); 'dpo_teacher' -> ('dpo_teacher', None)."""
    if "/" in model:
        seed, stage = model.split("/", 1)
        return stage, int(seed.removeprefix("seed"))
    return model, None


def win_rate(verdicts: Sequence[bool | None], baseline: Sequence[bool | None]) -> float | None:
    """(wins + ties / 2) / judged rows, where a win is a verified answer the baseline got wrong."""
    pairs = [(a, b) for a, b in zip(verdicts, baseline, strict=True) if a is not None and b is not None]
    if not pairs:
        return None
    wins = sum(a and not b for a, b in pairs)
    ties = sum(a == b for a, b in pairs)
    return (wins + ties / 2) / len(pairs)


def read_evaluations(results: Path, models: Sequence[str]) -> dict[str, Evaluation]:
    """metrics.json and answer records per evaluated model, in the given order."""
    return {model: read_evaluation(results / "eval" / model) for model in models}


def collect(results: Path, evaluations: Mapping[str, Evaluation], run_name: str, teacher_seed: int) -> pd.DataFrame:
    """One row per evaluated model (students once per seed), with the held-out rows it was evaluated on."""
    baselines = {model: answers for model, (_, answers) in evaluations.items() if split_model(model)[0] == BASELINE}
    rows = []
    for model, (metrics, answers) in evaluations.items():
        stage, seed = split_model(model)
        verdicts = [answer["correct"] for answer in answers]
        if seed is None:
            rates = [win_rate(verdicts, [a["correct"] for a in base]) for base in baselines.values()]
        else:
            base = baselines.get(f"seed{seed}/{BASELINE}")
            rates = [win_rate(verdicts, [a["correct"] for a in base])] if base is not None else []
        rates = [rate for rate in rates if rate is not None]
        row = {
            "config": run_name,
            "model": stage,
            "seed": teacher_seed if seed is None else seed,
            "rows": metrics.get("rows", len(answers)),
            "judged_rows": sum(verdict is not None for verdict in verdicts),
        }
        row.update({key: metrics.get(key) for key in METRICS if key != WIN_RATE})
        row[WIN_RATE] = sum(rates) / len(rates) if rates else None
        row.update(training_losses(results / model))
        rows.append(row)
    return pd.DataFrame(rows)


def rows_by_stage(evaluations: Mapping[str, Evaluation]) -> dict[str, dict[str, RowsBySeed]]:
    """stage -> metric -> seed -> [rows] per-row values, the input of every interval."""
    baselines = {
        split_model(model)[1]: row_metrics(answers)["accuracy"]
        for model, (_, answers) in evaluations.items()
        if split_model(model)[0] == BASELINE
    }
    stages: dict[str, dict[str, RowsBySeed]] = {}
    for model, (_, answers) in evaluations.items():
        stage, seed = split_model(model)
        metrics = stages.setdefault(stage, {})
        for name, values in row_metrics(answers).items():
            metrics.setdefault(name, {})[seed] = values
        # Teachers play every seed's student_sft, a student its own seed's.
        if seed is None:
            opponents = baselines
        else:
            opponents = {seed: baselines[seed]} if seed in baselines else {}
        for opponent_seed, opponent in opponents.items():
            metrics.setdefault(WIN_RATE, {})[opponent_seed] = win_scores(metrics["accuracy"][seed], opponent)
    return stages


def _stack(rows: RowsBySeed, seeds: Sequence[int | None]) -> np.ndarray:
    """[seeds, rows] of the given seeds, in that order."""
    return np.stack([rows[seed] for seed in seeds])


def model_intervals(table: pd.DataFrame, stages: Mapping[str, Mapping[str, RowsBySeed]]) -> pd.DataFrame:
    """Per model, in the order of `collect`'s table: seeds, held-out rows and, per metric, the mean with its interval.

    Columns `seeds`, `rows`, and `<metric>`, `<metric>_low`, `<metric>_high`. Where the answer records lack a metric's
    per-row values (older evaluations), the mean over seeds of the table comes without an interval.
    student_sft's win rate against itself (0.5 by construction) is left out.
    """
    records = []
    for model, runs in table.groupby("model", sort=False):
        record: dict[str, Any] = {"model": model, "seeds": len(runs), "rows": int(runs["rows"].max())}
        for metric in METRICS:
            rows = stages.get(model, {}).get(metric, {})
            interval = bootstrap_mean(_stack(rows, list(rows))) if rows else Interval.missing()
            if model == BASELINE and metric == WIN_RATE:
                interval = Interval.missing()
            elif not interval.measured:
                fallback = pd.to_numeric(runs[metric], errors="coerce").mean()
                interval = Interval(float(fallback), math.nan, math.nan)
            record.update({metric: interval.estimate, f"{metric}_low": interval.low, f"{metric}_high": interval.high})
        records.append(record)
    return pd.DataFrame(records).set_index("model")


def paired_differences(
    stages: Mapping[str, Mapping[str, RowsBySeed]], comparisons: Sequence[tuple[str, str]] = COMPARISONS
) -> pd.DataFrame:
    """One row per comparison and metric: model - baseline on the seeds both have, with its paired interval.

    Columns: model, baseline, metric, seeds, rows, difference, low, high, excludes_zero. Comparisons
    naming a model that was not evaluated are left out.
    """
    records = []
    for model, baseline in comparisons:
        if model not in stages or baseline not in stages:
            continue
        for metric in METRICS:
            values, reference = stages[model].get(metric, {}), stages[baseline].get(metric, {})
            seeds = [seed for seed in values if seed in reference]
            interval = (
                paired_difference(_stack(values, seeds), _stack(reference, seeds)) if seeds else Interval.missing()
            )
            records.append(
                {
                    "model": model,
                    "baseline": baseline,
                    "metric": metric,
                    "seeds": len(seeds),
                    "rows": len(values[seeds[0]]) if seeds else 0,
                    "difference": interval.estimate,
                    "low": interval.low,
                    "high": interval.high,
                    "excludes_zero": interval.measured and interval.excludes_zero,
                }
            )
    columns = ["model", "baseline", "metric", "seeds", "rows", "difference", "low", "high", "excludes_zero"]
    return pd.DataFrame(records, columns=columns)


def training_losses(model_dir: Path) -> dict[str, Any]:
    manifest_path = model_dir / MANIFEST
    if not manifest_path.is_file():
        return {"train_loss_first": None, "train_loss_last": None}
    metrics = json.loads(manifest_path.read_text()).get("metrics", {})
    return {"train_loss_first": metrics.get("train_loss_first"), "train_loss_last": metrics.get("train_loss_last")}


def loss_histories(results: Path, models: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """Training loss per logged step, per trained model (from its manifest)."""
    histories = {}
    for model in models:
        manifest_path = results / model / MANIFEST
        if manifest_path.is_file():
            history = json.loads(manifest_path.read_text()).get("loss_history")
            if history:
                histories[model] = [(int(step), float(loss)) for step, loss in history]
    return histories


def _number(value: float, signed: bool) -> str:
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def interval_cell(estimate: float, low: float, high: float, signed: bool = False, marked: bool = False) -> str:
    """'mean [low, high]', the mean alone without an interval, '-' without a mean; bold when marked."""
    if pd.isna(estimate):
        return "-"
    text = _number(estimate, signed)
    if not (pd.isna(low) or pd.isna(high)):
        text += f" [{_number(low, signed)}, {_number(high, signed)}]"
    return f"**{text}**" if marked else text


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def model_table(intervals: pd.DataFrame) -> list[str]:
    lines = [
        "| model | seeds | rows | " + " | ".join(TABLE_COLUMNS.values()) + " |",
        "|---|---|---|" + "---|" * len(TABLE_COLUMNS),
    ]
    for model, values in intervals.iterrows():
        cells = [
            interval_cell(values[key], values[f"{key}_low"], values[f"{key}_high"], key.startswith("margin"))
            for key in TABLE_COLUMNS
        ]
        lines.append(f"| {model} | {int(values['seeds'])} | {int(values['rows'])} | " + " | ".join(cells) + " |")
    return lines


def paired_table(paired: pd.DataFrame, labels: Mapping[tuple[str, str], str] | None = None) -> list[str]:
    """One line per (model, baseline) pair; with `labels`, only the labelled pairs, each led by its label."""
    lead = "ingredient | " if labels else ""
    lines = [
        f"| {lead}model − baseline | seeds | rows | " + " | ".join(TABLE_COLUMNS.values()) + " |",
        "|---" * (3 + bool(labels)) + "|" + "---|" * len(TABLE_COLUMNS),
    ]
    groups = dict(list(paired.groupby(["model", "baseline"], sort=False)))
    for model, baseline in labels or groups:
        comparison = groups[model, baseline]
        by_metric = comparison.set_index("metric")
        cells = [
            interval_cell(
                by_metric.at[key, "difference"],
                by_metric.at[key, "low"],
                by_metric.at[key, "high"],
                signed=True,
                marked=bool(by_metric.at[key, "excludes_zero"]),
            )
            for key in TABLE_COLUMNS
        ]
        # The models' own seeds: a teacher's win rate is also paired over student_sft's seeds.
        seeds, rows = by_metric.at["accuracy", "seeds"], by_metric.at["accuracy", "rows"]
        label = f"{labels[model, baseline]} | " if labels else ""
        lines.append(f"| {label}{model} − {baseline} | {seeds} | {rows} | " + " | ".join(cells) + " |")
    return lines


def ingredient_labels(paired: pd.DataFrame) -> dict[tuple[str, str], str]:
    """The attribution pairs (INGREDIENTS) this run has, in INGREDIENTS order."""
    present = set(zip(paired["model"], paired["baseline"]))
    return {(model, baseline): name for name, model, baseline in INGREDIENTS if (model, baseline) in present}


def family_table(evaluations: Mapping[str, Evaluation]) -> pd.DataFrame:
    """Accuracy and preference accuracy per model and task family: each seed's mean over the family's rows,
    then the mean over seeds. Empty unless every answer record names its family and there are several
    (the generated tasks do; a real dataset's rows do not)."""
    records = []
    for model, (_, answers) in evaluations.items():
        families = [row.get("family") for row in answers]
        if not answers or None in families:
            return pd.DataFrame()
        stage, seed = split_model(model)
        values = row_metrics(answers)
        for family in dict.fromkeys(families):
            rows = np.array([name == family for name in families])
            records.append(
                {
                    "model": stage,
                    "seed": seed,
                    "family": family,
                    "rows": int(rows.sum()),
                    **{key: seed_mean(values[key][rows]) for key in ("accuracy", "preference_accuracy")},
                }
            )
    table = pd.DataFrame(records)
    if table.empty or table["family"].nunique() < 2:
        return pd.DataFrame()
    return (
        table.groupby(["model", "family"], sort=False)[["rows", "accuracy", "preference_accuracy"]]
        .mean()
        .reset_index()
    )


def family_lines(families: pd.DataFrame) -> list[str]:
    """The per-family section of summary.md: one row per model, 'accuracy / pref. acc.' per family."""
    if families.empty:
        return []
    names = list(dict.fromkeys(families["family"]))
    rows = families.groupby("family", sort=False)["rows"].max()
    lines = [
        "",
        "## Per task family",
        "",
        "Accuracy / preference accuracy on each family's rows: each seed's mean, then the mean over "
        "seeds (no intervals: each family has a fraction of the rows; the paired differences above are the test).",
        "",
        "| model | " + " | ".join(f"{name} ({rows[name]:.0f} rows)" for name in names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for model, group in families.groupby("model", sort=False):
        cells = group.set_index("family")
        lines.append(
            f"| {model} | "
            + " | ".join(
                f"{cells.loc[name, 'accuracy']:.3f} / {cells.loc[name, 'preference_accuracy']:.3f}"
                if name in cells.index
                else "-"
                for name in names
            )
            + " |"
        )
    return lines


def split_description(split: str | None) -> str:
    """What the evaluated rows are: a table tuned on says so in its first words (evaluation.split)."""
    if split in (None, "test"):
        return "Held-out test split of the preference dataset"
    if split == "validation":
        return "**Validation split** of the preference dataset (for tuning; not the held-out test split)"
    return f"Split '{split}' of the preference dataset"


def markdown(
    intervals: pd.DataFrame,
    paired: pd.DataFrame,
    run_name: str,
    seeds: Sequence[int],
    split: str | None = None,
    families: pd.DataFrame | None = None,
) -> str:
    """The results table (mean [interval] per model) and the paired-differences table."""
    level = f"{CONFIDENCE:.0%}"
    lines = [
        f"# Results: {run_name}",
        "",
        f"{split_description(split)}; students: seeds {', '.join(map(str, seeds))} "
        f"({_plural(len(seeds), 'run')}), teachers trained once. Each cell: mean [{level} interval], a percentile "
        f"bootstrap ({RESAMPLES} resamples) over held-out rows, and over seeds too where there are several "
        "(the mean over seeds; every seed on the same resampled rows). Win rate against student_sft of the same "
        "seed (teachers: against every seed's), a tie counting half.",
        "",
        *model_table(intervals),
    ]
    if not paired.empty:
        lines += [
            "",
            "## Paired differences",
            "",
            f"Model − baseline on the same held-out rows and seeds: mean difference [{level} paired bootstrap "
            "interval]; **bold** where the interval excludes 0. With a right/wrong verifier a difference in "
            "win rate vs SFT is half the difference in accuracy (against student_sft: win rate − 0.5).",
            "",
            *paired_table(paired),
        ]
    labels = ingredient_labels(paired) if not paired.empty else {}
    if labels:
        lines += [
            "",
            "## What each ingredient adds",
            "",
            "Each row adds one ingredient to its baseline (chosen_sft: NLL on the chosen answers alone, the term "
            "every distillation method shares); the same paired differences as above.",
            "",
            *paired_table(paired, labels),
        ]
    lines += family_lines(families if families is not None else pd.DataFrame())
    return "\n".join(lines) + "\n"


def _error_bars(estimates: pd.Series, lows: pd.Series, highs: pd.Series) -> np.ndarray:
    """[2, n] distances from each estimate down to its low and up to its high bound; 0 without an interval."""
    return np.nan_to_num(np.stack([estimates - lows, highs - estimates]), nan=0.0)


def plot_metrics(intervals: pd.DataFrame, paired: pd.DataFrame, path: Path) -> None:
    """Top row: each model's mean per metric with its interval. Bottom row: the paired differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 1 if paired.empty else 2
    figure, axes = plt.subplots(
        rows, len(METRICS), figsize=(3.2 * len(METRICS), 3.6 * rows), squeeze=False, constrained_layout=True
    )
    for axis, key in zip(axes[0], METRICS):
        means = intervals[key]
        axis.bar(
            range(len(means)),
            means.fillna(0.0),
            capsize=3,
            yerr=_error_bars(means, intervals[f"{key}_low"], intervals[f"{key}_high"]),
            color=["#8c8c8c" if "teacher" in model else "#1f77b4" for model in means.index],
        )
        axis.set_xticks(range(len(means)), means.index, rotation=60, ha="right", fontsize=8)
        axis.set_title(f"{TABLE_COLUMNS[key]} ({CONFIDENCE:.0%} interval)", fontsize=9)
        if key.startswith("margin"):
            axis.axhline(0.0, color="black", linewidth=0.6)
    if rows == 2:
        pairs = zip(paired["model"], paired["baseline"])
        labels = list(dict.fromkeys(f"{model} − {baseline}" for model, baseline in pairs))
        for column, (axis, key) in enumerate(zip(axes[1], METRICS)):
            differences = paired[paired["metric"] == key]
            colors = ["#d62728" if marked else "#7f7f7f" for marked in differences["excludes_zero"]]
            errors = _error_bars(differences["difference"], differences["low"], differences["high"])
            positions = np.arange(len(differences))[::-1]
            for position, value, low, high, color in zip(positions, differences["difference"], *errors, colors):
                axis.errorbar(value, position, xerr=[[low], [high]], fmt="o", color=color, capsize=3, markersize=4)
            axis.axvline(0.0, color="black", linewidth=0.6)
            axis.set_yticks(positions, labels if column == 0 else [""] * len(labels), fontsize=8)
            axis.set_ylim(-0.5, len(labels) - 0.5)
            axis.set_title(f"Δ {TABLE_COLUMNS[key]} (red: excludes 0)", fontsize=9)
    figure.savefig(path)
    plt.close(figure)


def plot_losses(histories: Mapping[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(split_model(model)[0] for model in histories))
    columns = min(4, max(1, len(stages)))
    rows = max(1, (len(stages) + columns - 1) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.4 * columns, 2.8 * rows), squeeze=False, constrained_layout=True
    )
    for axis in axes.flat[len(stages) :]:
        axis.set_visible(False)
    for axis, stage in zip(axes.flat, stages):
        for model, history in histories.items():
            name, seed = split_model(model)
            if name == stage:
                steps, losses = zip(*history)
                axis.plot(steps, losses, marker=".", label=f"seed {seed}" if seed is not None else None)
        axis.set_title(stage, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.set_ylabel("training loss", fontsize=8)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.savefig(path)
    plt.close(figure)


def write_summary(
    results: str | os.PathLike,
    models: Sequence[str],
    run_name: str,
    teacher_seed: int,
    seeds: Sequence[int],
    csv_path: Path,
    markdown_path: Path,
    metrics_plot: Path,
    loss_plot: Path,
    paired_csv: Path | None = None,
    split: str | None = None,
) -> str:
    """Write the CSV, the Markdown tables, both plots and optionally the paired differences; return the Markdown."""
    results = Path(results)
    evaluations = read_evaluations(results, models)
    table = collect(results, evaluations, run_name, teacher_seed)
    stages = rows_by_stage(evaluations)
    intervals, paired = model_intervals(table, stages), paired_differences(stages)
    text = markdown(intervals, paired, run_name, seeds, split, family_table(evaluations))
    for path in (csv_path, markdown_path, metrics_plot, loss_plot, *([paired_csv] if paired_csv else [])):
        path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv_path, index=False)
    if paired_csv is not None:
        paired.to_csv(paired_csv, index=False)
    markdown_path.write_text(text)
    plot_metrics(intervals, paired, metrics_plot)
    plot_losses(loss_histories(results, models), loss_plot)
    return text


def run_summary(
    params: Mapping[str, Any],
    *,
    results: Path,
    csv: Path,
    markdown: Path,
    metrics_plot: Path,
    loss_plot: Path,
    paired_csv: Path | None = None,
) -> None:
    """Stage summary: the table over every evaluated model of the config, printed as well."""
    table = write_summary(
        results,
        params["models"],
        params["run_name"],
        params["seed"],
        params["seeds"],
        csv,
        markdown,
        metrics_plot,
        loss_plot,
        paired_csv,
        params.get("split"),
    )
    print(table, end="")
