"""Inference stages: the DPO teacher's top-k store and the advantage store (responses: adpa/generation.py).

Batched forward passes on the config's device; per-token work is vectorized over batch x time x k.
Rows are written in dataset order, so store row i belongs to dataset row i.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from adpa.errors import InputError
from adpa.generation import batches, inference_autocast, load_for_stage
from adpa.sequences import Exchange, pad_exchanges, pad_token_id, template_fingerprint, tokenize_rows
from adpa.topk_store import TopKStoreWriter


def _response_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log pi(. | s_t) at every label position: [B, L-1, V] float32."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits[
        :, :-1
    ]
    return torch.log_softmax(logits.float(), dim=-1)


def _rows(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> Iterator[torch.Tensor]:
    """Split [B, L-1, ...] into each row's response positions (response token order)."""
    for row, mask in enumerate(batch["response_mask"]):
        yield values[row][mask.to(values.device)]


@torch.no_grad()
def write_teacher_topk(
    model,
    exchanges: Sequence[Exchange],
    pad_id: int,
    k: int,
    store_dir: str | os.PathLike,
    batch_size: int,
    metadata: dict,
) -> None:
    """Per response token: the teacher's top-k ids and log-probs and the log of the remaining mass."""
    vocab = model.config.vocab_size
    with TopKStoreWriter(store_dir, k, vocab, kind="topk_logprobs", has_rest=True, metadata=metadata) as store:
        for chunk in batches(exchanges, batch_size, f"teacher top-{k} {Path(store_dir).name}"):
            batch = pad_exchanges(chunk, pad_id)
            logprobs = _response_logprobs(model, batch)
            top_logprobs, top_ids = logprobs.topk(k, dim=-1)
            # log(1 - sum top-k p) from the complement itself: exact even when the top-k hold ~all mass.
            rest = logprobs.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
            for ids, values, remaining in zip(_rows(top_ids, batch), _rows(top_logprobs, batch), _rows(rest, batch)):
                store.append(ids, values, remaining)


@torch.no_grad()
def write_advantage(
    dpo_model,
    ref_model,
    exchanges: Sequence[Exchange],
    pad_id: int,
    k: int,
    store_dir: str | os.PathLike,
    batch_size: int,
    metadata: dict,
) -> None:
    """A(s_t, a) = log pi_dpo(a|s_t) - log pi_ref(a|s_t) for a in the DPO teacher's top-k, signed;
    without `ref_model` (the ablation without the REF teacher) A(s_t, a) = log pi_dpo(a|s_t)."""
    vocab = dpo_model.config.vocab_size
    with TopKStoreWriter(store_dir, k, vocab, kind="advantage", has_rest=False, metadata=metadata) as store:
        for chunk in batches(exchanges, batch_size, "advantage"):
            batch = pad_exchanges(chunk, pad_id)
            dpo_top, top_ids = _response_logprobs(dpo_model, batch).topk(k, dim=-1)
            advantages = dpo_top
            if ref_model is not None:
                advantages = dpo_top - _response_logprobs(ref_model, batch).gather(-1, top_ids)
            for ids, advantage in zip(_rows(top_ids, batch), _rows(advantages, batch)):
                store.append(ids, advantage)


def run_teacher_topk(params: Mapping[str, Any], output: Path, *, model: str, batch_size: int) -> dict:
    """Stores `chosen/` and `rejected/`: row i holds the response tokens of preference row i."""
    from adpa.data import load_preference

    dataset = params["dataset"]
    pairs = load_preference(dataset, dataset["train_split"])
    teacher, tokenizer = load_for_stage(model, params)
    metadata = {
        "model": model,
        "template": template_fingerprint(tokenizer),
        "max_length": params["max_length"],
    }
    tokens = 0
    for column in ("chosen", "rejected"):
        exchanges = tokenize_rows(tokenizer, pairs["prompt"], pairs[column], params["max_length"], column)
        with inference_autocast(params["precision"]):
            write_teacher_topk(
                teacher, exchanges, pad_token_id(tokenizer), params["k"], output / column, batch_size, metadata
            )
        tokens += sum(exchange.response_length for exchange in exchanges)
    return {"rows": len(pairs), "response_tokens": tokens}


def run_advantage(
    params: Mapping[str, Any],
    output: Path,
    *,
    model: str,
    generations: Path,
    batch_size: int,
    ref_model: str | None = None,
) -> dict:
    """Advantage of the DPO teacher (`model`) over the REF teacher at the states of the student's own
    responses; with `reference: false`, the DPO teacher's log-probs alone (no `ref_model`)."""
    import datasets

    if params["reference"] != (ref_model is not None):
        raise InputError(
            "advantage: --ref-model is needed with reference: true and not allowed with reference: false "
            f"(got reference: {str(params['reference']).lower()}, --ref-model {ref_model!r})"
        )
    own = datasets.load_from_disk(str(generations))
    dpo_teacher, tokenizer = load_for_stage(model, params)
    ref_teacher = load_for_stage(ref_model, params)[0] if ref_model is not None else None
    responses = [[{"role": "assistant", "content": text}] for text in own["response"]]
    exchanges = tokenize_rows(tokenizer, own["prompt"], responses, params["max_length"], "own response")
    metadata = {
        "dpo_teacher": model,
        "ref_teacher": ref_model,
        "reference": params["reference"],
        "template": template_fingerprint(tokenizer),
    }
    with inference_autocast(params["precision"]):
        write_advantage(
            dpo_teacher, ref_teacher, exchanges, pad_token_id(tokenizer), params["k"], output, batch_size, metadata
        )
    return {"rows": len(exchanges), "response_tokens": sum(e.response_length for e in exchanges)}
