"""Stages dckd, adpa and adpa_plus: one Trainer subclass that overrides `compute_loss`.

Each example is a pair of sequences run through the student in one forward pass:
- dckd: chosen (NLL + KL to the DPO teacher's top-k) and rejected (KL), teacher_topk stores;
- adpa / adpa_plus: chosen (NLL) and the student's own response (advantage term), advantage store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adpa.data import load_preference
from adpa.losses import adpa_loss, clamp_advantage_like_reference, dckd_loss
from adpa.models import check_model_reference, load_model, load_tokenizer
from adpa.sequences import (
    Exchange,
    SequenceError,
    pad_exchanges,
    pad_token_id,
    place_rows,
    template_fingerprint,
    tokenize_rows,
)
from adpa.topk_store import TopKStore
from adpa.train import StageRun, train_and_export, trainer_arguments


def check_store(store: TopKStore, tokenizer, exchanges: Sequence[Exchange], name: str) -> None:
    """Row i of the store must hold exactly the response tokens of exchange i."""
    if store.metadata.get("template") != template_fingerprint(tokenizer):
        raise SequenceError(f"{name}: store was tokenized with another chat template or vocabulary")
    if len(store) != len(exchanges):
        raise SequenceError(f"{name}: store has {len(store)} rows, the dataset {len(exchanges)}")
    lengths = torch.as_tensor(store.lengths)
    expected = torch.tensor([exchange.response_length for exchange in exchanges])
    mismatched = (lengths != expected).nonzero().flatten()
    if len(mismatched):
        row = int(mismatched[0])
        raise SequenceError(
            f"{name} row {row}: store holds {int(lengths[row])} response tokens, the trainer tokenizes {int(expected[row])}"
        )


@dataclass
class PairCollator:
    """Pads both sequences of each example into one [2B, L] batch and places stored rows at label positions."""

    pad_id: int
    first_store: TopKStore | None  # values for the first (chosen) sequence, or None
    second_store: TopKStore

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        first = [Exchange(f["first_ids"], f["first_start"]) for f in features]
        second = [Exchange(f["second_ids"], f["second_start"]) for f in features]
        batch = pad_exchanges(first + second, self.pad_id)
        rows = [f["row"] for f in features]
        label_length = batch["input_ids"].shape[1] - 1
        starts = batch["response_start"]
        size = len(features)
        k = self.second_store.k
        ids = torch.zeros((2 * size, label_length, k), dtype=torch.long)
        values = torch.zeros((2 * size, label_length, k))
        rest = torch.zeros((2 * size, label_length))
        for half, store in ((slice(0, size), self.first_store), (slice(size, None), self.second_store)):
            if store is None:
                continue
            stored = store.padded_batch(rows)
            ids[half] = place_rows(stored["ids"], starts[half], label_length)
            values[half] = place_rows(stored["values"], starts[half], label_length)
            if "rest" in stored:
                rest[half] = place_rows(stored["rest"], starts[half], label_length)
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "response_mask": batch["response_mask"],
            "topk_ids": ids,
            "topk_values": values,
            "topk_rest": rest,
        }


def _distillation_trainer_class():
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        """Trainer whose loss is DCKD or ADPA; everything else (loop, DeepSpeed, checkpoints) is Trainer's."""

        def __init__(self, *args, objective: str, weights: Mapping[str, float], reference_clamp: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.objective, self.weights, self.reference_clamp = objective, dict(weights), reference_clamp
            # Our losses are means, so Trainer must scale them for gradient accumulation itself.
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            logits, labels, mask = outputs.logits[:, :-1], inputs["input_ids"][:, 1:], inputs["response_mask"]
            size = logits.shape[0] // 2
            first, second = slice(0, size), slice(size, None)
            ids, values, rest = inputs["topk_ids"], inputs["topk_values"], inputs["topk_rest"]
            if self.objective == "dckd":
                loss = dckd_loss(
                    logits[first], labels[first], mask[first], ids[first], values[first], rest[first],
                    logits[second], ids[second], values[second], rest[second], mask[second],
                    nll_weight=self.weights["nll_weight"],
                    chosen_kl_weight=self.weights["chosen_kl_weight"],
                    rejected_kl_weight=self.weights["rejected_kl_weight"],
                )
            else:
                advantage = values[second]
                if self.reference_clamp:
                    advantage = clamp_advantage_like_reference(advantage)
                loss = adpa_loss(
                    logits[first], labels[first], mask[first], logits[second], ids[second], advantage, mask[second],
                    adpa_weight=self.weights["adpa_weight"],
                    nll_weight=self.weights["nll_weight"],
                )
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer


def run_distillation(
    run: StageRun,
    model_reference: str,
    topk_dir: Path | None = None,
    generations_dir: Path | None = None,
    advantage_dir: Path | None = None,
) -> None:
    """dckd (topk_dir) or adpa / adpa_plus (generations_dir + advantage_dir)."""
    import datasets
    from transformers import TrainingArguments

    params, training = run.params, run.params["training"]
    check_model_reference(model_reference)
    tokenizer = load_tokenizer(model_reference, params["trust_remote_code"])
    dataset = params["dataset"]
    pairs = load_preference(dataset, dataset["train_split"])
    prompts, chosen = pairs["prompt"], pairs["chosen"]
    max_length = training["max_length"]
    first = tokenize_rows(tokenizer, prompts, chosen, max_length, "chosen")
    if run.stage == "dckd":
        objective = "dckd"
        first_store, second_store = TopKStore(topk_dir / "chosen"), TopKStore(topk_dir / "rejected")
        second = tokenize_rows(tokenizer, prompts, pairs["rejected"], max_length, "rejected")
        check_store(first_store, tokenizer, first, "teacher_topk chosen")
        check_store(second_store, tokenizer, second, "teacher_topk rejected")
        weights = {key: training[key] for key in ("nll_weight", "chosen_kl_weight", "rejected_kl_weight")}
    else:
        objective = "adpa"
        generations = datasets.load_from_disk(str(generations_dir))
        if generations["prompt"] != prompts:
            raise SequenceError("student_generations: prompts differ from the preference set's (stale generations?)")
        own = [[{"role": "assistant", "content": text}] for text in generations["response"]]
        second = tokenize_rows(tokenizer, prompts, own, max_length, "own response")
        first_store, second_store = None, TopKStore(advantage_dir)
        check_store(second_store, tokenizer, second, "advantage")
        weights = {key: training[key] for key in ("nll_weight", "adpa_weight")}
    rows = datasets.Dataset.from_dict(
        {
            "row": list(range(len(first))),
            "first_ids": [e.input_ids for e in first],
            "first_start": [e.response_start for e in first],
            "second_ids": [e.input_ids for e in second],
            "second_start": [e.response_start for e in second],
        }
    )
    arguments = trainer_arguments(run)
    arguments.pop("max_length")
    args = TrainingArguments(**arguments, remove_unused_columns=False)
    model = load_model(model_reference, params["precision"], params["trust_remote_code"])
    pad_id = pad_token_id(tokenizer)
    trainer = _distillation_trainer_class()(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=PairCollator(pad_id, first_store, second_store),
        processing_class=tokenizer,
        objective=objective,
        weights=weights,
        reference_clamp=training.get("reference_clamp", False),
    )
    train_and_export(run, trainer, None)
