"""Per-step time of fp32, bf16 autocast (fp32 weights) and bf16 weights on this CPU: what `precision: auto` rests on.

Usage (nothing else on the cores):  python bench/precision.py [--workdir .] [--rounds 3]

Prints the CPU model and its bf16 flags, what `precision: auto` resolves to here, then one table:
the embedded default's teacher (results/base_teacher, 135M) and student (results/base_student, 64M;
random models of the same shapes when a run has not written them) timed on a training step
(forward, backward, AdamW; 16 x 64 tokens, the default's batch) and an inference forward (32 x 64
tokens, no grad), each mode once per round, interleaved, the median of the rounds reported with
its speed-up over fp32.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from adpa.modeling.precision import NATIVE_BF16_FLAGS, Precision, autocast, cpu_flags, resolve  # noqa: E402

MODES = {
    "fp32": Precision("fp32", "no"),
    "bf16 autocast": Precision("fp32", "bf16"),
    "bf16 weights": Precision("bf16", "bf16"),
}
TRAIN_SHAPE, INFERENCE_SHAPE = (16, 64), (32, 64)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load(workdir: Path, name: str, layers: int | None, dtype: torch.dtype):
    """The run's model folder, or a random model of the embedded default's shape (SmolLM2-135M, or its 10-layer cut)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = workdir / "results" / name
    if (folder / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers or 30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def timed(fn, rounds: int) -> list[float]:
    return [fn() for _ in range(rounds)]


def workload(model, precision: Precision, training: bool):
    shape = TRAIN_SHAPE if training else INFERENCE_SHAPE
    ids = torch.randint(0, model.config.vocab_size, shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6) if training else None

    def step() -> float:
        start = time.perf_counter()
        with autocast(precision, "cpu"):
            if training:
                loss = model(input_ids=ids, labels=ids).loss
            else:
                with torch.no_grad():
                    model(input_ids=ids)
        if training:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return time.perf_counter() - start

    step()  # warm-up: allocator, kernels
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    flags = cpu_flags()
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; native bf16 flags: {sorted(flags & NATIVE_BF16_FLAGS) or 'none'}"
    )
    print(f"precision: auto resolves here to {resolve('auto').label}\n")
    print(
        "| model | workload | tokens | "
        + " | ".join(f"{mode} s/step" for mode in MODES)
        + " | autocast speed-up | bf16 weights speed-up |"
    )
    print("|---|---|---|" + "---|" * (len(MODES) + 2))
    for name, layers in (("base_student", 10), ("base_teacher", None)):
        for training in (True, False):
            steps = {}
            for mode, precision in MODES.items():
                model = load(
                    args.workdir, name, layers, torch.bfloat16 if precision.weights == "bf16" else torch.float32
                )
                model.config.use_cache = False
                model.train(training)
                steps[mode] = workload(model, precision, training)
            seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
            for _ in range(args.rounds):  # interleaved: drift hits every mode alike
                for mode in MODES:
                    seconds[mode].append(steps[mode]())
            median = {mode: statistics.median(values) for mode, values in seconds.items()}
            shape = TRAIN_SHAPE if training else INFERENCE_SHAPE
            cells = " | ".join(f"{median[mode]:.2f}" for mode in MODES)
            print(
                f"| {name} | {'train step' if training else 'forward'} | {shape[0]}x{shape[1]} | {cells}"
                f" | {median['fp32'] / median['bf16 autocast']:.2f}x | {median['fp32'] / median['bf16 weights']:.2f}x |"
            )
    print(
        f"\nMedian of {args.rounds} interleaved rounds after one warm-up step each; speed-up = fp32 time / mode time."
    )


if __name__ == "__main__":
    main()
