"""A stage process's start and exit, with Python's cyclic GC as it comes and as `python -m adpa`
runs it.

Usage (nothing else on the cores):  python bench/startup.py [--stage dckd] [--rounds 5]

Every job of the workflow is a fresh Python process (two for a training job, plus the launcher)
that imports torch, transformers, TRL and accelerate (~500k long-lived objects) and leaves the
interpreter at the end. Python's cyclic GC rescans those objects as they arrive (~1400
collections while importing) and once more at exit. `python -m adpa` pauses the GC while it
imports the stage's module and freezes what exists then (adpa/cli.py `_runner`), and freezes
everything again before it exits (adpa/__main__.py). Each round runs both variants, each in a
fresh process, in alternating order:

- python default: the stage's module imported with the GC as it comes, exit as it comes;
- adpa: the stage's module imported through `adpa.cli._runner` (the code the stages run), exit
  after `gc.freeze()` as `python -m adpa` does.

Both then import what a training rank imports next (DeepSpeed, TRL's trainers) with the GC on.
Prints the median seconds of each phase and the range over the rounds, and the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
VARIANTS = ("python default", "adpa")

CHILD = """
import gc, importlib, json, sys, time
variant, stage_name = sys.argv[1], sys.argv[2]
started = time.perf_counter()
from adpa.dag.stages import STAGES
stage = STAGES[stage_name]
if variant == "adpa":
    from adpa.cli import _runner
    _runner(stage)
else:
    getattr(importlib.import_module(stage.module), stage.function)
stage_module = time.perf_counter()
import deepspeed  # noqa: F401  (what a training rank imports next, GC on in both variants)
from trl import DPOTrainer, SFTTrainer  # noqa: F401
rest = time.perf_counter()
collections = sum(generation["collections"] for generation in gc.get_stats())
if variant == "adpa":
    gc.freeze()
print(json.dumps({"stage module": stage_module - started, "rest of the stack": rest - stage_module,
                  "collections": collections, "objects": len(gc.get_objects()) + gc.get_freeze_count(),
                  "exit from": time.time()}), flush=True)
"""


def measure(variant: str, stage: str) -> dict[str, float]:
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, variant, stage],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    output, _ = process.communicate()
    ended = time.time()
    if process.returncode != 0:
        raise SystemExit(f"the {variant} process failed (exit {process.returncode})")
    result = json.loads(output.strip().splitlines()[-1])
    result["exit"] = ended - result.pop("exit from")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", default="dckd", help="a stage of adpa/dag/stages.py (default: dckd)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from bench.precision import cpu_model

    print(f"CPU: {cpu_model()}; stage {args.stage}; {args.rounds} rounds, each variant in a fresh process")
    runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    for round_index in range(args.rounds):
        order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            runs[variant].append(measure(variant, args.stage))
    phases = ("stage module", "rest of the stack", "exit")
    print()
    print("| variant | GC collections while importing | " + " | ".join(f"{p} s" for p in phases) + " | sum s |")
    print("|---|---|" + "---|" * (len(phases) + 1))
    for variant, results in runs.items():
        cells = []
        for phase in (*phases, "sum"):
            values = [sum(r[p] for p in phases) if phase == "sum" else r[phase] for r in results]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})")
        collections = statistics.median(r["collections"] for r in results)
        print(f"| {variant} | {collections:.0f} | " + " | ".join(cells) + " |")
    objects = statistics.median(r["objects"] for r in runs["adpa"])
    print(f"\nMedian (range) over the rounds; {objects:,.0f} objects after the imports.")


if __name__ == "__main__":
    main()
