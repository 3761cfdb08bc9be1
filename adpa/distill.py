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
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch

from adpa.data import load_preference
from adpa.lm_head import _gather_positions, dense_lm_head, sum_over_position_chunks
from adpa.losses import (
    Response,
    TopKBatch,
    clamp_advantage_like_reference,
    loss_from_term_sums,
    response_term_sums,
)
from adpa.models import check_model_reference, load_model, load_tokenizer
from adpa.sequences import (
    Exchange,
    SequenceError,
    pack_exchanges,
    packed_response_positions,
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


def _gather_tokens(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """input_ids [B, L] at positions [B, R], or padding-free input_ids [1, N] at positions [S, R] into
    the flat axis (the same read for a one-row batch)."""
    return input_ids[0][positions] if input_ids.shape[0] == 1 else input_ids.gather(1, positions)


@dataclass
class DistillationCollator:
    """Pads the sequences of each example into one [S*B, L] batch, sequence by sequence in `stores` order
    (rows 0..B-1 the first sequence, B..2B-1 the second, ...), and lays out everything the loss reads in
    response order [S*B, R] (R: the batch's longest response): `logit_positions`, the positions of the
    logits that predict each response token, its `labels` and `response_mask`, and the stored top-k rows
    as they are stored (zeros where a sequence's store is None). So the student's head projects only
    the response positions (lm_head.dense_lm_head), a tenth of the tokens in the embedded default.

    `padding_free`: the S*B sequences are concatenated into one row instead (input_ids and position_ids
    [1, N], no attention_mask; sequences.pack_exchanges), so no compute goes to padding, and
    `logit_positions` index that flat axis; everything in response order [S*B, R] is unchanged.

    A feature holds `row` (its row in the stores) and `<name>_ids`, `<name>_start` for each sequence name.
    """

    pad_id: int
    stores: Mapping[str, TopKStore | None]  # sequence name -> its teacher values, or None (e.g. chosen in ADPA)
    padding_free: bool = False

    def __post_init__(self) -> None:
        ks = {store.k for store in self.stores.values() if store is not None}
        if len(ks) > 1:
            raise ValueError(f"the sequences' stores must share one k, got {sorted(ks)}")

    @property
    def k(self) -> int:
        """The stores' k; 1 (all-zero top-k tensors) when no sequence has a store (chosen_sft)."""
        return next((store.k for store in self.stores.values() if store is not None), 1)

    def _model_inputs(
        self, exchanges: Sequence[Exchange]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The model's inputs (input_ids with attention_mask [S*B, L], or padding-free input_ids with
        position_ids [1, N]), the logit positions [S*B, R] into their sequence axis, and the response mask."""
        if self.padding_free:
            positions, response_mask = packed_response_positions(exchanges)
            return pack_exchanges(exchanges), positions, response_mask
        batch = pad_exchanges(exchanges, self.pad_id)
        positions, response_mask = response_positions(exchanges, batch["input_ids"].shape[1])
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return inputs, positions, response_mask

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        exchanges = [Exchange(f[f"{name}_ids"], f[f"{name}_start"]) for name in self.stores for f in features]
        inputs, positions, response_mask = self._model_inputs(exchanges)
        labels = _gather_tokens(inputs["input_ids"], positions + 1)
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
            **inputs,
            "logit_positions": positions,
            "labels": torch.where(response_mask, labels, self.pad_id),
            "response_mask": response_mask,
            "topk_ids": ids,
            "topk_values": values,
            "topk_rest": rest,
        }


# Attention implementations that keep a padding-free batch's sequences apart given position_ids and no
# attention_mask: transformers' masks (eager, sdpa, flex) turn the restarts of position_ids into a
# block-causal mask; flash-attention runs varlen on them (checked by name: "flash" in it). eager and sdpa
# attend over the whole [N, N] row under that mask: their attention grows with the square of the batch's
# total tokens, so padding-free pays off there only when the rest of the model dominates (not on CPU).
PACKED_ATTENTION = ("eager", "sdpa", "flex_attention")


def attention_implementation(model) -> str:
    """The attention implementation the model runs (e.g. "sdpa"), for the run's manifest: it decides
    whether padding-free batches stay apart, and how fast they run."""
    return str(model.config._attn_implementation)


def check_padding_free(model) -> None:
    """Refuse padding-free batches under an attention that would let their packed sequences attend to
    each other: a silent leak, not an error, if it ran."""
    name = attention_implementation(model)
    if name not in PACKED_ATTENTION and "flash" not in name:
        raise ValueError(
            f"padding_free: attention implementation {name!r} is not known to keep packed sequences apart "
            f"(one of {', '.join(PACKED_ATTENTION)} or a flash-attention)"
        )


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


# The batch keys the loss reads; the others (input_ids with attention_mask or position_ids, ...) go to the model.
LOSS_KEYS = ("logit_positions", "labels", "response_mask", "topk_ids", "topk_values", "topk_rest")


def sequence_rows(rows: int, names: Sequence[str]) -> dict[str, slice]:
    """Each named sequence's rows of the collator's [S*B, ...] layout of `rows` rows (the first B the first name's)."""
    size = rows // len(names)
    return {name: slice(index * size, (index + 1) * size) for index, name in enumerate(names)}


def split_responses(inputs: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, Response]:
    """The collator's [S*B, R] loss targets cut into their named sequences: `split_sequences` without the
    logits, which the chunked loss projects a chunk of positions at a time."""
    topk = TopKBatch(inputs["topk_ids"], inputs["topk_values"], inputs["topk_rest"])
    return {
        name: Response(inputs["labels"][rows], inputs["response_mask"][rows], TopKBatch(*(x[rows] for x in topk)))
        for name, rows in sequence_rows(len(inputs["labels"]), names).items()
    }


def _distillation_trainer_class():
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        """Trainer whose loss is DCKD, vanilla KD or ADPA; the loop, DeepSpeed and checkpoints are Trainer's.

        `weights` are passed to the loss as its weight keywords (WEIGHTS[objective]). `loss_chunk_tokens`:
        the head projects that many response positions (of every row) at a time, each chunk recomputed in
        the backward (lm_head.sum_over_position_chunks), so the [S*B, R, V] logits never exist at once.
        """

        def __init__(
            self,
            *args,
            objective: str,
            weights: Mapping[str, float],
            reference_clamp: bool = False,
            loss_chunk_tokens: int = 1024,
            **kwargs,
        ):
            if loss_chunk_tokens < 1:
                raise ValueError(f"loss_chunk_tokens must be at least 1, got {loss_chunk_tokens}")
            super().__init__(*args, **kwargs)
            self.objective, self.weights, self.reference_clamp = objective, dict(weights), reference_clamp
            self.loss_chunk_tokens = loss_chunk_tokens
            # The head projects the response positions only, inside the model's forward (DDP, DeepSpeed).
            self.head_takes_positions = dense_lm_head(self.model)
            # Our losses are means, so Trainer must scale them for gradient accumulation itself.
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            names = SEQUENCES[self.objective]
            responses = split_responses(inputs, names)
            if self.reference_clamp:
                own = responses["own"]
                clamped = clamp_advantage_like_reference(own.topk.values)
                responses["own"] = own._replace(topk=own.topk._replace(values=clamped))

            def chunk_sums(logits: torch.Tensor, positions: slice) -> dict[str, torch.Tensor]:
                """The loss terms' per-row sums over the response `positions` from the logits there [S*B, c, V]."""
                logits_by_name = {name: logits[rows] for name, rows in sequence_rows(len(logits), names).items()}
                chunk = {name: response.at(positions) for name, response in responses.items()}
                return response_term_sums(self.objective, logits_by_name, chunk)

            model_inputs = {key: value for key, value in inputs.items() if key not in LOSS_KEYS}
            if self.head_takes_positions:
                project = partial(
                    sum_over_position_chunks, chunk_sums=chunk_sums, chunk_positions=self.loss_chunk_tokens
                )
                sums = model(**model_inputs, logit_positions=inputs["logit_positions"], reduce_logit_positions=project)
            else:  # a head that transforms its logits: the model's own forward, gathered; no cache to build
                logits = model(**model_inputs, use_cache=False).logits
                sums = chunk_sums(_gather_positions(logits, inputs["logit_positions"]), slice(None))
            masks = {name: response.mask for name, response in responses.items()}
            loss = loss_from_term_sums(self.objective, sums, masks, self.weights)
            return (loss, sums) if return_outputs else loss

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
    student = load_model(
        model, params["precision"], params["trust_remote_code"], trained=True, attention=run.launch.attention
    )
    if run.launch.padding_free:
        check_padding_free(student)
    trainer = _distillation_trainer_class()(
        model=student,
        args=args,
        train_dataset=rows,
        data_collator=DistillationCollator(pad_token_id(tokenizer), stores, padding_free=run.launch.padding_free),
        processing_class=tokenizer,
        objective=objective,
        weights=weights,
        reference_clamp=training.get("reference_clamp", False),
        loss_chunk_tokens=run.launch.loss_chunk_tokens,
    )
    train_and_export(run, trainer, None)
