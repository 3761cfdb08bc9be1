"""Wall time and peak memory of every job of a finished run, and the results table.

Usage (after `snakemake --cores 2`):  python bench/stages.py [--workdir .]
Prints one Markdown table from Snakemake's `benchmarks/` (per stage; student stages per seed,
evaluations per model), with, for the training stages, their training seconds and the seconds
their (first) process took to reach its first step (from the model's manifest); then the run's
elapsed wall time from its newest Snakemake log, then results/summary.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from datetime import datetime
from pathlib import Path

ORDER = (
    "base_teacher",
    "generate_data",
    "ref_teacher",
    "dpo_teacher",
    "base_student",
    "teacher_topk",
    "student_sft",
    "student_generations",
    "advantage",
    "dckd",
    "adpa",
    "adpa_plus",
    "student_dpo",
)


def benchmarks(workdir: Path) -> list[tuple[str, float, float]]:
    rows = []
    for path in sorted((workdir / "benchmarks").rglob("*.tsv")):
        record = next(csv.DictReader(path.open(), delimiter="\t"))
        name = str(path.relative_to(workdir / "benchmarks").with_suffix(""))
        rows.append((name, float(record["s"]), float(record["max_rss"])))

    def key(row):
        name = row[0]
        stage = name.rsplit("/", 1)[-1]
        return (name.startswith("eval/"), ORDER.index(stage) if stage in ORDER else len(ORDER), name)

    return sorted(rows, key=key)


def training_seconds(workdir: Path, name: str) -> tuple[str, str, str]:
    """(train s, of which checkpoint saves, s before the first step) from the manifest of the model a
    training job published."""
    manifest = workdir / "results" / name / "adpa_manifest.json"
    if name.startswith("eval/") or not manifest.is_file():
        return "", "", ""
    metrics = json.loads(manifest.read_text()).get("metrics", {})
    if "train_seconds" not in metrics:
        return "", "", ""

    def shown(key: str) -> str:
        return "" if metrics.get(key) is None else f"{metrics[key]:.0f}"

    return shown("train_seconds"), shown("checkpoint_seconds"), shown("seconds_before_first_step")


def elapsed(workdir: Path) -> str:
    """First to last timestamp of the newest Snakemake log (the whole run, jobs in parallel included)."""
    logs = sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))
    if not logs:
        return "-"
    stamps = re.findall(r"^\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]", logs[-1].read_text(), flags=re.M)
    if len(stamps) < 2:
        return "-"
    first, last = (datetime.strptime(stamp, "%a %b %d %H:%M:%S %Y") for stamp in (stamps[0], stamps[-1]))
    return f"{(last - first).total_seconds():.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("."))
    args = parser.parse_args()
    rows = benchmarks(args.workdir)
    print("| job | wall s | train s | of which checkpoint saves s | s before first step | max RSS MB |")
    print("|---|---|---|---|---|---|")
    for name, seconds, rss in rows:
        train, saves, before = training_seconds(args.workdir, name)
        print(f"| {name} | {seconds:.0f} | {train} | {saves} | {before} | {rss:.0f} |")
    training = sum(s for name, s, _ in rows if not name.startswith("eval/"))
    evaluation = sum(s for name, s, _ in rows if name.startswith("eval/"))
    print(f"| **sum of stage jobs** | {training:.0f} | | | | |")
    print(f"| **sum of evaluate jobs** | {evaluation:.0f} | | | | |")
    print(f"| **run elapsed (newest Snakemake log)** | {elapsed(args.workdir)} | | | | |")
    summary = args.workdir / "results" / "summary.md"
    if summary.is_file():
        print()
        print(summary.read_text(), end="")


if __name__ == "__main__":
    main()
