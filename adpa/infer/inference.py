"""Inference stages: the DPO teacher's top-k store and the advantage store (responses: adpa/infer/generation.py).

Batched forward passes on the config's device; per-token work is vectorized over batch x time x k.
Each prompt runs once (chosen and rejected continue from its cache) and the head projects the
response positions only: prompts are ~90% of a row's tokens in the embedded default.
Rows are written in dataset order, so store row i belongs to dataset row i.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from adpa.core.errors import InputError
from adpa.infer.generation import batches, inference_autocast, load_for_stage
from adpa.modeling.lm_head import positions_logits
from adpa.modeling.prompt_cache import continuation_logits, encode_prompts
from adpa.modeling.sequences import (
    Exchange,
    pad_exchanges,
    pad_token_id,
    response_positions,
    template_fingerprint,
    tokenize_rows,
)
from adpa.training.topk_store import TopKStoreWriter


def _whole_rows_logprobs(model, exchanges: Sequence[Exchange], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    batch = pad_exchanges(exchanges, pad_id)
    positions, mask = response_positions(exchanges, batch["input_ids"].shape[1])
    logits, _ = positions_logits(
        model,
        positions.to(device),
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        use_cache=False,
    )
    return torch.log_softmax(logits.float(), -1), mask.to(device)


def response_logprobs(
    model, responses: Mapping[str, Sequence[Exchange]], pad_id: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """log pi(. | s_t) [B, R, V] float32 at every response token of each named response set, with the
    mask [B, R]. The sets answer the same prompts row by row (chosen and rejected): each prompt runs
    once and every set continues from its cache; a single set runs as whole rows."""
    names = list(responses)
    first = responses[names[0]]
    if len(names) == 1:  # nothing to share: one forward of the whole rows, no cache
        return {names[0]: _whole_rows_logprobs(model, first, pad_id)}
    for name in names[1:]:
        for row, (a, b) in enumerate(zip(first, responses[name], strict=True)):
            if a.input_ids[: a.response_start] != b.input_ids[: b.response_start]:
                raise InputError(f"{names[0]} and {name} row {row}: different prompts cannot share a forward")
    prompts = encode_prompts(model, [e.input_ids[: e.response_start] for e in first], pad_id)
    result = {}
    for index, name in enumerate(names):
        answers = [e.input_ids[e.response_start :] for e in responses[name]]
        logits, mask = continuation_logits(model, prompts, answers, pad_id, keep_cache=index < len(names) - 1)
        result[name] = (torch.log_softmax(logits.float(), -1), mask)
    return result


def _row_batches(responses: Mapping[str, Sequence[Exchange]], size: int, description: str):
    """The response sets cut into batches of `size` rows, in row order."""
    count = len(next(iter(responses.values())))
    for rows in batches(range(count), size, description):
        yield {name: exchanges[rows.start : rows.stop] for name, exchanges in responses.items()}


@torch.no_grad()
def write_teacher_topk(
    model,
    responses: Mapping[str, Sequence[Exchange]],
    pad_id: int,
    k: int,
    output: str | os.PathLike,
    batch_size: int,
    metadata: dict,
) -> None:
    """Per response token of each named set (e.g. chosen and rejected, which share their prompts):
    the teacher's top-k ids and log-probs and the log of the remaining mass, in store `output/<name>`."""
    vocab = model.config.vocab_size
    with contextlib.ExitStack() as stack:
        stores = {
            name: stack.enter_context(
                TopKStoreWriter(Path(output) / name, k, vocab, kind="topk_logprobs", has_rest=True, metadata=metadata)
            )
            for name in responses
        }
        for chunk in _row_batches(responses, batch_size, f"teacher top-{k} {', '.join(responses)}"):
            for name, (logprobs, mask) in response_logprobs(model, chunk, pad_id).items():
                top_logprobs, top_ids = logprobs.topk(k, dim=-1)
                # log(1 - sum top-k p) from the complement itself: exact even when the top-k hold ~all mass.
                rest = logprobs.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
                for row, length in enumerate(mask.sum(-1).tolist()):
                    stores[name].append(top_ids[row, :length], top_logprobs[row, :length], rest[row, :length])
        for store in stores.values():  # in order (the exit stack would close the last first)
            store.close()


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
        for chunk in _row_batches({"own": exchanges}, batch_size, "advantage"):
            logprobs, mask = response_logprobs(dpo_model, chunk, pad_id)["own"]
            advantages, top_ids = logprobs.topk(k, dim=-1)
            if ref_model is not None:
                advantages = advantages - response_logprobs(ref_model, chunk, pad_id)["own"][0].gather(-1, top_ids)
            for row, length in enumerate(mask.sum(-1).tolist()):
                store.append(top_ids[row, :length], advantages[row, :length])


def run_teacher_topk(params: Mapping[str, Any], output: Path, *, model: str, batch_size: int) -> dict:
    """Stores `chosen/` and `rejected/`: row i holds the response tokens of preference row i."""
    from adpa.inputs.data import load_preference

    dataset = params["dataset"]
    pairs = load_preference(dataset, dataset["train_split"])
    teacher, tokenizer = load_for_stage(model, params)
    metadata = {
        "model": model,
        "template": template_fingerprint(tokenizer),
        "max_length": params["max_length"],
    }
    responses = {
        column: tokenize_rows(tokenizer, pairs["prompt"], pairs[column], params["max_length"], column)
        for column in ("chosen", "rejected")
    }
    with inference_autocast(params["precision"]):
        write_teacher_topk(teacher, responses, pad_token_id(tokenizer), params["k"], output, batch_size, metadata)
    tokens = sum(exchange.response_length for exchanges in responses.values() for exchange in exchanges)
    return {"rows": len(pairs), "response_tokens": tokens}


def run_advantage(
    params: Mapping[str, Any],
    output: Path,
    *,
    model: str,
    batch_size: int,
    generations: Path | None = None,
    ref_model: str | None = None,
) -> dict:
    """Advantage of the DPO teacher (`model`) over the REF teacher at the states of the student's own
    responses (`generations`), or of the preference set's chosen responses (stage chosen_advantage: no
    `generations`, the `dataset`'s train split); with `reference: false`, the DPO teacher's log-probs alone
    (no `ref_model`)."""
    import datasets

    if params["reference"] != (ref_model is not None):
        raise InputError(
            "advantage: --ref-model is needed with reference: true and not allowed with reference: false "
            f"(got reference: {str(params['reference']).lower()}, --ref-model {ref_model!r})"
        )
    if generations is not None:
        own = datasets.load_from_disk(str(generations))
        prompts, responses = own["prompt"], [[{"role": "assistant", "content": text}] for text in own["response"]]
        name = "own response"
    else:
        from adpa.inputs.data import load_preference

        pairs = load_preference(params["dataset"], params["dataset"]["train_split"])
        prompts, responses, name = pairs["prompt"], pairs["chosen"], "chosen"
    dpo_teacher, tokenizer = load_for_stage(model, params)
    ref_teacher = load_for_stage(ref_model, params)[0] if ref_model is not None else None
    exchanges = tokenize_rows(tokenizer, prompts, responses, params["max_length"], name)
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
