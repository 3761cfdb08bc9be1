"""Wall time, peak memory and held-out quality of every stage of a finished run.

Usage (after `snakemake --cores 2`):  python bench/models.py [--workdir .]
Prints one Markdown table: per stage the Snakemake benchmark (wall s, max RSS) and, for each
model, greedy-answer accuracy, preference accuracy and mean margin on the held-out split.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adpa.evaluate import evaluate_model

STAGES = (
    "generate_data", "base_teacher", "ref_teacher", "dpo_teacher", "base_student", "student_sft", "teacher_topk",
    "student_generations", "advantage", "dckd", "adpa", "adpa_plus", "student_dpo",
)
NOT_MODELS = ("generate_data", "teacher_topk", "student_generations", "advantage")


def benchmark(workdir: Path, stage: str) -> tuple[str, str]:
    path = workdir / "benchmarks" / f"{stage}.tsv"
    if not path.is_file():
        return "-", "-"
    row = next(csv.DictReader(path.open(), delimiter="\t"))
    return f"{float(row['s']):.0f}", f"{float(row['max_rss']):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("--rows", type=int, default=64, help="held-out rows to evaluate")
    args = parser.parse_args()
    torch.set_num_threads(2)
    test = datasets.load_from_disk(str(args.workdir / "results/data/preference"))["test"]
    rows = test.select(range(min(args.rows, len(test)))).to_list()
    total = 0.0
    print(f"| stage | wall s | max RSS MB | accuracy | pref. accuracy | pref. margin | eval s |")
    print("|---|---|---|---|---|---|---|")
    for stage in STAGES:
        wall, rss = benchmark(args.workdir, stage)
        total += float(wall) if wall != "-" else 0.0
        folder = args.workdir / "results" / stage
        quality = ["-", "-", "-", "-"]
        if stage not in NOT_MODELS and folder.is_dir():
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder)
            metrics = evaluate_model(model, tokenizer, rows)
            quality = [
                f"{metrics['accuracy']:.3f}",
                f"{metrics['preference_accuracy']:.3f}",
                f"{metrics['preference_margin']:+.2f}",
                f"{time.perf_counter() - start:.0f}",
            ]
        print(f"| {stage} | {wall} | {rss} | " + " | ".join(quality) + " |")
    print(f"| **all stages** | {total:.0f} |  |  |  |  |  |")


if __name__ == "__main__":
    main()
