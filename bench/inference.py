"""Each inference stage's tokens/s against a plain batched forward of the same model over the same rows.

Usage (after a run of the embedded default, nothing else on the cores):
    python bench/inference.py [--workdir .] [--rounds 2] [--seed 42]

For the stages' own functions, on the run's models and data, in-process (no start-up, no loading):
- teacher_topk: the DPO teacher's top-k store of the chosen and the rejected responses of the train split;
- advantage: the DPO and REF teachers over the student's own responses (seed<N>/student_generations);
- evaluate: log pi(chosen), log pi(rejected) and the greedy answer on the held-out split, for the DPO
  teacher and the student_sft model, at 1 thread (as the main job runs two evaluations side by side)
  and at 2.
The plain batched forward is what such a stage would do without sharing anything: every row, prompt
included, right-padded in batches of the run's inference batch size, through the whole model, logits
at every position (evaluation's plain forward does not generate). Tokens are the rows' own tokens
(prompt + response, no padding), the same count for both columns. Each round runs plain then stage;
the table gives the faster round of each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from adpa.infer.generation import inference_autocast, load_for_inference  # noqa: E402
from adpa.modeling.precision import NATIVE_BF16_FLAGS, cpu_flags, resolve  # noqa: E402
from adpa.modeling.sequences import Exchange, pad_exchanges, pad_token_id, tokenize_rows  # noqa: E402


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


@torch.no_grad()
def plain_forward(models: Sequence, exchanges: Sequence[Exchange], pad_id: int, batch_size: int) -> None:
    for model in models:
        for start in range(0, len(exchanges), batch_size):
            batch = pad_exchanges(exchanges[start : start + batch_size], pad_id)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def best_seconds(run: Callable[[], None], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def row(stage: str, model: str, threads: int, tokens: int, plain: float, stage_seconds: float) -> str:
    return (
        f"| {stage} | {model} | {threads} | {tokens} | {tokens / plain:.0f} | {tokens / stage_seconds:.0f} |"
        f" {plain / stage_seconds:.2f} | {stage_seconds:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=32, help="the run's launch.inference_batch_size")
    args = parser.parse_args()
    os.chdir(args.workdir)  # the manifests name the data relative to the run
    results = Path("results")
    from adpa.infer.evaluate import load_test_rows, score_and_answer
    from adpa.infer.inference import write_advantage, write_teacher_topk
    from adpa.inputs.data import load_preference

    params = json.loads((results / "teacher_topk" / "adpa_manifest.json").read_text())["params"]
    precision = params["precision"]
    flags = sorted(cpu_flags() & NATIVE_BF16_FLAGS) or ["none"]
    print(f"CPU: {cpu_model()}; bf16 flags: {', '.join(flags)}; precision {precision} -> {resolve(precision).label}")
    print()
    print("| stage | model | threads | tokens | plain forward tok/s | stage tok/s | stage / plain | stage s |")
    print("|---|---|---|---|---|---|---|---|")
    torch.set_num_threads(2)
    dpo, tokenizer = load_for_inference(str(results / "dpo_teacher"), precision, False)
    ref = load_for_inference(str(results / "ref_teacher"), precision, False)[0]
    student = load_for_inference(str(results / f"seed{args.seed}" / "student_sft"), precision, False)[0]
    pad = pad_token_id(tokenizer)
    size = args.batch_size

    pairs = load_preference(params["dataset"], params["dataset"]["train_split"])
    responses = {
        column: tokenize_rows(tokenizer, pairs["prompt"], pairs[column], params["max_length"], column)
        for column in ("chosen", "rejected")
    }
    both = responses["chosen"] + responses["rejected"]
    tokens = sum(len(exchange.input_ids) for exchange in both)
    with inference_autocast(precision), tempfile.TemporaryDirectory() as scratch:
        plain = best_seconds(lambda: plain_forward([dpo], both, pad, size), args.rounds)
        stage = best_seconds(
            lambda: write_teacher_topk(dpo, responses, pad, params["k"], scratch, size, {}), args.rounds
        )
        print(row("teacher_topk", "dpo_teacher", 2, tokens, plain, stage), flush=True)

    import datasets

    own = datasets.load_from_disk(str(results / f"seed{args.seed}" / "student_generations"))
    answers = [[{"role": "assistant", "content": text}] for text in own["response"]]
    exchanges = tokenize_rows(tokenizer, own["prompt"], answers, params["max_length"], "own response")
    tokens = 2 * sum(len(exchange.input_ids) for exchange in exchanges)  # two teachers
    with inference_autocast(precision), tempfile.TemporaryDirectory() as scratch:
        plain = best_seconds(lambda: plain_forward([dpo, ref], exchanges, pad, size), args.rounds)
        stage = best_seconds(
            lambda: write_advantage(dpo, ref, exchanges, pad, params["k"], Path(scratch) / "store", size, {}),
            args.rounds,
        )
        print(row("advantage", "dpo + ref teachers", 2, tokens, plain, stage), flush=True)

    evaluation = json.loads((results / "eval" / "dpo_teacher" / "adpa_manifest.json").read_text())["params"]
    rows = load_test_rows(params["dataset"], evaluation["evaluation"]["split"])
    prompts = [r["prompt"] for r in rows]
    scored = [
        exchange
        for column in ("chosen", "rejected")
        for exchange in tokenize_rows(tokenizer, prompts, [r[column] for r in rows], 4096, column)
    ]
    tokens = sum(len(exchange.input_ids) for exchange in scored)
    new_tokens = evaluation["evaluation"]["max_new_tokens"]
    for name, model in (("dpo_teacher", dpo), (f"seed{args.seed}/student_sft", student)):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with inference_autocast(precision):
                plain = best_seconds(lambda: plain_forward([model], scored, pad, size), args.rounds)
                stage = best_seconds(lambda: score_and_answer(model, tokenizer, rows, new_tokens, size), args.rounds)
            print(row("evaluate", name, threads, tokens, plain, stage), flush=True)


if __name__ == "__main__":
    main()
