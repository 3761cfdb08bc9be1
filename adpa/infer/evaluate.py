"""Held-out evaluation of one model (rule evaluate).

On the preference test split: greedy answers judged by the task verifier (when rows carry their
task family), and preference accuracy and margin of log pi(chosen) against log pi(rejected),
per sequence and per token. Optionally, answers to AlpacaEval and MT-Bench, written in the formats
those judges read. The verifier's per-row judgements are kept, so the summary can compute win rates.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adpa.core.results import ANSWERS_FILE, METRICS_FILE
from adpa.infer.generation import greedy_responses
from adpa.infer.judges import REQUIRED_KEYS, read_records
from adpa.modeling.prompt_cache import Prompts, continuation_logits, encode_prompts
from adpa.modeling.sequences import pad_right, pad_token_id, tokenize_rows

ALPACA_EVAL_FILE = "alpaca_eval/model_outputs.json"
Message = dict[str, str]


def load_test_rows(dataset: Mapping[str, Any], split: str | None = None) -> list[dict[str, Any]]:
    """The held-out preference rows (or `split`'s), normalized, with `family` and `answer` when the source has them."""
    from adpa.inputs.data import DataError, load_preference

    split = split or dataset["test_split"]
    if split is None:
        raise DataError(
            f"dataset '{dataset['path']}': evaluation needs a held-out split (datasets.preference.test_split)"
        )
    return load_preference(dataset, split, keep=("family", "answer")).to_list()


def judge(rows: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> list[bool | None]:
    """The verifier's verdict per row; None where a row names no task family (e.g. dpo-mix-7k)."""
    from adpa.inputs.tasks import TaskExample, verify

    verdicts: list[bool | None] = []
    for row, response in zip(rows, responses):
        if row.get("family") is None or row.get("answer") is None:
            verdicts.append(None)
        else:
            verdicts.append(
                verify(TaskExample(row["family"], row["prompt"][-1]["content"], row["answer"], ""), response)
            )
    return verdicts


def _summed_logprobs(model, prompts: Prompts, responses: Sequence[list[int]], pad: int) -> torch.Tensor:
    """Summed log-probability of each response token list, continuing the cached prompts."""
    logits, mask = continuation_logits(model, prompts, responses, pad)
    ids = pad_right(responses, pad)[0].to(logits.device)
    logprobs = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    return torch.where(mask, logprobs, 0).sum(-1).cpu()


@torch.no_grad()
def score_and_answer(
    model, tokenizer, rows: Sequence[Mapping[str, Any]], max_new_tokens: int, batch_size: int, max_length: int = 4096
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy answers and log pi(chosen), log pi(rejected) with their token counts, over [N] rows.

    Each batch of prompts runs through the model once: the greedy answer and both responses
    continue from its cache (the prompt is ~85% of a held-out row's tokens).
    """
    pad = pad_token_id(tokenizer)
    prompts = [row["prompt"] for row in rows]
    chosen = tokenize_rows(tokenizer, prompts, [row["chosen"] for row in rows], max_length, "chosen")
    rejected = tokenize_rows(tokenizer, prompts, [row["rejected"] for row in rows], max_length, "rejected")
    answers: list[str] = []
    chosen_sums, rejected_sums = [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="evaluate", unit="batch"):
        batch_chosen, batch_rejected = chosen[start : start + batch_size], rejected[start : start + batch_size]
        encoded = encode_prompts(model, [e.input_ids[: e.response_start] for e in batch_chosen], pad)
        for exchanges, sums in ((batch_chosen, chosen_sums), (batch_rejected, rejected_sums)):
            responses = [exchange.input_ids[exchange.response_start :] for exchange in exchanges]
            sums.append(_summed_logprobs(model, encoded, responses, pad))
        # generate() runs the last prompt token itself, so the cache gives it all but that one.
        cache = encoded.cache
        cache.crop(-1)
        generated = model.generate(
            input_ids=encoded.ids,
            attention_mask=encoded.mask,
            cache=cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
        answers += [
            text.strip()
            for text in tokenizer.batch_decode(generated[:, encoded.ids.shape[1] :], skip_special_tokens=True)
        ]
    counts = [torch.tensor([float(e.response_length) for e in exchanges]) for exchanges in (chosen, rejected)]
    return answers, torch.cat(chosen_sums), counts[0], torch.cat(rejected_sums), counts[1]


def evaluate_model(
    model, tokenizer, rows: Sequence[Mapping[str, Any]], max_new_tokens: int, batch_size: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics over the held-out rows, and one answer record per row.

    A record holds the row's greedy response, the verifier's verdict (`correct`, None without a task
    family), and log pi(chosen), log pi(rejected) summed over their response tokens with the token counts.
    """
    responses, chosen, chosen_tokens, rejected, rejected_tokens = score_and_answer(
        model, tokenizer, rows, max_new_tokens, batch_size
    )
    verdicts = judge(rows, responses)
    per_token = chosen / chosen_tokens - rejected / rejected_tokens
    judged = [verdict for verdict in verdicts if verdict is not None]
    metrics = {
        "rows": len(rows),
        "accuracy": sum(judged) / len(judged) if judged else None,
        "preference_accuracy": (chosen > rejected).float().mean().item(),
        "preference_accuracy_per_token": (per_token > 0).float().mean().item(),
        "margin": (chosen - rejected).mean().item(),
        "margin_per_token": per_token.mean().item(),
        "empty_answers": sum(not response for response in responses),
    }
    # Per-row log-probs and token counts, so the summary can bootstrap every metric over rows.
    scores = zip(chosen.tolist(), rejected.tolist(), chosen_tokens.tolist(), rejected_tokens.tolist())
    answers = [
        {
            "row": index,
            "family": row.get("family"),
            "answer": row.get("answer"),
            "response": response,
            "correct": verdict,
            "chosen_logprob": chosen_sum,
            "rejected_logprob": rejected_sum,
            "chosen_tokens": int(chosen_count),
            "rejected_tokens": int(rejected_count),
        }
        for index, (row, response, verdict, (chosen_sum, rejected_sum, chosen_count, rejected_count)) in enumerate(
            zip(rows, responses, verdicts, scores, strict=True)
        )
    ]
    return metrics, answers


def alpaca_eval_outputs(
    model, tokenizer, instructions_path: str, generator: str, max_new_tokens: int, batch_size: int
) -> list[dict[str, Any]]:
    """AlpacaEval's model_outputs.json records: instruction, output, generator (and dataset)."""
    records = read_records(instructions_path, REQUIRED_KEYS["alpaca_eval"])
    prompts = [[{"role": "user", "content": record["instruction"]}] for record in records]
    outputs = greedy_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [
        {
            "instruction": record["instruction"],
            "output": output,
            "generator": generator,
            **({"dataset": record["dataset"]} if "dataset" in record else {}),
        }
        for record, output in zip(records, outputs)
    ]


def mt_bench_answers(
    model, tokenizer, questions_path: str, model_id: str, max_new_tokens: int, batch_size: int
) -> list[dict[str, Any]]:
    """FastChat model_answer records; each turn is answered with the earlier turns and answers as context."""
    questions = read_records(questions_path, REQUIRED_KEYS["mt_bench"])
    conversations: list[list[Message]] = [[] for _ in questions]
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(question["turns"]) for question in questions)):
        active = [i for i, question in enumerate(questions) if turn < len(question["turns"])]
        for i in active:
            conversations[i].append({"role": "user", "content": questions[i]["turns"][turn]})
        replies = greedy_responses(model, tokenizer, [conversations[i] for i in active], max_new_tokens, batch_size)
        for i, reply in zip(active, replies):
            conversations[i].append({"role": "assistant", "content": reply})
            answers[i].append(reply)
    return [
        {
            "question_id": question["question_id"],
            "answer_id": uuid.uuid4().hex,
            "model_id": model_id,
            "choices": [{"index": 0, "turns": turns}],
            "tstamp": time.time(),
        }
        for question, turns in zip(questions, answers)
    ]


def model_id(run_name: str, model_name: str) -> str:
    """A file-name-safe id for the judges: run name plus the model's path under results/."""
    return f"{run_name}-{model_name.replace('/', '-')}"


def run_evaluate(
    params: Mapping[str, Any], output: Path, *, model: str, name: str, run_name: str, batch_size: int
) -> dict[str, Any]:
    """Write metrics.json, answers.jsonl and the optional judge inputs of model `name` into `output`."""
    from adpa.infer.generation import inference_autocast, load_for_inference

    role = "teacher" if name in params["teachers"] else "student"  # whose trust_remote_code applies
    settings = params["evaluation"]
    rows = load_test_rows(params["dataset"], settings.get("split"))
    # Only the base teacher can be a hub id (every other model is a folder under results/).
    revision = params.get("base_teacher_revision") if name == "base_teacher" else None
    loaded, tokenizer = load_for_inference(model, params["precision"], params["trust_remote_code"][role], revision)
    with inference_autocast(params["precision"]):
        metrics, answers = evaluate_model(loaded, tokenizer, rows, settings["max_new_tokens"], batch_size)
    metrics = {"model": name, **metrics}
    with open(output / ANSWERS_FILE, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(answer) + "\n" for answer in answers)
    identity = model_id(run_name, name)
    if settings["alpaca_eval"]:
        outputs = alpaca_eval_outputs(
            loaded, tokenizer, settings["alpaca_eval"], identity, settings["answer_max_new_tokens"], batch_size
        )
        target = output / ALPACA_EVAL_FILE
        target.parent.mkdir(parents=True)
        target.write_text(json.dumps(outputs, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        metrics["alpaca_eval_answers"] = len(outputs)
    if settings["mt_bench"]:
        records = mt_bench_answers(
            loaded, tokenizer, settings["mt_bench"], identity, settings["answer_max_new_tokens"], batch_size
        )
        target = output / "mt_bench" / "model_answer" / f"{identity}.jsonl"
        target.parent.mkdir(parents=True)
        with open(target, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        metrics["mt_bench_answers"] = len(records)
    (output / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
