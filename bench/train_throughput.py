"""Each training stage's tokens/s against a plain PyTorch loop on the same model and batch shape.

Usage (after a run, with nothing else on the cores):  python bench/train_throughput.py [--workdir .] [--steps 3]

For every trained model under results/ it reads the stage's own throughput from its manifest
(train tokens incl. padding / train seconds, as the Trainer counted them, less the checkpoint saves
inside train(): the Trainer saves a resume point at the last step) and times a plain loop
on the published model: forward with the model's own loss, backward, AdamW step, at the batch
shape the stage trained with (sequences per step x mean tokens per sequence) and under the same
precision (adpa/modeling/precision.py), and once more in fp32 (what a CPU without AMX-BF16 runs). DPO's
loop also runs the frozen reference forward; DCKD/ADPA's batch holds both sequences of each pair.
The ratio says how much the trainer loses to data collation, logging, metrics and its loss
beyond the model's own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # adpa, from any working directory

PAIRED = ("dpo_teacher", "student_dpo", "dckd", "adpa", "adpa_plus")  # two sequences per example
DPO = ("dpo_teacher", "student_dpo")


def trained_models(results: Path) -> list[Path]:
    manifests = sorted(results.glob("*/adpa_manifest.json")) + sorted(results.glob("seed*/*/adpa_manifest.json"))
    return [path.parent for path in manifests if "train_seconds" in json.loads(path.read_text())["metrics"]]


def plain_loop_tokens_per_second(
    model_dir: Path, precision: str, sequences: int, length: int, steps: int, reference: bool
) -> float:
    from adpa.modeling.models import load_model
    from adpa.modeling.precision import autocast, resolve

    model = load_model(str(model_dir), precision)
    model.config.use_cache = False
    frozen = load_model(str(model_dir), precision).eval() if reference else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)  # the Trainer's default (adamw_torch_fused)
    ids = torch.randint(0, model.config.vocab_size, (sequences, length))

    def step() -> None:
        with autocast(resolve(precision), "cpu"):
            if frozen is not None:
                with torch.no_grad():
                    frozen(input_ids=ids)
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up: allocator, kernels
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return sequences * length * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("--steps", type=int, default=3, help="timed plain-loop steps per stage (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| stage | precision | steps | sequences x tokens per step | stage tok/s | plain loop tok/s | stage / plain"
        " | plain loop fp32 tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model_dir in trained_models(args.workdir / "results"):
        manifest = json.loads((model_dir / "adpa_manifest.json").read_text())
        stage, metrics, params = manifest["stage"], manifest["metrics"], manifest["params"]
        training = params["training"]
        sequences = training["per_device_batch_size"] * metrics["gradient_accumulation_steps"]
        sequences *= 2 if stage in PAIRED else 1
        tokens_per_step = metrics["train_tokens_incl_padding"] / metrics["global_step"]
        length = max(8, round(tokens_per_step / sequences))
        # The training loop's own time: the checkpoint saves inside train() are a resume point, not training.
        loop_seconds = metrics["train_seconds"] - metrics.get("checkpoint_seconds", 0.0)
        stage_rate = metrics["train_tokens_incl_padding"] / loop_seconds
        plain_rate = plain_loop_tokens_per_second(
            model_dir, params["precision"], sequences, length, args.steps, reference=stage in DPO
        )
        fp32_rate = plain_loop_tokens_per_second(
            model_dir, "fp32", sequences, length, args.steps, reference=stage in DPO
        )
        name = str(model_dir.relative_to(args.workdir / "results"))
        print(
            f"| {name} | {metrics.get('precision', params['precision'])} | {metrics['global_step']} |"
            f" {sequences} x {length} | {stage_rate:.0f} | {plain_rate:.0f} | {stage_rate / plain_rate:.2f} |"
            f" {fp32_rate:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
