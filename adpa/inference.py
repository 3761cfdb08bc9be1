"""Inference stages: the DPO teacher's top-k store, the student's own responses, the advantage store.

Batched forward passes on the config's device; per-token work is vectorized over batch x time x k.
Rows are written in dataset order, so store row i belongs to dataset row i.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adpa.sequences import Exchange, pad_exchanges, pad_left, pad_token_id, template_fingerprint, tokenize_rows
from adpa.topk_store import TopKStoreWriter

Message = dict[str, str]


# Lock files of the GPUs this process claimed: held open until it exits.
_CLAIMED: list[Any] = []


def claim_device(names: Sequence[str], lock_dir: str | os.PathLike | None = None, wait_s: float = 1.0) -> int:
    """Index of a device (named by a stable id) that no other process of this machine holds.

    Snakemake's `gpu` resource bounds how many inference jobs run at once on a multi-GPU
    machine but not which GPU each uses; without this they would all load onto the first.
    The lock is released when the process exits, however it exits.
    """
    import fcntl
    import tempfile
    import time

    if len(names) <= 1:
        return 0
    folder = Path(lock_dir or tempfile.gettempdir())
    while True:
        for index, name in enumerate(names):
            handle = open(folder / f"adpa-device-{name}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _CLAIMED.append(handle)
            return index
        time.sleep(wait_s)


def inference_device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    # By UUID: under Slurm, two jobs on one node may each see their own GPU as cuda:0.
    names = [str(torch.cuda.get_device_properties(index).uuid) for index in range(torch.cuda.device_count())]
    return torch.device("cuda", claim_device(names))


def _batches(items: Sequence[Any], size: int, description: str) -> Iterator[Sequence[Any]]:
    for start in tqdm(range(0, len(items), size), desc=description, unit="batch"):
        yield items[start : start + size]


def _response_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log pi(. | s_t) at every label position: [B, L-1, V] float32."""
    device = next(model.parameters()).device
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _rows(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> Iterator[torch.Tensor]:
    """Split [B, L-1, ...] into each row's response positions (response token order)."""
    for row, mask in enumerate(batch["response_mask"]):
        yield values[row][mask.to(values.device)]


@torch.no_grad()
def write_teacher_topk(model, exchanges: Sequence[Exchange], pad_id: int, k: int, store_dir: str | os.PathLike,
                       batch_size: int, metadata: dict) -> None:
    """Per response token: the teacher's top-k ids and log-probs and the log of the remaining mass."""
    vocab = model.config.vocab_size
    with TopKStoreWriter(store_dir, k, vocab, kind="topk_logprobs", has_rest=True, metadata=metadata) as store:
        for chunk in _batches(exchanges, batch_size, f"teacher top-{k} {Path(store_dir).name}"):
            batch = pad_exchanges(chunk, pad_id)
            logprobs = _response_logprobs(model, batch)
            top_logprobs, top_ids = logprobs.topk(k, dim=-1)
            # log(1 - sum top-k p) from the complement itself: exact even when the top-k hold ~all mass.
            rest = logprobs.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
            for ids, values, remaining in zip(_rows(top_ids, batch), _rows(top_logprobs, batch), _rows(rest, batch)):
                store.append(ids, values, remaining)


@torch.no_grad()
def write_advantage(dpo_model, ref_model, exchanges: Sequence[Exchange], pad_id: int, k: int,
                    store_dir: str | os.PathLike, batch_size: int, metadata: dict) -> None:
    """A(s_t, a) = log pi_dpo(a|s_t) - log pi_ref(a|s_t) for a in the DPO teacher's top-k, signed."""
    vocab = dpo_model.config.vocab_size
    with TopKStoreWriter(store_dir, k, vocab, kind="advantage", has_rest=False, metadata=metadata) as store:
        for chunk in _batches(exchanges, batch_size, "advantage"):
            batch = pad_exchanges(chunk, pad_id)
            dpo_top, top_ids = _response_logprobs(dpo_model, batch).topk(k, dim=-1)
            ref_at_top = _response_logprobs(ref_model, batch).gather(-1, top_ids)
            for ids, advantage in zip(_rows(top_ids, batch), _rows(dpo_top - ref_at_top, batch)):
                store.append(ids, advantage)


@torch.no_grad()
def greedy_responses(model, tokenizer, prompts: Sequence[list[Message]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy decoding of left-padded batches, each stopping at the tokenizer's EOS."""
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    encoded = [
        list(tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for prompt in prompts
    ]
    responses: list[str] = []
    for batch in _batches(encoded, batch_size, "generate"):
        input_ids, attention = (tensor.to(device) for tensor in pad_left(batch, pad))
        width = input_ids.shape[1]
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
        responses += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return [response.strip() for response in responses]


def load_for_inference(reference: str, precision: str, trust_remote_code: bool, revision: str | None = None):
    from adpa.models import check_model_reference, load_model, load_tokenizer

    check_model_reference(reference)
    tokenizer = load_tokenizer(reference, trust_remote_code, revision)
    model = load_model(reference, precision, trust_remote_code, revision).to(inference_device()).eval()
    return model, tokenizer


def inference_autocast(precision: str):
    """The autocast that `precision` asks for on the inference device (precision: auto on an AMX CPU)."""
    from adpa.precision import autocast, resolve

    return autocast(resolve(precision), "cuda" if torch.cuda.is_available() else "cpu")


def _load_for_inference(reference: str, params: Mapping[str, Any]):
    return load_for_inference(reference, params["precision"], params["trust_remote_code"])


def run_teacher_topk(params: Mapping[str, Any], model_reference: str, staging: Path, batch_size: int) -> dict:
    """Stores `chosen/` and `rejected/`: row i holds the response tokens of preference row i."""
    from adpa.data import load_preference
    dataset = params["dataset"]
    pairs = load_preference(dataset, dataset["train_split"])
    model, tokenizer = _load_for_inference(model_reference, params)
    metadata = {"model": model_reference, "template": template_fingerprint(tokenizer), "max_length": params["max_length"]}
    tokens = 0
    for column in ("chosen", "rejected"):
        exchanges = tokenize_rows(tokenizer, pairs["prompt"], pairs[column], params["max_length"], column)
        with inference_autocast(params["precision"]):
            write_teacher_topk(model, exchanges, pad_token_id(tokenizer), params["k"], staging / column, batch_size,
                               metadata)
        tokens += sum(exchange.response_length for exchange in exchanges)
    return {"rows": len(pairs), "response_tokens": tokens}


def run_student_generations(params: Mapping[str, Any], model_reference: str, staging: Path, batch_size: int) -> dict:
    """The student's greedy response to every preference prompt, as a dataset (prompt, response)."""
    import datasets

    from adpa.data import load_preference

    dataset = params["dataset"]
    prompts = load_preference(dataset, dataset["train_split"])["prompt"]
    model, tokenizer = _load_for_inference(model_reference, params)
    with inference_autocast(params["precision"]):
        responses = greedy_responses(model, tokenizer, prompts, params["max_new_tokens"], batch_size)
    datasets.Dataset.from_dict({"prompt": prompts, "response": responses}).save_to_disk(str(staging))
    return {"rows": len(responses), "empty_responses": sum(not response for response in responses)}


def run_advantage(params: Mapping[str, Any], dpo_reference: str, ref_reference: str, generations_dir: Path,
                  staging: Path, batch_size: int) -> dict:
    """Advantage of the DPO teacher over the REF teacher at the states of the student's own responses."""
    import datasets

    generations = datasets.load_from_disk(str(generations_dir))
    dpo_model, tokenizer = _load_for_inference(dpo_reference, params)
    ref_model, _ = _load_for_inference(ref_reference, params)
    responses = [[{"role": "assistant", "content": text}] for text in generations["response"]]
    exchanges = tokenize_rows(tokenizer, generations["prompt"], responses, params["max_length"], "own response")
    metadata = {"dpo_teacher": dpo_reference, "ref_teacher": ref_reference, "template": template_fingerprint(tokenizer)}
    with inference_autocast(params["precision"]):
        write_advantage(dpo_model, ref_model, exchanges, pad_token_id(tokenizer), params["k"], staging, batch_size,
                        metadata)
    return {"rows": len(exchanges), "response_tokens": sum(e.response_length for e in exchanges)}
