"""Datasets: loading from any source, normalizing both dataset forms once, generating the embedded task.

SFT rows become `{"messages": [...]}`; preference rows become TRL's conversational form
`{"prompt": [...], "chosen": [assistant], "rejected": [assistant]}`. Bad rows raise a DataError
naming the source and row before any training starts.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from adpa.config import InputError, expand_path, is_local
from adpa.tasks import FAMILY_NAMES, TaskExample, generate_examples

ROLES = ("system", "user", "assistant")
# A short system turn: replaces chat templates' long default system prompts (fewer tokens on CPU).
GENERATED_SYSTEM_PROMPT = "You are a concise assistant."
Message = dict[str, str]
log = logging.getLogger("adpa")


class DataError(InputError):
    """A dataset that cannot be used; the message names the source and row."""


def _message(raw: Any, where: str) -> Message:
    if not isinstance(raw, Mapping) or "role" not in raw or "content" not in raw:
        raise DataError(f"{where}: each message needs 'role' and 'content', got {raw!r:.80}")
    role, content = raw["role"], raw["content"]
    if role not in ROLES:
        raise DataError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if not isinstance(content, str):
        raise DataError(f"{where}: message content must be text, got {type(content).__name__}")
    return {"role": role, "content": content}


def _conversation(raw: Any, where: str) -> list[Message]:
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise DataError(f"{where}: expected a non-empty list of messages")
    return [_message(message, where) for message in raw]


def _assistant_turn(raw: Any, where: str) -> list[Message]:
    """A response given as text, one message, or a one-message list; must be a non-empty assistant turn."""
    if isinstance(raw, str):
        messages = [{"role": "assistant", "content": raw}]
    elif isinstance(raw, Mapping):
        messages = [_message(raw, where)]
    else:
        messages = _conversation(raw, where)
    last = messages[-1]
    if last["role"] != "assistant" or not last["content"].strip():
        raise DataError(f"{where}: the response must end with a non-empty assistant message")
    return messages


def normalize_sft_row(row: Mapping[str, Any], where: str) -> dict[str, list[Message]]:
    if "messages" not in row:
        raise DataError(f"{where}: missing column 'messages' (have: {', '.join(sorted(row))})")
    messages = _conversation(row["messages"], where)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{where}: no non-empty assistant turn")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise DataError(f"{where}: the conversation must end with a non-empty assistant turn")
    users = [m for m in messages if m["role"] == "user"]
    if not users or any(not m["content"].strip() for m in users):
        raise DataError(f"{where}: {'an empty user turn' if users else 'no user turn'}")
    return {"messages": messages}


def normalize_preference_row(row: Mapping[str, Any], where: str) -> dict[str, list[Message]]:
    """dpo-mix form (chosen/rejected full conversations) or TRL form (prompt + responses)."""
    for column in ("chosen", "rejected"):
        if column not in row:
            raise DataError(f"{where}: missing column '{column}' (have: {', '.join(sorted(row))})")
    if "prompt" in row and row["prompt"] is not None:
        raw_prompt = row["prompt"]
        if isinstance(raw_prompt, str):
            prompt = [{"role": "user", "content": raw_prompt}]
        else:
            prompt = _conversation(raw_prompt, f"{where} (prompt)")
        chosen = _assistant_turn(row["chosen"], f"{where} (chosen)")
        rejected = _assistant_turn(row["rejected"], f"{where} (rejected)")
    else:
        full_chosen = _assistant_turn(row["chosen"], f"{where} (chosen)")
        full_rejected = _assistant_turn(row["rejected"], f"{where} (rejected)")
        prompt = full_chosen[:-1]
        if full_rejected[:-1] != prompt:
            raise DataError(f"{where}: chosen and rejected conversations have different prompts")
        chosen, rejected = full_chosen[-1:], full_rejected[-1:]
    if not prompt or prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user message")
    return {"prompt": prompt, "chosen": chosen[-1:], "rejected": rejected[-1:]}


def load_split(spec: Mapping[str, Any], split: str) -> datasets.Dataset:
    """Load one split from a hub id, a save_to_disk folder, a data-file folder or a single file."""
    reference = spec["path"]
    path = Path(expand_path(reference))
    if is_local(reference):
        if not path.exists():
            raise DataError(f"dataset '{reference}': no such file or directory: {path}")
        if path.is_file():
            kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix)
            if kind is None:
                raise DataError(f"dataset '{reference}': unsupported file type '{path.suffix}'")
            loaded = datasets.load_dataset(kind, data_files=str(path))
        elif (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(str(path))
    else:
        loaded = datasets.load_dataset(reference)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if split not in loaded:
        raise DataError(f"dataset '{reference}': no split '{split}' (have: {', '.join(loaded)})")
    return loaded[split]


# Bad rows listed in the one-line error, before "and N more".
LISTED_BAD_ROWS = 3


def _normalized(dataset: datasets.Dataset, normalize, where: str, drop_bad_rows: bool = False) -> datasets.Dataset:
    """Validate every row up front (cheap), so a bad row stops the run before training.

    Bad rows are an error naming them, unless the config drops them explicitly (then logged)."""
    rows, bad = [], []
    for index, row in enumerate(dataset):
        try:
            rows.append(normalize(row, f"row {index}"))
        except DataError as err:
            bad.append(str(err))
    if bad and not drop_bad_rows:
        listed = "; ".join(bad[:LISTED_BAD_ROWS]) + (f"; and {len(bad) - LISTED_BAD_ROWS} more" if len(bad) > LISTED_BAD_ROWS else "")
        count = f"{len(bad)} bad row{'s' if len(bad) > 1 else ''}"
        raise DataError(f"{where}: {count} of {len(dataset)}: {listed} (drop_bad_rows: true drops them)")
    if bad:
        log.warning("%s: dropped %d bad rows of %d (drop_bad_rows), first: %s", where, len(bad), len(dataset), bad[0])
    if not rows:
        raise DataError(f"{where}: no usable rows")
    return datasets.Dataset.from_list(rows)


def _take(dataset: datasets.Dataset, spec: Mapping[str, Any], split: str) -> datasets.Dataset:
    """max_train_rows cuts the training split only: held-out results never depend on a training setting."""
    limit = spec.get("max_train_rows") if split == spec.get("train_split", "train") else None
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def load_sft(spec: Mapping[str, Any], split: str) -> datasets.Dataset:
    where = f"dataset '{spec['path']}' split '{split}'"
    raw = _take(load_split(spec, split), spec, split)
    return _normalized(raw, normalize_sft_row, where, spec.get("drop_bad_rows", False))


def to_prompt_completion(dataset: datasets.Dataset) -> datasets.Dataset:
    """SFT rows as TRL's conversational prompt + completion: every turn before the last assistant turn is the prompt."""
    return dataset.map(
        lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
        remove_columns=dataset.column_names,
    )


