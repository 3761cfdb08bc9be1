"""The results table and plots (rule summary): one row per model and seed, mean and spread over seeds.

Reads what the evaluate stage wrote under results/eval/<model>/ and the training loss history in
each model's manifest. Win rate against student_sft (of the same seed; teachers against every
seed's) counts a win where only this model's answer verifies, a tie where both or neither do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from adpa.artifacts import MANIFEST
from adpa.evaluate import read_evaluation

METRICS = (
    "accuracy",
    "win_rate_vs_student_sft",
    "preference_accuracy",
    "preference_accuracy_per_token",
    "margin",
    "margin_per_token",
)
# Shown in the Markdown table, in this order, with these headers.
TABLE_COLUMNS = {
    "accuracy": "accuracy",
    "win_rate_vs_student_sft": "win rate vs SFT",
    "preference_accuracy": "pref. acc.",
    "preference_accuracy_per_token": "pref. acc./token",
    "margin": "margin",
    "margin_per_token": "margin/token",
}


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


def collect(results: Path, models: Sequence[str], run_name: str, teacher_seed: int) -> pd.DataFrame:
    """One row per evaluated model (students once per seed)."""
    evaluations = {model: read_evaluation(results / "eval" / model) for model in models}
    baselines = {model: answers for model, (_, answers) in evaluations.items() if split_model(model)[0] == "student_sft"}
    rows = []
    for model, (metrics, answers) in evaluations.items():
        stage, seed = split_model(model)
        verdicts = [answer["correct"] for answer in answers]
        if seed is None:
            rates = [win_rate(verdicts, [a["correct"] for a in base]) for base in baselines.values()]
        else:
            base = baselines.get(f"seed{seed}/student_sft")
            rates = [win_rate(verdicts, [a["correct"] for a in base])] if base is not None else []
        rates = [rate for rate in rates if rate is not None]
        row = {"config": run_name, "model": stage, "seed": teacher_seed if seed is None else seed}
        row.update({key: metrics.get(key) for key in METRICS if key != "win_rate_vs_student_sft"})
        row["win_rate_vs_student_sft"] = sum(rates) / len(rates) if rates else None
        row.update(training_losses(results / model))
        rows.append(row)
    return pd.DataFrame(rows)


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


def aggregate(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and count over seeds, per model, in the table's model order."""
    order = list(dict.fromkeys(table["model"]))
    numeric = table[["model", *METRICS]].apply(lambda c: pd.to_numeric(c, errors="coerce") if c.name != "model" else c)
    grouped = numeric.groupby("model", sort=False)
    summary = grouped.agg(["mean", "std", "count"])
    return summary.loc[order]


def _cell(mean: float, std: float, count: int, signed: bool) -> str:
    if pd.isna(mean):
        return "-"
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return f"{text} ± {std:.3f}" if count > 1 and not pd.isna(std) else text


def markdown(table: pd.DataFrame, run_name: str, seeds: Sequence[int]) -> str:
    summary = aggregate(table)
    lines = [
        f"# Results: {run_name}",
        "",
        f"Held-out split of the preference dataset; students: mean ± standard deviation over seeds "
        f"{', '.join(map(str, seeds))} ({len(seeds)} run{'s' if len(seeds) > 1 else ''}), teachers trained once.",
        "",
        "| model | seeds | " + " | ".join(TABLE_COLUMNS.values()) + " |",
        "|---|---|" + "---|" * len(TABLE_COLUMNS),
    ]
    for model, values in summary.iterrows():
        count = int(values[("preference_accuracy", "count")])
        cells = [
            _cell(values[(key, "mean")], values[(key, "std")], int(values[(key, "count")]), key.startswith("margin"))
            for key in TABLE_COLUMNS
        ]
        lines.append(f"| {model} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_metrics(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = aggregate(table)
    figure, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.6), constrained_layout=True)
    for axis, key in zip(axes, METRICS):
        means, stds = summary[(key, "mean")], summary[(key, "std")].fillna(0.0)
        axis.bar(range(len(means)), means.fillna(0.0), yerr=stds, capsize=3,
                 color=["#8c8c8c" if "teacher" in model else "#1f77b4" for model in means.index])
        axis.set_xticks(range(len(means)), means.index, rotation=60, ha="right", fontsize=8)
        axis.set_title(TABLE_COLUMNS[key], fontsize=9)
        if key.startswith("margin"):
            axis.axhline(0.0, color="black", linewidth=0.6)
    figure.savefig(path)
    plt.close(figure)


def plot_losses(histories: Mapping[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(split_model(model)[0] for model in histories))
    columns = min(4, max(1, len(stages)))
    rows = (len(stages) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.8 * rows), squeeze=False, constrained_layout=True)
    for axis in axes.flat[len(stages):]:
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


def write_summary(results: str | os.PathLike, models: Sequence[str], run_name: str, teacher_seed: int,
                  seeds: Sequence[int], csv_path: Path, markdown_path: Path, metrics_plot: Path,
                  loss_plot: Path) -> str:
    """Write the CSV, the Markdown table and both plots; return the Markdown table."""
    results = Path(results)
    table = collect(results, models, run_name, teacher_seed)
    text = markdown(table, run_name, seeds)
    for path in (csv_path, markdown_path, metrics_plot, loss_plot):
        path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv_path, index=False)
    markdown_path.write_text(text)
    plot_metrics(table, metrics_plot)
    plot_losses(loss_histories(results, models), loss_plot)
    return text
