"""Stages dckd, vanilla_kd, adpa, adpa_plus, adpa_no_ref and the control chosen_sft: one Trainer
subclass that overrides `compute_loss`.

Each example is one or two sequences, named by what they are, run through the student in one forward pass:
- dckd: chosen (NLL + KL to the DPO teacher's top-k) and rejected (KL), teacher_topk stores;
- vanilla_kd: chosen only (NLL + KL), the teacher_topk chosen store;
- adpa / adpa_plus / adpa_no_ref: chosen (NLL) and own, the student's own response (advantage
  term), an advantage store (adpa_no_ref's: the DPO teacher's log-probs without the REF teacher's);
- chosen_sft: chosen only (NLL), no store: the term all of the above share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from adpa.data import load_preference
from adpa.lm_head import dense_lm_head
from adpa.losses import TopKBatch, adpa_loss, clamp_advantage_like_reference, dckd_loss, nll_loss, vanilla_kd_loss
from adpa.models import check_model_reference, load_model, load_tokenizer
from adpa.sequences import (
    Exchange,
    SequenceError,
    pad_exchanges,
    pad_token_id,
    response_positions,
    template_fingerprint,
    tokenize_rows,
)
from adpa.topk_store import TopKStore
from adpa.train import StageRun, train_and_export, trainer_arguments

# stage -> loss
OBJECTIVES = {
    "dckd": "dckd",
    "vanilla_kd": "vanilla_kd",
    "adpa": "adpa",
    "adpa_plus": "adpa",
    "adpa_no_ref": "adpa",
    "chosen_sft": "nll",
}
# The sequences of an example, in batch order, and the training settings read as the loss's weight keywords.
SEQUENCES = {"dckd": ("chosen", "rejected"), "vanilla_kd": ("chosen",), "adpa": ("chosen", "own"), "nll": ("chosen",)}
WEIGHTS = {
    "dckd": ("nll_weight", "chosen_kl_weight", "rejected_kl_weight"),
    "vanilla_kd": ("nll_weight", "kl_weight"),
    "adpa": ("nll_weight", "adpa_weight"),
    "nll": (),
}
# Which advantage store each ADPA stage reads: with the REF teacher subtracted, or without (the ablation).
ADVANTAGE_WITH_REFERENCE = {"adpa": True, "adpa_plus": True, "adpa_no_ref": False}


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
            f"{name} row {row}: store holds {int(lengths[row])} response tokens, "
            f"the trainer tokenizes {int(expected[row])}"
        )


@dataclass
class DistillationCollator:
    """Pads the sequences of each example into one [S*B, L] batch, sequence by sequence in `stores` order
    (rows 0..B-1 the first sequence, B..2B-1 the second, ...), and lays out everything the loss reads in
    response order [S*B, R] (R: the batch's longest response): `logit_positions`, the positions of the
    logits that predict each response token, its `labels` and `response_mask`, and the stored top-k rows
    as they are stored (zeros where a sequence's store is None). So the student's head projects only
    the response positions (lm_head.dense_lm_head), a tenth of the tokens in the embedded default.

    A feature holds `row` (its row in the stores) and `<name>_ids`, `<name>_start` for each sequence name.
    """

    pad_id: int
    stores: Mapping[str, TopKStore | None]  # sequence name -> its teacher values, or None (e.g. chosen in ADPA)

    def __post_init__(self) -> None:
        ks = {store.k for store in self.stores.values() if store is not None}
        if len(ks) > 1:
            raise ValueError(f"the sequences' stores must share one k, got {sorted(ks)}")

    @property
    def k(self) -> int:
        """The stores' k; 1 (all-zero top-k tensors) when no sequence has a store (chosen_sft)."""
        return next((store.k for store in self.stores.values() if store is not None), 1)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        exchanges = [Exchange(f[f"{name}_ids"], f[f"{name}_start"]) for name in self.stores for f in features]
        batch = pad_exchanges(exchanges, self.pad_id)
        positions, response_mask = response_positions(exchanges, batch["input_ids"].shape[1])
        labels = batch["input_ids"].gather(1, positions + 1)
        width = positions.shape[1]
        rows = [f["row"] for f in features]
        size = len(features)
        ids = torch.zeros((len(exchanges), width, self.k), dtype=torch.long)
        values = torch.zeros((len(exchanges), width, self.k))
        rest = torch.zeros((len(exchanges), width))
        for index, store in enumerate(self.stores.values()):
            if store is None:
                continue
            part = slice(index * size, (index + 1) * size)
            stored = store.padded_batch(rows, width)
            ids[part], values[part] = stored["ids"], stored["values"]
            if "rest" in stored:
                rest[part] = stored["rest"]
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "logit_positions": positions,
            "labels": torch.where(response_mask, labels, self.pad_id),
            "response_mask": response_mask,
            "topk_ids": ids,
            "topk_values": values,
            "topk_rest": rest,
        }


class StudentSequence(NamedTuple):
    """One named sequence of a batch, in response order: the student's logits [B,R,V], labels [B,R],
    mask [B,R], stored top-k."""

    logits: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    topk: TopKBatch


def split_sequences(
    logits: torch.Tensor, inputs: Mapping[str, torch.Tensor], names: Sequence[str]
) -> dict[str, StudentSequence]:
    """Cuts the collator's [S*B, R, ...] batch (logits at its `logit_positions`) back into its named sequences."""
    size = logits.shape[0] // len(names)
    labels, mask = inputs["labels"], inputs["response_mask"]
    topk = TopKBatch(inputs["topk_ids"], inputs["topk_values"], inputs["topk_rest"])
    parts = {}
    for index, name in enumerate(names):
        rows = slice(index * size, (index + 1) * size)
        parts[name] = StudentSequence(logits[rows], labels[rows], mask[rows], TopKBatch(*(x[rows] for x in topk)))
    return parts


def _distillation_trainer_class():
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        """Trainer whose loss is DCKD, vanilla KD or ADPA; the loop, DeepSpeed and checkpoints are Trainer's.

        `weights` are passed to the loss as its weight keywords (WEIGHTS[objective]).
        """

        def __init__(
            self, *args, objective: str, weights: Mapping[str, float], reference_clamp: bool = False, **kwargs
        ):
            super().__init__(*args, **kwargs)
            self.objective, self.weights, self.reference_clamp = objective, dict(weights), reference_clamp
            # The head projects the response positions only, inside the model's forward (DDP, DeepSpeed).
            self.head_takes_positions = dense_lm_head(self.model)
            # Our losses are means, so Trainer must scale them for gradient accumulation itself.
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, attention, positions = inputs["input_ids"], inputs["attention_mask"], inputs["logit_positions"]
            if self.head_takes_positions:
                outputs = model(input_ids=ids, attention_mask=attention, logit_positions=positions)
                logits = outputs.logits
            else:
                outputs = model(input_ids=ids, attention_mask=attention)
                logits = outputs.logits.gather(1, positions[..., None].expand(-1, -1, outputs.logits.shape[-1]))
            sequences = split_sequences(logits, inputs, SEQUENCES[self.objective])
            chosen = sequences["chosen"]
            if self.objective == "nll":
                loss = nll_loss(chosen.logits, chosen.labels, chosen.mask)
            elif self.objective == "dckd":
                rejected = sequences["rejected"]
                loss = dckd_loss(
                    chosen_logits=chosen.logits,
                    chosen_labels=chosen.labels,
                    chosen_mask=chosen.mask,
                    chosen_topk=chosen.topk,
                    rejected_logits=rejected.logits,
                    rejected_mask=rejected.mask,
                    rejected_topk=rejected.topk,
                    **self.weights,
                )
            elif self.objective == "vanilla_kd":
                loss = vanilla_kd_loss(
                    chosen_logits=chosen.logits,
                    chosen_labels=chosen.labels,
                    chosen_mask=chosen.mask,
                    chosen_topk=chosen.topk,
                    **self.weights,
                )
            else:
                own = sequences["own"]
                advantage = own.topk
                if self.reference_clamp:
                    advantage = advantage._replace(values=clamp_advantage_like_reference(advantage.values))
                loss = adpa_loss(
                    chosen_logits=chosen.logits,
                    chosen_labels=chosen.labels,
                    chosen_mask=chosen.mask,
                    own_logits=own.logits,
                    own_mask=own.mask,
                    own_advantage=advantage,
                    **self.weights,
                )
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer


def run_distillation(
    run: StageRun,
    model: str,
    topk: Path | None = None,
    generations: Path | None = None,
    advantage: Path | None = None,
) -> None:
    """dckd and vanilla_kd (the teacher's `topk` store), adpa / adpa_plus / adpa_no_ref (the student's
    own `generations` and their `advantage` store) or chosen_sft (neither), from the student `model`."""
    import datasets
    from transformers import TrainingArguments

    if run.stage not in OBJECTIVES:
        raise ValueError(f"{run.stage!r} is not a distillation stage (one of {', '.join(OBJECTIVES)})")
    objective = OBJECTIVES[run.stage]
    params, training = run.params, run.params["training"]
    check_model_reference(model)
    tokenizer = load_tokenizer(model, params["trust_remote_code"])
    dataset = params["dataset"]
    pairs = load_preference(dataset, dataset["train_split"])
    prompts = pairs["prompt"]
    max_length = training["max_length"]
    # The distillation rows are aligned with the stores row by row: a prompt that fills max_length is an error.
    key = run.max_length_key
    exchanges = {"chosen": tokenize_rows(tokenizer, prompts, pairs["chosen"], max_length, f"{run.stage}: chosen", key)}
    if objective == "dckd":
        exchanges["rejected"] = tokenize_rows(
            tokenizer, prompts, pairs["rejected"], max_length, f"{run.stage}: rejected", key
        )
    if objective == "nll":
        stores: dict[str, TopKStore | None] = {"chosen": None}
    elif objective in ("dckd", "vanilla_kd"):
        stores = {name: TopKStore(topk / name) for name in SEQUENCES[objective]}
        for name, store in stores.items():
            check_store(store, tokenizer, exchanges[name], f"teacher_topk {name}")
    else:
        responses = datasets.load_from_disk(str(generations))
        if responses["prompt"] != prompts:
            raise SequenceError("student_generations: prompts differ from the preference set's (stale generations?)")
        own = [[{"role": "assistant", "content": text}] for text in responses["response"]]
        exchanges["own"] = tokenize_rows(tokenizer, prompts, own, max_length, f"{run.stage}: own response", key)
        stores = {"chosen": None, "own": TopKStore(advantage)}
        check_store(stores["own"], tokenizer, exchanges["own"], "advantage")
        wanted = ADVANTAGE_WITH_REFERENCE[run.stage]
        if stores["own"].metadata.get("reference", True) != wanted:
            raise SequenceError(
                f"{run.stage}: the advantage store {advantage} was computed "
                f"{'without' if wanted else 'with'} the REF teacher; {run.stage} reads the one "
                f"{'with' if wanted else 'without'} it"
            )
    weights = {key: training[key] for key in WEIGHTS[objective]}
    columns: dict[str, list] = {"row": list(range(len(exchanges["chosen"])))}
    for name in SEQUENCES[objective]:
        columns[f"{name}_ids"] = [e.input_ids for e in exchanges[name]]
        columns[f"{name}_start"] = [e.response_start for e in exchanges[name]]
    rows = datasets.Dataset.from_dict(columns)
    arguments = trainer_arguments(run)
    arguments.pop("max_length")
    args = TrainingArguments(**arguments, remove_unused_columns=False)
    student = load_model(model, params["precision"], params["trust_remote_code"])
    trainer = _distillation_trainer_class()(
        model=student,
        args=args,
        train_dataset=rows,
        data_collator=DistillationCollator(pad_token_id(tokenizer), stores),
        processing_class=tokenizer,
        objective=objective,
        weights=weights,
        reference_clamp=training.get("reference_clamp", False),
    )
    train_and_export(run, trainer, None)