def load_preference(spec: Mapping[str, Any], split: str, keep: Sequence[str] = ()) -> datasets.Dataset:
    """Normalized pairs; `keep` names extra columns carried along (None where a row lacks them)."""
    where = f"dataset '{spec['path']}' split '{split}'"
    raw = _take(load_split(spec, split), spec, split)

    def normalize(row: Mapping[str, Any], row_where: str) -> dict[str, Any]:
        return {**normalize_preference_row(row, row_where), **{column: row.get(column) for column in keep}}

    return _normalized(raw, normalize, where, spec.get("drop_bad_rows", False))


def _exchange(example: TaskExample, answer: str) -> list[Message]:
    return [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": answer}]


def _rows(
    examples: list[TaskExample], families: Sequence[str], multi_turn_fraction: float, rng: random.Random,
    error_rates: Mapping[str, float], rejected_kind: str,
) -> dict[str, list]:
    """Both dataset forms; a fraction of rows carries an earlier, answered exchange as context.

    The SFT answer is the family's typical mistake with the family's error rate (mixed-quality SFT
    data, as in the paper's setting); the preference pair always prefers the correct answer."""
    sft, chosen, rejected, family, answer = [], [], [], [], []
    for example in examples:
        history: list[Message] = [{"role": "system", "content": GENERATED_SYSTEM_PROMPT}]
        if rng.random() < multi_turn_fraction:
            earlier = generate_examples(1, rng.randrange(2**31), families)[0]
            history += _exchange(earlier, earlier.answer)
        sloppy = rng.random() < error_rates.get(example.family, 0.0)
        sft.append(history + _exchange(example, example.typical_mistake if sloppy else example.answer))
        chosen.append(history + _exchange(example, example.answer))
        wrong = example.typical_mistake if rejected_kind == "typical_mistake" else example.wrong_answer
        rejected.append(history + _exchange(example, wrong))
        family.append(example.family)
        answer.append(example.answer)
    return {"sft": sft, "chosen": chosen, "rejected": rejected, "family": family, "answer": answer}


def generate_datasets(spec: Mapping[str, Any], sft_dir: str | os.PathLike, preference_dir: str | os.PathLike) -> None:
    """Write the verifiable task family as two DatasetDicts in the deita and dpo-mix forms: splits
    train, test (held out) and, with validation_rows, validation (for tuning; disjoint from both)."""
    families = spec.get("families") or FAMILY_NAMES
    seed, train_rows, test_rows = spec["seed"], spec["train_rows"], spec["test_rows"]
    validation_rows = spec.get("validation_rows", 0)
    unknown = sorted(set(spec.get("sft_error_rates") or {}) - set(FAMILY_NAMES))
    if unknown:
        raise DataError(f"config key 'datasets.generate.sft_error_rates': unknown task family '{unknown[0]}'")
    sft_train = generate_examples(train_rows, seed, families)
    preference_train = generate_examples(train_rows, seed + 1, families)
    seen = {example.prompt for example in sft_train + preference_train}

    def held_out(rows: int, offset: int) -> list[TaskExample]:
        """Prompts never seen before (in training or an earlier held-out split); oversample, drop repeats."""
        candidates = generate_examples(rows * 4, seed + offset, families)
        fresh = list({example.prompt: example for example in candidates if example.prompt not in seen}.values())[:rows]
        seen.update(example.prompt for example in fresh)
        return fresh

    test = held_out(test_rows, 2)
    splits = {"train": (sft_train, preference_train), "test": (test, test)}
    if validation_rows:
        validation = held_out(validation_rows, 3)
        splits["validation"] = (validation, validation)
    rng = random.Random(seed)
    fraction, error_rates = spec["multi_turn_fraction"], spec.get("sft_error_rates") or {}
    rejected_kind = spec.get("rejected", "near_miss")
    sft_dict, preference_dict = {}, {}
    for split, (sft_examples, preference_examples) in splits.items():
        # Held-out SFT rows stay correct: they measure the SFT loss, not the annotators' sloppiness.
        rates = error_rates if split == "train" else {}
        sft_rows = _rows(sft_examples, families, fraction, rng, rates, rejected_kind)
        preference_rows = _rows(preference_examples, families, fraction, rng, rates, rejected_kind)
        sft_dict[split] = datasets.Dataset.from_dict(
            {"messages": sft_rows["sft"], "family": sft_rows["family"], "answer": sft_rows["answer"]}
        )
        preference_dict[split] = datasets.Dataset.from_dict(
            {key: preference_rows[key] for key in ("chosen", "rejected", "family", "answer")}
        )
    datasets.DatasetDict(sft_dict).save_to_disk(str(sft_dir))
    datasets.DatasetDict(preference_dict).save_to_disk(str(preference_dir))
