"""The REF teacher's SFT step, side by side: the stage's own trainer against a plain PyTorch loop on
the same batches.

Usage (after a run of the embedded default; nothing else on the cores):
    python bench/sft_steps.py [--workdir .] [--steps 10] [--rounds 3]

bench/train_throughput.py divides a stage's tokens by its Trainer's train_runtime, measured in
the run, and times the plain loop later: setup inside train(), the first step's warm-up and the
machine's drift between the two moments all land in its ratio. Here both sides run now, each in
a fresh process, alternating (trainer, plain, plain, trainer, ...), on the batches the stage's
own data loader yields (padded, with their attention masks and completion labels):

- trainer: TRL's SFTTrainer as the stage builds it (`adpa.training.sft.sft_trainer`: the projected head,
  its metrics, logging, clipping, fused AdamW), each step timed by a callback;
- plain: the model's own forward with those labels (every position's logits, cross-entropy),
  backward, fused AdamW; no clipping, no logging;
- plain, projected head: the same loop with the stage's head (logits at the labelled positions
  only, adpa/modeling/lm_head.py): what the trainer computes, without the trainer.

Reports the median step of each process (the first step, a warm-up, left out), the per-round
ratio trainer/plain in tokens/s and its range over the rounds. Prints the CPU.
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
SIDES = ("trainer", "plain", "head")
sys.path.insert(0, str(REPO))


def batches_and_trainer(workdir: Path, steps: int):
    """The stage's own trainer (adpa.training.sft.sft_trainer) on the run's data, and its first batches."""
    from adpa.training.sft import sft_trainer
    from adpa.training.train import LaunchOptions, StageRun
    from adpa.workflow import config as configuration

    config = configuration.load_config(REPO / "config" / "config.yaml")
    params = configuration.stage_params(config, "ref_teacher")
    params["dataset"]["path"] = str(workdir / params["dataset"]["path"])
    scratch = Path("/tmp") / "adpa-bench-sft-steps"
    launch = LaunchOptions(False, 10_000, 1, 1, report_to=())
    run = StageRun("ref_teacher", params, configuration.params_json(params), "bench", scratch / "out", scratch, launch)
    base = str(workdir / "results" / "base_teacher")
    trainer, _, _ = sft_trainer(run, base)
    trainer.args.max_steps = steps
    loader = iter(trainer.get_train_dataloader())
    return [next(loader) for _ in range(steps)], trainer, params["precision"], base


def time_side(side: str, workdir: Path, steps: int, threads: int) -> dict:
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(threads)
    batches, trainer, precision, base = batches_and_trainer(workdir, steps)
    tokens = statistics.mean(batch["input_ids"].numel() for batch in batches)
    times: list[float] = []
    if side == "trainer":

        class StepClock(TrainerCallback):
            def on_step_begin(self, *args, **kwargs):
                self.started = time.perf_counter()

            def on_step_end(self, *args, **kwargs):
                times.append(time.perf_counter() - self.started)

        trainer.add_callback(StepClock())
        trainer.train()
    else:
        from adpa.modeling.lm_head import dense_lm_head
        from adpa.modeling.models import load_model
        from adpa.modeling.precision import autocast, resolve

        del trainer
        model = load_model(base, precision)
        model.config.use_cache = False
        head = {"fused_lm_head": True} if side == "head" else {}
        if head:
            dense_lm_head(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
        for batch in batches:
            started = time.perf_counter()
            with autocast(resolve(precision), "cpu"):
                loss = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    labels=batch["labels"],
                    **head,
                ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - started)
    return {"step": statistics.median(times[1:]), "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one process's side
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    if args.side:
        print(json.dumps(time_side(args.side, workdir, args.steps, args.threads)))
        return
    from bench.precision import cpu_model

    print(f"CPU: {cpu_model()}; the embedded default's ref_teacher batches, {args.steps} steps per process")
    print(
        "| round | trainer s/step | plain loop s/step | plain loop, projected head s/step | tokens/step"
        " | trainer / plain (tokens/s) | trainer / plain with the head |"
    )
    print("|---|---|---|---|---|---|---|")
    ratios, head_ratios = [], []
    for round_number in range(1, args.rounds + 1):
        measured = {}
        # Alternating which side goes first, so that a drift of the machine favours neither.
        for side in SIDES if round_number % 2 else SIDES[::-1]:
            command = [sys.executable, __file__, "--workdir", str(workdir), "--steps", str(args.steps)]
            command += ["--threads", str(args.threads), "--side", side]
            result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            if result.returncode != 0:
                raise SystemExit(f"{side}: failed\n{result.stderr[-3000:]}")
            measured[side] = json.loads(result.stdout.strip().splitlines()[-1])
        ratio = measured["plain"]["step"] / measured["trainer"]["step"]
        head_ratio = measured["head"]["step"] / measured["trainer"]["step"]
        ratios.append(ratio)
        head_ratios.append(head_ratio)
        print(
            f"| {round_number} | {measured['trainer']['step']:.3f} | {measured['plain']['step']:.3f} |"
            f" {measured['head']['step']:.3f} | {measured['trainer']['tokens']:.0f} | {ratio:.2f} | {head_ratio:.2f} |",
            flush=True,
        )
    for name, values in (("trainer / plain", ratios), ("trainer / plain with the projected head", head_ratios)):
        print(f"{name}: median {statistics.median(values):.2f}, range {min(values):.2f}–{max(values):.2f}")


if __name__ == "__main__":
    main()
