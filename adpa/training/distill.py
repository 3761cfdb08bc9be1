"""The distillation methods (dckd, vanilla_kd, adpa, adpa_plus, adpa_no_ref, the control chosen_sft and
any other method of adpa/dag/methods.py whose entry declares a loss): one Trainer subclass that overrides
`compute_loss` with the loss's terms (adpa/dag/objectives.py).

Each example is one or more sequences, named by what they are, run through the student in one forward pass:
chosen and rejected from the preference pairs, own (the student's own response) from its generations. A
sequence with a top-k KL term reads the teacher_topk store of that sequence; one with an advantage term
reads the advantage store the method names (adpa_no_ref's: the DPO teacher's log-probs without the REF
teacher's); an NLL-only sequence reads no store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch

from adpa.dag.objectives import Term, Terms, resolve, sequences_of, store_kind, weights_of
from adpa.inputs.data import load_preference
from adpa.modeling.lm_head import _gather_positions, dense_lm_head, sum_over_position_chunks
from adpa.modeling.models import check_model_reference, load_model, load_tokenizer
from adpa.modeling.sequences import (
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
from adpa.training.losses import (
    Response,
    TopKBatch,
    clamp_advantage_like_reference,
    loss_from_term_sums,
    response_term_sums,
)
from adpa.training.topk_store import TopKStore
from adpa.training.train import StageRun, train_and_export, trainer_arguments


def loss_terms(params: Mapping[str, Any]) -> Terms:
    """A distillation stage's loss from its parameters (adpa/workflow/config.py writes its method's terms there)."""
    if "loss" not in params:
        raise ValueError("not a distillation stage: its parameters hold no `loss` (adpa/dag/methods.py: terms)")
    return {name: Term(*term) for name, term in params["loss"].items()}


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

        `objective`: the loss (adpa/dag/objectives.py: its terms, or the name of one of LOSSES); `weights`: the
        training settings its terms are weighed by. `loss_chunk_tokens`:
        the head projects that many response positions (of every row) at a time, each chunk recomputed in
        the backward (lm_head.sum_over_position_chunks), so the [S*B, R, V] logits never exist at once.
        """

        def __init__(
            self,
            *args,
            objective: str | Terms,
            weights: Mapping[str, float],
            reference_clamp: bool = False,
            loss_chunk_tokens: int = 1024,
            **kwargs,
        ):
            if loss_chunk_tokens < 1:
                raise ValueError(f"loss_chunk_tokens must be at least 1, got {loss_chunk_tokens}")
            super().__init__(*args, **kwargs)
            self.objective, self.weights, self.reference_clamp = resolve(objective), dict(weights), reference_clamp
            self.loss_chunk_tokens = loss_chunk_tokens
            # The head projects the response positions only, inside the model's forward (DDP, DeepSpeed).
            self.head_takes_positions = dense_lm_head(self.model)
            # Our losses are means, so Trainer must scale them for gradient accumulation itself.
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            names = sequences_of(self.objective)
            responses = split_responses(inputs, names)
            if self.reference_clamp:
                for name in names:
                    if store_kind(self.objective, name) == "advantage":
                        read = responses[name]
                        clamped = clamp_advantage_like_reference(read.topk.values)
                        responses[name] = read._replace(topk=read.topk._replace(values=clamped))

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


def read_store(
    run: StageRun, terms: Terms, sequence: str, topk: Path | None, advantage: Path | None
) -> TopKStore | None:
    """The store a sequence's terms read: the teacher's top-k on it (`topk`/<sequence>), the advantage store
    (checked to be the one with, or without, the REF teacher that the stage reads), or none."""
    kind = store_kind(terms, sequence)
    if kind is None:
        return None
    given = topk if kind == "topk" else advantage
    if given is None:
        raise ValueError(
            f"{run.stage}: its loss reads the {'top-k' if kind == 'topk' else 'advantage'} store: none given"
        )
    store = TopKStore(given / sequence if kind == "topk" else given)
    wanted = run.params.get("advantage_reference", True)
    if kind == "advantage" and store.metadata.get("reference", True) != wanted:
        raise SequenceError(
            f"{run.stage}: the advantage store {advantage} was computed "
            f"{'without' if wanted else 'with'} the REF teacher; {run.stage} reads the one "
            f"{'with' if wanted else 'without'} it"
        )
    return store


def run_distillation(
    run: StageRun,
    model: str,
    topk: Path | None = None,
    generations: Path | None = None,
    advantage: Path | None = None,
) -> None:
    """A distillation method from the student `model`: its loss's terms (the stage's `loss` parameter, from
    adpa/dag/methods.py) say which sequences it reads (the preference pairs' chosen and rejected, the student's
    own `generations`) and which stores (the teacher's `topk` store, an `advantage` store)."""
    import datasets
    from transformers import TrainingArguments

    terms = loss_terms(run.params)
    params, training = run.params, run.params["training"]
    check_model_reference(model)
    tokenizer = load_tokenizer(model, params["trust_remote_code"])
    dataset = params["dataset"]
    pairs = load_preference(dataset, dataset["train_split"])
    prompts = pairs["prompt"]
    max_length = training["max_length"]
    # The distillation rows are aligned with the stores row by row: a prompt that fills max_length is an error.
    key = run.max_length_key
    exchanges, stores = {}, {}
    for name in sequences_of(terms):
        if name == "own":
            responses = datasets.load_from_disk(str(generations))
            if responses["prompt"] != prompts:
                raise SequenceError(
                    "student_generations: prompts differ from the preference set's (stale generations?)"
                )
            texts = [[{"role": "assistant", "content": text}] for text in responses["response"]]
        else:
            texts = pairs[name]
        label = "own response" if name == "own" else name
        exchanges[name] = tokenize_rows(tokenizer, prompts, texts, max_length, f"{run.stage}: {label}", key)
        stores[name] = read_store(run, terms, name, topk, advantage)
        if stores[name] is not None:
            check_store(
                stores[name],
                tokenizer,
                exchanges[name],
                "advantage" if store_kind(terms, name) == "advantage" else f"teacher_topk {name}",
            )
    weights = {key: training[key] for key in weights_of(terms)}
    columns: dict[str, list] = {"row": list(range(len(exchanges["chosen"])))}
    for name in sequences_of(terms):
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
        objective=terms,
        weights=weights,
        reference_clamp=training.get("reference_clamp", False),
        loss_chunk_tokens=run.launch.loss_chunk_tokens,
    )
    train_and_export(run, trainer, None)
