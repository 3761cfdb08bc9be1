"""The embedded default's data: the verifiable task families written in both dataset forms (rule generate_data).

Apart from adpa/data.py (loading), so that a stage reading a real dataset never hashes the task generator.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from adpa.data import DataError, Message
from adpa.tasks import FAMILY_NAMES, TaskExample, generate_examples

# A short system turn: replaces chat templates' long default system prompts (fewer tokens on CPU).
GENERATED_SYSTEM_PROMPT = "You are a concise assistant."


def _exchange(example: TaskExample, answer: str) -> list[Message]:
    return [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": answer}]


def _rows(
    examples: list[TaskExample],
    families: Sequence[str],
    multi_turn_fraction: float,
    rng: random.Random,
    error_rates: Mapping[str, float],
    rejected_kind: str,
    flip_rates: Mapping[str, float] | None = None,
    flip_rng: random.Random | None = None,
) -> dict[str, list]:
    """Both dataset forms; a fraction of rows carries an earlier, answered exchange as context.

    The SFT answer is the family's typical mistake with the family's error rate (mixed-quality SFT
    data, as in the paper's setting). The preference pair prefers the correct answer, except for
    the family's flip rate of pairs, whose labels are swapped (a noisy rater). Flips draw from their
    own generator, so data without flips is the same as before they existed."""
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
        flip_rate = (flip_rates or {}).get(example.family, 0.0)
        if flip_rate and flip_rng is not None and flip_rng.random() < flip_rate:
            chosen[-1], rejected[-1] = rejected[-1], chosen[-1]
        family.append(example.family)
        answer.append(example.answer)
    return {"sft": sft, "chosen": chosen, "rejected": rejected, "family": family, "answer": answer}


def generate_datasets(spec: Mapping[str, Any], sft_dir: str | os.PathLike, preference_dir: str | os.PathLike) -> None:
    """Write the verifiable task family as two DatasetDicts in the deita and dpo-mix forms: splits
    train, test (held out) and, with validation_rows, validation (for tuning; disjoint from both)."""
    families = spec.get("families") or FAMILY_NAMES
    seed, train_rows, test_rows = spec["seed"], spec["train_rows"], spec["test_rows"]
    validation_rows = spec.get("validation_rows", 0)
    for key in ("sft_error_rates", "flipped_pair_rates"):
        unknown = sorted(set(spec.get(key) or {}) - set(FAMILY_NAMES))
        if unknown:
            raise DataError(f"config key 'datasets.generate.{key}': unknown task family '{unknown[0]}'")
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
    flip_rates, flip_rng = spec.get("flipped_pair_rates") or {}, random.Random(f"flipped-pairs-{seed}")
    sft_dict, preference_dict = {}, {}
    for split, (sft_examples, preference_examples) in splits.items():
        # Held-out SFT rows stay correct: they measure the SFT loss, not the annotators' sloppiness.
        # Held-out pairs stay correctly labelled too: preference accuracy is measured against the truth.
        rates, flips = (error_rates, flip_rates) if split == "train" else ({}, {})
        sft_rows = _rows(sft_examples, families, fraction, rng, rates, rejected_kind)
        preference_rows = _rows(preference_examples, families, fraction, rng, rates, rejected_kind, flips, flip_rng)
        sft_dict[split] = datasets.Dataset.from_dict(
            {"messages": sft_rows["sft"], "family": sft_rows["family"], "answer": sft_rows["answer"]}
        )
        preference_dict[split] = datasets.Dataset.from_dict(
            {key: preference_rows[key] for key in ("chosen", "rejected", "family", "answer")}
        )
    datasets.DatasetDict(sft_dict).save_to_disk(str(sft_dir))
    datasets.DatasetDict(preference_dict).save_to_disk(str(preference_dir))


def run_generate_data(params: Mapping[str, Any], *, sft_output: Path, preference_output: Path) -> dict:
    """Stage generate_data."""
    generate_datasets(params["generate"], sft_output, preference_output)
    return {}
