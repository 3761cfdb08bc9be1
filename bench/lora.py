"""The REF teacher's SFT with and without LoRA: peak memory and tokens/s of the embedded default's stage.

Usage (after a run has written results/base_teacher and results/data; nothing else on the cores):
    python bench/lora.py [--workdir .] [--rank 16]

Runs the real stage (`python -m adpa ref_teacher`, the embedded default's config: one process, its
precision) twice into a scratch folder: full fine-tuning, then LoRA on every linear layer
(`ref_teacher.peft`, published merged). Peak memory is the stage process's maximum resident set
(GNU time); tokens/s is the manifest's train tokens over its train seconds less the checkpoint
saves. Prints the CPU and one table row per variant.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
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
    output, memory = scratch / name, scratch / f"{name}.maxrss"
    command = ["/usr/bin/time", "-f", "%M", "-o", str(memory), sys.executable, "-m", "adpa", "ref_teacher"]
    command += ["--configfile", str(config_file), "--model", str(workdir / "results" / "base_teacher")]
    command += ["--output", str(output), "--work-dir", str(scratch / "work"), "--threads", "2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name}: the stage failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((output / "adpa_manifest.json").read_text())["metrics"]
    seconds = metrics["train_seconds"] - metrics.get("checkpoint_seconds", 0.0)
    return {
        "peak_gib": int(memory.read_text().split()[-1]) / 2**20,
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
    print("| variant | trainable parameters | peak memory GiB | tokens/s | first / last train loss | held-out loss |")
    print("|---|---|---|---|---|---|")
    variants = {"full fine-tuning": None, f"LoRA r {args.rank}, all linear": {"r": args.rank, "alpha": 2 * args.rank}}
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, peft) in enumerate(variants.items()):
            row = run_stage(workdir, Path(scratch), f"variant{index}", peft)
            eval_loss = f"{row['eval_loss']:.3f}" if row["eval_loss"] is not None else "-"
            print(
                f"| {name} | {row['trainable'] / 1e6:.2f}M of {row['parameters'] / 1e6:.1f}M |"
                f" {row['peak_gib']:.2f} | {row['tokens_per_second']:.0f} |"
                f" {row['loss'][0]:.3f} / {row['loss'][1]:.3f} | {eval_loss} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
