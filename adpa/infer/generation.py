"""Greedy responses to the preference prompts (stages student_generations and teacher_generations),
and what every inference job shares: loading a model onto this job's device, under the config's precision.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adpa.modeling.sequences import pad_left, pad_token_id

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


def batches(items: Sequence[Any], size: int, description: str) -> Iterator[Sequence[Any]]:
    for start in tqdm(range(0, len(items), size), desc=description, unit="batch"):
        yield items[start : start + size]


@torch.no_grad()
def greedy_responses(
    model, tokenizer, prompts: Sequence[list[Message]], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy decoding of left-padded batches, each stopping at the tokenizer's EOS."""
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    encoded = [
        list(
            tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        for prompt in prompts
    ]
    responses: list[str] = []
    for batch in batches(encoded, batch_size, "generate"):
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
    from adpa.modeling.models import check_model_reference, load_model, load_tokenizer

    check_model_reference(reference)
    tokenizer = load_tokenizer(reference, trust_remote_code, revision)
    model = load_model(reference, precision, trust_remote_code, revision).to(inference_device()).eval()
    return model, tokenizer


def load_for_stage(reference: str, params: Mapping[str, Any]):
    """load_for_inference with an inference stage's precision and trust_remote_code."""
    return load_for_inference(reference, params["precision"], params["trust_remote_code"])


def inference_autocast(precision: str):
    """The autocast that `precision` asks for on the inference device (precision: auto on an AMX CPU)."""
    from adpa.modeling.precision import autocast, resolve

    return autocast(resolve(precision), "cuda" if torch.cuda.is_available() else "cpu")


def run_generations(params: Mapping[str, Any], output: Path, *, model: str, batch_size: int) -> dict:
    """The model's greedy response to every preference prompt, as a dataset (prompt, response)."""
    import datasets

    from adpa.inputs.data import load_preference

    dataset = params["dataset"]
    prompts = load_preference(dataset, dataset["train_split"])["prompt"]
    loaded, tokenizer = load_for_stage(model, params)
    with inference_autocast(params["precision"]):
        responses = greedy_responses(loaded, tokenizer, prompts, params["max_new_tokens"], batch_size)
    datasets.Dataset.from_dict({"prompt": prompts, "response": responses}).save_to_disk(str(output))
    return {"rows": len(responses), "empty_responses": sum(not response for response in responses)}
