"""Held-out evaluation on the generated task: greedy-answer accuracy (by the task verifier) and
preference accuracy (log pi(chosen) > log pi(rejected))."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adpa.inference import greedy_responses
from adpa.losses import sequence_logprobs
from adpa.sequences import pad_exchanges, pad_token_id, tokenize_exchange
from adpa.tasks import TaskExample, verify


@torch.no_grad()
def response_logprobs(model, tokenizer, prompts, responses, batch_size: int = 16, max_length: int = 4096) -> torch.Tensor:
    """Summed log-probability of each response given its prompt: [N]."""
    pad = pad_token_id(tokenizer)
    exchanges = [tokenize_exchange(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    totals = []
    for start in range(0, len(exchanges), batch_size):
        batch = pad_exchanges(exchanges[start : start + batch_size], pad)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        totals.append(sequence_logprobs(logits, batch["input_ids"][:, 1:], batch["response_mask"]))
    return torch.cat(totals)


def evaluate_model(model, tokenizer, test_rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """test_rows: the generated preference test split (chosen, rejected, family, answer)."""
    prompts = [row["chosen"][:-1] for row in test_rows]
    answers = greedy_responses(model, tokenizer, prompts, max_new_tokens=24, batch_size=16)
    correct = [
        verify(TaskExample(row["family"], row["chosen"][-2]["content"], row["answer"], ""), answer)
        for row, answer in zip(test_rows, answers)
    ]
    chosen = response_logprobs(model, tokenizer, prompts, [row["chosen"][-1:] for row in test_rows])
    rejected = response_logprobs(model, tokenizer, prompts, [row["rejected"][-1:] for row in test_rows])
    return {
        "accuracy": sum(correct) / len(correct),
        "preference_accuracy": (chosen > rejected).float().mean().item(),
        "preference_margin": (chosen - rejected).mean().item(),
    }
