"""The table and plot of one parameter sweep (rule sweep_summary): each value of a setting against the config's own.

A sweep varies one setting over values. Each point's student models were evaluated into
results/<point folder>/eval/seed<N>/<model>; the config's own value (the baseline point, folder null)
is the main run's results/eval/seed<N>/<model>. Per model and value the sweep reports what the results
table reports (adpa.report.summary): each metric's mean with its percentile bootstrap interval over held-out
rows and seeds, the win rate against the main run's student_sft of the same seed, and the paired
difference against the baseline point of the same model on the same rows and seeds.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from adpa.core.errors import InputError
from adpa.core.results import ANSWERS_FILE, METRICS_FILE, read_evaluation
from adpa.report.stats import CONFIDENCE, RESAMPLES
from adpa.report.summary import (
    BASELINE,
    METRICS,
    TABLE_COLUMNS,
    Evaluation,
    _plural,
    collect,
    interval_cell,
    model_intervals,
    paired_differences,
    rows_by_stage,
    split_description,
)

CONFIG_LABEL = "config"
# Log x where the positive values span more than this factor (two orders of magnitude).
LOG_SPAN = 100.0


def _columns(metric: str) -> list[str]:
    """The CSV columns of one metric: mean and interval, then the paired difference against the baseline point."""
    return [
        metric,
        f"{metric}_low",
        f"{metric}_high",
        f"{metric}_difference",
        f"{metric}_difference_low",
        f"{metric}_difference_high",
    ]


CSV_COLUMNS = [
    "sweep",
    "setting",
    "model",
    "value",
    "is_baseline",
    "seeds",
    "rows",
    *(column for metric in METRICS for column in _columns(metric)),
]


def baseline_index(params: Mapping[str, Any]) -> int:
    """The position of the config's own value among the points (the one point without a folder)."""
    points = params["points"]
    found = [index for index, point in enumerate(points) if point.get("folder") is None]
    if len(found) != 1:
        raise InputError(
            f"sweep {params['name']}: {len(found)} points without a folder; exactly one, the config's own "
            f"value of {params['setting']}, is the baseline"
        )
    value = points[found[0]]["value"]
    if "baseline" in params and params["baseline"] != value:
        raise InputError(
            f"sweep {params['name']}: baseline {params['baseline']!r} is not the value {value!r} of the point "
            "without a folder"
        )
    return found[0]


def evaluation_folder(results: Path, point: Mapping[str, Any], seed: int, model: str) -> Path:
    """results/eval/seed<N>/<model> for the baseline point, results/<folder>/eval/seed<N>/<model> for the others."""
    root = results if point.get("folder") is None else results / point["folder"]
    return root / "eval" / f"seed{seed}" / model


