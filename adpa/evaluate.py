"""Held-out evaluation on the generated task: greedy-answer accuracy (by the task verifier) and
preference accuracy (log pi(chosen) > log pi(rejected))."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adpa.tasks import TaskExample, verify


def _prompt_ids(tokenizer, prompts: Sequence[list[dict[str, str]]]) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for prompt in prompts
    ]


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[list[dict[str, str]]], max_new_tokens: int = 24, batch_size: int = 16) -> list[str]:
    """Greedy decoding, left-padded batches, stopping at EOS."""
    answers: list[str] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    all_ids = _prompt_ids(tokenizer, prompts)
    for start in range(0, len(all_ids), batch_size):
        batch = all_ids[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
        answers += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return answers


@torch.no_grad()
def response_logprobs(model, tokenizer, prompts, responses, batch_size: int = 16) -> torch.Tensor:
    """Summed log-probability of each response given its prompt: [N]."""
    totals = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        rows = []
        for prompt, response in zip(prompts[start : start + batch_size], responses[start : start + batch_size]):
            prompt_ids = _prompt_ids(tokenizer, [prompt])[0]
            full = tokenizer.apply_chat_template(prompt + response, tokenize=True, return_dict=True)["input_ids"]
            rows.append((full, len(prompt_ids)))
        width = max(len(full) for full, _ in rows)
        input_ids = torch.tensor([full + [pad] * (width - len(full)) for full, _ in rows])
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for index, (full, prompt_length) in enumerate(rows):
            mask[index, prompt_length : len(full)] = True
        attention = torch.tensor([[1] * len(full) + [0] * (width - len(full)) for full, _ in rows])
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
        token_logprobs = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        totals.append((token_logprobs * mask[:, 1:]).sum(-1))
    return torch.cat(totals)


def evaluate_model(model, tokenizer, test_rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """test_rows: the generated preference test split (chosen, rejected, family, answer)."""
    prompts = [row["chosen"][:-1] for row in test_rows]
    answers = greedy_answers(model, tokenizer, prompts)
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
