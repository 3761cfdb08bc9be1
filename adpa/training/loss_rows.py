"""No stage learns from nothing: the training rows that keep a loss token within `max_length`.

TRL's trainers tokenize and truncate while they are built: SFTTrainer and DPOTrainer drop the rows
that truncation leaves without a loss token, CPOTrainer (SimPO) keeps them with empty responses,
and SFT packing (best-fit decreasing) truncates each row to max_length inside its pack, where an
all-prompt row then trains on nothing at loss 0. So after a trainer is built, `require_loss_tokens`
counts what is left against the rows given: none ->
one error line naming the stage, its `max_length` key and the shortest prompt in tokens, before any
step; some -> one warning line, and the count goes into the manifest. The distillation stages
tokenize for themselves (adpa/modeling/sequences.py) and refuse any row whose prompt fills max_length.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from adpa.core.errors import InputError

log = logging.getLogger("adpa")

IGNORED_LABEL = -100
# Columns of a tokenized row that hold per-token labels (-100: no loss); a row needs a loss token in each.
LABEL_COLUMNS = (("labels",), ("chosen_labels", "rejected_labels"))


class NoLossTokensError(InputError):
    """Every training row lost its loss tokens to truncation."""


def has_loss_token(labels: Iterable[int]) -> bool:
    return any(label != IGNORED_LABEL for label in labels)


def rows_with_loss_tokens(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> list[bool]:
    """Per tokenized row, whether every label column present has a loss token; rows without label
    columns (DPOTrainer's prompt/chosen/rejected ids, already filtered by TRL) all count."""
    present = next((group for group in LABEL_COLUMNS if all(column in columns for column in group)), ())
    return [all(has_loss_token(row[column]) for column in present) for row in rows]


def packed_rows_with_loss_tokens(rows: Iterable[dict[str, Any]]) -> list[list[bool]]:
    """Per pack (TRL's packed SFT rows: labels and seq_lengths), whether each packed row has a loss token."""
    verdicts = []
    for row in rows:
        start, pack = 0, []
        for length in row["seq_lengths"]:
            pack.append(has_loss_token(row["labels"][start : start + length]))
            start += length
        verdicts.append(pack)
    return verdicts


def prompt_token_counts(tokenizer, prompts: Iterable[Sequence[dict[str, str]]]) -> list[int]:
    """Tokens each prompt takes with the chat template and its generation prompt, as every stage tokenizes it."""
    return [
        len(
            tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        for prompt in prompts
    ]


def require_loss_tokens(
    stage: str,
    key: str,
    max_length: int | None,
    trainer,
    given: int,
    tokenizer=None,
    prompts: Sequence[Sequence[dict[str, str]]] | None = None,
) -> dict[str, int]:
    """Keep only the trainer's rows with a loss token; fail if none is left, warn if some were dropped.

    Returns the manifest facts {train_rows, rows_without_loss_tokens}. `prompts` (with `tokenizer`)
    name the shortest prompt in the error; they are read only when the stage fails."""
    dataset = trainer.train_dataset
    columns = dataset.column_names
    if {"labels", "seq_lengths"} <= set(columns):  # packed: count the rows inside each pack
        packs = packed_rows_with_loss_tokens(dataset.select_columns(["labels", "seq_lengths"]))
        keep, kept = [any(pack) for pack in packs], sum(map(sum, packs))
    else:
        labels = [column for group in LABEL_COLUMNS for column in group if column in columns]
        keep = rows_with_loss_tokens(columns, dataset.select_columns(labels) if labels else [{}] * len(dataset))
        kept = sum(keep)
    if not all(keep):
        trainer.train_dataset = dataset.select([index for index, ok in enumerate(keep) if ok])
    dropped = given - kept
    if kept == 0:
        counts = prompt_token_counts(tokenizer, prompts) if tokenizer is not None and prompts else []
        seen = f"; the shortest prompt has {min(counts)} tokens" if counts else ""
        raise NoLossTokensError(
            f"{stage}: none of the {given} training rows keeps a loss token within {key} = {max_length}{seen}; "
            f"raise {key}"
        )
    if dropped:
        log.warning(
            "%s: %d of %d training rows keep no loss token within %s = %s and are left out",
            stage,
            dropped,
            given,
            key,
            max_length,
        )
    return {"train_rows": kept, "rows_without_loss_tokens": dropped}


def train_rows_with_loss_tokens(run, trainer, train_dataset, eval_dataset=None, stage_facts=None) -> None:
    """A TRL stage's end: `require_loss_tokens` on the built trainer, then train and publish
    (adpa.training.train.train_and_export) with the counts, and the stage's own `stage_facts`, in the manifest."""
    from adpa.training.train import train_and_export

    prompts = train_dataset["prompt"] if "prompt" in train_dataset.column_names else None
    facts = require_loss_tokens(
        run.stage,
        run.max_length_key,
        run.params["training"]["max_length"],
        trainer,
        len(train_dataset),
        trainer.processing_class,
        prompts,
    )
    train_and_export(run, trainer, eval_dataset, {**facts, **(stage_facts or {})})