def _held_out_rows(answers: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """What identifies the held-out rows an evaluation answered: row index, task family, reference answer."""
    return [
        (answer.get("row", index), answer.get("family"), answer.get("answer")) for index, answer in enumerate(answers)
    ]


def _read(folder: Path, sweep: str, what: str) -> Evaluation:
    missing = [name for name in (METRICS_FILE, ANSWERS_FILE) if not (folder / name).is_file()]
    if missing:
        raise InputError(
            f"sweep {sweep}: no evaluation of {what} in {folder} (no {' or '.join(missing)}); run its evaluate job"
        )
    return read_evaluation(folder)


def read_sweep(params: Mapping[str, Any], results: Path) -> list[dict[str, Evaluation]]:
    """Per point, in order: 'seed<N>/<model>' -> evaluation of each swept model and seed, and of the main run's
    student_sft of each seed (the win rate's opponent, as in the results table).

    Raises InputError naming the folder of a missing evaluation, or of one whose held-out rows differ from
    the others' (the paired differences compare the same rows).
    """
    name, setting = params["name"], params["setting"]
    read: dict[Path, Evaluation] = {}

    def evaluation(folder: Path, what: str) -> Evaluation:
        if folder not in read:
            read[folder] = _read(folder, name, what)
        return read[folder]

    opponents = {
        f"seed{seed}/{BASELINE}": evaluation(
            results / "eval" / f"seed{seed}" / BASELINE, f"{BASELINE} (seed {seed}, the win rate's opponent)"
        )
        for seed in params["seeds"]
    }
    points = []
    for point in params["points"]:
        evaluations = dict(opponents)
        for model in params["models"]:
            for seed in params["seeds"]:
                folder = evaluation_folder(results, point, seed, model)
                what = f"{model} (seed {seed}, {setting} = {point['value']})"
                evaluations[f"seed{seed}/{model}"] = evaluation(folder, what)
        points.append(evaluations)
    (reference, (_, answers)), *others = read.items()
    rows = _held_out_rows(answers)
    for folder, (_, other) in others:
        if _held_out_rows(other) != rows:
            raise InputError(
                f"sweep {name}: {folder} and {reference} answered different held-out rows "
                f"({len(other)} and {len(rows)} rows); the paired comparison needs the same rows"
            )
    return points


def _key(model: str, point: int) -> str:
    """A model at one point, as a model name of adpa.report.summary's paired differences."""
    return f"{model}@{point}"


def sweep_table(params: Mapping[str, Any], results: Path) -> pd.DataFrame:
    """One row per model and value, in the columns CSV_COLUMNS."""
    models, seeds, points = params["models"], params["seeds"], params["points"]
    baseline = baseline_index(params)
    intervals, stages = [], {}
    for index, (point, evaluations) in enumerate(zip(points, read_sweep(params, results))):
        root = results if point.get("folder") is None else results / point["folder"]
        # Every model here has a seed: collect's teacher seed is not used.
        table = collect(root, evaluations, params.get("run_name", ""), seeds[0])
        by_stage = rows_by_stage(evaluations)
        intervals.append(model_intervals(table, by_stage))
        stages.update({_key(model, index): by_stage[model] for model in models})
    comparisons = [
        (_key(model, index), _key(model, baseline))
        for model in models
        for index in range(len(points))
        if index != baseline
    ]
    paired = paired_differences(stages, comparisons).set_index(["model", "metric"])
    records = []
    for model in models:
        for index, point in enumerate(points):
            values = intervals[index].loc[model]
            record: dict[str, Any] = {
                "sweep": params["name"],
                "setting": params["setting"],
                "model": model,
                "value": point["value"],
                "is_baseline": index == baseline,
                "seeds": int(values["seeds"]),
                "rows": int(values["rows"]),
            }
            for metric in METRICS:
                record.update({column: values[column] for column in _columns(metric)[:3]})
                difference = (
                    paired.loc[(_key(model, index), metric)]
                    if index != baseline
                    else pd.Series({"difference": math.nan, "low": math.nan, "high": math.nan})
                )
                record.update(
                    {
                        f"{metric}_difference": difference["difference"],
                        f"{metric}_difference_low": difference["low"],
                        f"{metric}_difference_high": difference["high"],
                    }
                )
            records.append(record)
    return pd.DataFrame(records, columns=CSV_COLUMNS)


def value_label(value: Any, baseline: bool) -> str:
    """The swept value as a table and plot label; the config's own marked '(config)'."""
    return f"{value} ({CONFIG_LABEL})" if baseline else str(value)


def _excludes_zero(low: float, high: float) -> bool:
    return not (pd.isna(low) or pd.isna(high)) and (low > 0 or high < 0)


def markdown(table: pd.DataFrame, params: Mapping[str, Any]) -> str:
    """A title, a legend, and per model a table: per value each metric's mean [interval] and Δ against the config."""
    level = f"{CONFIDENCE:.0%}"
    seeds = params["seeds"]
    baseline = params["points"][baseline_index(params)]["value"]
    setting = params["setting"]
    lines = [
        f"# Sweep {params['name']}: {setting} (config: {baseline})",
        "",
        f"Run {params.get('run_name', '')}. {split_description(params.get('split'))}; students: seeds {', '.join(map(str, seeds))} "
        f"({_plural(len(seeds), 'run')}) per value. Each cell: mean [{level} interval], a percentile bootstrap "
        f"({RESAMPLES} resamples) over held-out rows and seeds; Δ: the paired difference against {setting} = "
        f"{baseline} (the main run) of the same model on the same rows and seeds, **bold** where its interval "
        "excludes 0. Win rate against the main run's student_sft of the same seed, a tie counting half.",
    ]
    header = " | ".join(f"{name} | Δ {name}" for name in TABLE_COLUMNS.values())
    for model, runs in table.groupby("model", sort=False):
        lines += [
            "",
            f"## {model}",
            "",
            f"| {setting} | seeds | rows | {header} |",
            "|---|---|---|" + "---|---|" * len(TABLE_COLUMNS),
        ]
        for _, run in runs.iterrows():
            cells = []
            for key in TABLE_COLUMNS:
                mean, low, high, difference, difference_low, difference_high = (run[c] for c in _columns(key))
                cells.append(interval_cell(mean, low, high, key.startswith("margin")))
                marked = _excludes_zero(difference_low, difference_high)
                cells.append(interval_cell(difference, difference_low, difference_high, signed=True, marked=marked))
            label = value_label(run["value"], bool(run["is_baseline"]))
            lines.append(f"| {label} | {int(run['seeds'])} | {int(run['rows'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def plot_sweep(table: pd.DataFrame, params: Mapping[str, Any], path: Path) -> None:
    """One panel per metric: per model the mean against the swept value, its interval shaded; the config dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [point["value"] for point in params["points"]]
    baseline = baseline_index(params)
    numeric = all(_is_number(value) for value in values)
    # Numbers at their values; anything else (strings, booleans) evenly spaced in the given order.
    positions = [float(value) for value in values] if numeric else list(range(len(values)))
    columns = min(3, len(METRICS))
    rows = (len(METRICS) + columns - 1) // columns
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.0 * columns, 3.2 * rows), squeeze=False, constrained_layout=True
    )
    for axis in axes.flat[len(METRICS) :]:
        axis.set_visible(False)
    for axis, key in zip(axes.flat, METRICS):
        for model, runs in table.groupby("model", sort=False):
            # A model's rows come in the points' order (sweep_table).
            (line,) = axis.plot(positions, runs[key].astype(float), marker="o", markersize=4, label=model)
            axis.fill_between(
                positions,
                runs[f"{key}_low"].astype(float),
                runs[f"{key}_high"].astype(float),
                color=line.get_color(),
                alpha=0.2,
            )
        axis.axvline(positions[baseline], color="black", linestyle="--", linewidth=0.8, label=CONFIG_LABEL)
        axis.text(
            positions[baseline], 1.0, f" {CONFIG_LABEL}", transform=axis.get_xaxis_transform(), fontsize=7, va="top"
        )
        if key.startswith("margin"):
            axis.axhline(0.0, color="gray", linewidth=0.5)
        if numeric:
            positive = [value for value in positions if value > 0]
            if min(positions) >= 0 and len(positive) > 1 and max(positive) > LOG_SPAN * min(positive):
                if len(positive) == len(positions):
                    axis.set_xscale("log")
                else:
                    # Linear from 0 to the smallest positive value, logarithmic above; no negative side.
                    axis.set_xscale("symlog", linthresh=min(positive))
                    axis.set_xlim(left=-0.3 * min(positive))
        else:
            axis.set_xticks(positions, [str(value) for value in values], fontsize=8)
        axis.set_title(f"{TABLE_COLUMNS[key]} ({CONFIDENCE:.0%} interval)", fontsize=9)
        axis.set_xlabel(params["setting"], fontsize=8)
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(f"sweep {params['name']}: {params['setting']}", fontsize=10)
    figure.savefig(path)
    plt.close(figure)


def write_sweep_summary(
    params: Mapping[str, Any], results: str | os.PathLike, csv_path: Path, markdown_path: Path, plot_path: Path
) -> str:
    """Write the CSV, the Markdown tables and the plot of one sweep; return the Markdown."""
    table = sweep_table(params, Path(results))
    text = markdown(table, params)
    for path in (csv_path, markdown_path, plot_path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv_path, index=False)
    Path(markdown_path).write_text(text)
    plot_sweep(table, params, Path(plot_path))
    return text


def run_sweep_summary(
    params: Mapping[str, Any],
    output: Path | None = None,
    *,
    results: Path,
    csv: Path,
    markdown: Path,
    plot: Path,
) -> dict[str, Any]:
    """Stage sweep_summary: the sweep's CSV, Markdown (printed as well) and plot, written where named (as summary
    writes its files itself; `output` is not used)."""
    text = write_sweep_summary(params, results, csv, markdown, plot)
    print(text, end="")
    return {
        "sweep": params["name"],
        "setting": params["setting"],
        "points": len(params["points"]),
        "models": list(params["models"]),
        "seeds": list(params["seeds"]),
    }
