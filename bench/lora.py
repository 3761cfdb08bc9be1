"""The REF teacher's SFT with and without LoRA: peak memory and tokens/s of the embedded default's stage.

Usage (after a run has written results/base_teacher and results/data; nothing else on the cores):
    python bench/lora.py [--workdir .] [--rank 16]

Runs the real stage (`python -m adpa ref_teacher`, the embedded default's config: one process, its
precision) twice into a scratch folder: full fine-tuning, then LoRA on every linear layer
(`ref_teacher.peft`, published merged). Memory is the stage process's resident set, sampled every
0.1 s: its peak while training (until the Trainer logs its closing train_loss) and over the whole
stage (for LoRA that includes loading the base again to merge the adapter, which on a GPU
machine happens in host memory). tokens/s is the manifest's train tokens over its train seconds
less the checkpoint saves. Prints the CPU and one table row per variant.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.precision import cpu_model  # noqa: E402


def run_stage(workdir: Path, scratch: Path, name: str, peft: dict | None) -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["datasets"]["sft"]["path"] = str(workdir / "results" / "data" / "sft")
    if peft:
        config["ref_teacher"]["peft"] = peft
    config_file = scratch / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    output = scratch / name
    command = [sys.executable, "-u", "-m", "adpa", "ref_teacher", "--configfile", str(config_file)]
    command += ["--model", str(workdir / "results" / "base_teacher"), "--output", str(output)]
    command += ["--work-dir", str(scratch / "work"), "--threads", "2"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[float] = []
    trained_at: list[int] = []  # the sample count when training ended

    def sample() -> None:
        status = Path(f"/proc/{process.pid}/status")
        while process.poll() is None:
            try:
                line = next(line for line in status.read_text().splitlines() if line.startswith("VmRSS"))
            except (OSError, StopIteration):
                break
            samples.append(int(line.split()[1]) / 2**20)  # kB -> GiB
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output_text = []
    for line in process.stdout:
        output_text.append(line)
        if "'train_loss'" in line and not trained_at:  # the Trainer's summary, after the last step
            trained_at.append(len(samples))
    process.wait()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{name}: the stage failed:\n{''.join(output_text)[-3000:]}")
    metrics = json.loads((output / "adpa_manifest.json").read_text())["metrics"]
    seconds = metrics["train_seconds"] - metrics.get("checkpoint_seconds", 0.0)
    return {
        "training_gib": max(samples[: trained_at[0]] if trained_at else samples),
        "peak_gib": max(samples),
        "tokens_per_second": metrics["train_tokens_incl_padding"] / seconds,
        "trainable": metrics.get("trainable_parameters", metrics["model_parameters"]),
        "parameters": metrics["model_parameters"],
        "loss": (metrics["train_loss_first"], metrics["train_loss_last"]),
        "eval_loss": metrics.get("eval_loss"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    print(f"CPU: {cpu_model()}; the embedded default's ref_teacher stage (config/config.yaml)")
    print(
        "| variant | trainable parameters | peak memory while training GiB | peak memory of the stage GiB | tokens/s"
        " | first / last train loss | held-out loss |"
    )
    print("|---|---|---|---|---|---|---|")
    variants = {"full fine-tuning": None, f"LoRA r {args.rank}, all linear": {"r": args.rank, "alpha": 2 * args.rank}}
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, peft) in enumerate(variants.items()):
            row = run_stage(workdir, Path(scratch), f"variant{index}", peft)
            eval_loss = f"{row['eval_loss']:.3f}" if row["eval_loss"] is not None else "-"
            print(
                f"| {name} | {row['trainable'] / 1e6:.2f}M of {row['parameters'] / 1e6:.1f}M |"
                f" {row['training_gib']:.2f} | {row['peak_gib']:.2f} | {row['tokens_per_second']:.0f} |"
                f" {row['loss'][0]:.3f} / {row['loss'][1]:.3f} | {eval_loss} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
