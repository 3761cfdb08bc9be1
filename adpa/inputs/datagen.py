"""The embedded default's data: the verifiable task families written in both dataset forms (rule generate_data).

Apart from adpa/inputs/data.py (loading), so that a stage reading a real dataset never hashes the task generator.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from adpa.core.errors import ConfigError, InputError
from adpa.inputs.data import DataError, Message
from adpa.inputs.tasks import FAMILY_NAMES, TaskExample, generate_examples, iter_examples, prompt_count

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


@dataclass(frozen=True)
class HeldOutCapacity:
    """How many prompts the held-out splits can still use: the families' distinct prompts less those the two
    training splits drew (held-out prompts must be unseen in training and differ between test and validation)."""

    families: tuple[str, ...]
    train_rows: int
    prompts: int  # distinct prompts the families hold
    used: int  # of them, drawn by the training splits

    @property
    def left(self) -> int:
        return self.prompts - self.used


def _families(spec: Mapping[str, Any], error: type[InputError]) -> tuple[str, ...]:
    families = tuple(spec.get("families") or FAMILY_NAMES)
    unknown = [name for name in families if name not in FAMILY_NAMES]
    if unknown:
        raise error(
            f"config key 'datasets.generate.families': unknown task family '{unknown[0]}' "
            f"(expected one of {', '.join(FAMILY_NAMES)})"
        )
    return families


def _training_examples(spec: Mapping[str, Any], families: Sequence[str]) -> tuple[list[TaskExample], ...]:
    """The SFT and the preference training examples: the same families, seeds S and S+1."""
    seed, train_rows = spec["seed"], spec["train_rows"]
    return generate_examples(train_rows, seed, families), generate_examples(train_rows, seed + 1, families)


def _capacity(families: Sequence[str], train_rows: int, seen: set[str]) -> HeldOutCapacity:
    """Exact, because each family's prompts differ from every other family's: `seen` (the training
    prompts) takes its share of the families' prompts and leaves the rest."""
    distinct = tuple(dict.fromkeys(families))
    return HeldOutCapacity(distinct, train_rows, sum(prompt_count(family) for family in distinct), len(seen))


def heldout_capacity(spec: Mapping[str, Any]) -> HeldOutCapacity:
    """The exact held-out capacity of a `datasets.generate` spec; regenerates the training examples
    (deterministic and fast: well under a second for 20000 training rows)."""
    families = _families(spec, ConfigError)
    sft_train, preference_train = _training_examples(spec, families)
    return _capacity(families, spec["train_rows"], {example.prompt for example in sft_train + preference_train})


def _capacity_problem(spec: Mapping[str, Any], capacity: HeldOutCapacity) -> str | None:
    """One line naming the key to change when the held-out rows asked exceed the capacity, else None."""
    test_rows, validation_rows = spec["test_rows"], spec.get("validation_rows") or 0
    if test_rows + validation_rows <= capacity.left:
        return None
    key = "test_rows" if test_rows > capacity.left else "validation_rows"
    asked = f"{test_rows} test and {validation_rows} validation rows" if validation_rows else f"{test_rows} test rows"
    return (
        f"config key 'datasets.generate.{key}': {asked} asked, but the families {', '.join(capacity.families)} "
        f"hold {capacity.prompts} distinct prompts and the training splits (train_rows {capacity.train_rows}, "
        f"twice) use {capacity.used} of them: {capacity.left} left for the held-out splits; "
        "lower train_rows or the held-out rows, or add families"
    )


def check_generated_capacity(spec: Mapping[str, Any] | None) -> None:
    """For `python -m adpa check`: raise ConfigError (one line) when the generated held-out splits cannot get
    the rows asked; nothing to check without a `datasets.generate` spec."""
    if not spec:
        return
    problem = _capacity_problem(spec, heldout_capacity(spec))
    if problem:
        raise ConfigError(problem)


# Coupon collector: N (ln N + 40) uniform draws miss one of N prompts with probability below e**-40.
_MISS_EXPONENT = 40
# A family this large is never drawn out: its unseen prompts come up at once (sort_numbers has 2e8).
_LARGE_FAMILY = 100_000


def _draw_limit(families: Sequence[str], rows: int) -> int:
    """Draws after which a held-out split gives up: far more than needed to meet every unseen prompt of
    every family (the capacity check runs first, so reaching it means a bug, not bad luck)."""
    sizes = [min(prompt_count(family), _LARGE_FAMILY) for family in families]
    return rows * 4 + len(families) * max(math.ceil(size * (math.log(size) + _MISS_EXPONENT)) for size in sizes)


def _held_out(rows: int, seed: int, families: Sequence[str], seen: set[str], split: str) -> list[TaskExample]:
    """`rows` examples with prompts not in `seen` (which they join), from the example stream of `seed`.

    The first pass is the one the data were always made with (rows * 4 candidates, repeats dropped, the
    last example of a repeated prompt kept): data that pass filled stay byte for byte the same. Only a
    short pass continues the same stream, keeping each new prompt's first example, up to a draw limit."""
    stream = iter_examples(seed, families)
    candidates = list(itertools.islice(stream, rows * 4))
    fresh = {example.prompt: example for example in candidates if example.prompt not in seen}
    fresh = dict(itertools.islice(fresh.items(), rows))
    drawn, limit = len(candidates), _draw_limit(families, rows)
    while len(fresh) < rows and drawn < limit:
        example = next(stream)
        drawn += 1
        if example.prompt not in seen and example.prompt not in fresh:
            fresh[example.prompt] = example
    if len(fresh) < rows:
        raise DataError(
            f"datasets.generate: the '{split}' split found {len(fresh)} of its {rows} unseen prompts in {drawn} "
            "draws, though the capacity check passed (a bug in adpa/inputs/datagen.py)"
        )
    seen.update(fresh)
    return list(fresh.values())


def generate_datasets(spec: Mapping[str, Any], sft_dir: str | os.PathLike, preference_dir: str | os.PathLike) -> None:
    """Write the verifiable task family as two DatasetDicts in the deita and dpo-mix forms: splits
    train, test (held out) and, with validation_rows, validation (for tuning; disjoint from both).

    Held-out rows the families cannot supply are a DataError naming the key, never short or empty splits."""
    families = _families(spec, DataError)
    seed, test_rows = spec["seed"], spec["test_rows"]
    validation_rows = spec.get("validation_rows", 0)
    for key in ("sft_error_rates", "flipped_pair_rates"):
        unknown = sorted(set(spec.get(key) or {}) - set(FAMILY_NAMES))
        if unknown:
            raise DataError(f"config key 'datasets.generate.{key}': unknown task family '{unknown[0]}'")
    sft_train, preference_train = _training_examples(spec, families)
    seen = {example.prompt for example in sft_train + preference_train}
    problem = _capacity_problem(spec, _capacity(families, spec["train_rows"], seen))
    if problem:
        raise DataError(problem)
    test = _held_out(test_rows, seed + 2, families, seen, "test")
    splits = {"train": (sft_train, preference_train), "test": (test, test)}
    if validation_rows:
        validation = _held_out(validation_rows, seed + 3, families, seen, "validation")
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


def training_prompts(spec: Mapping[str, Any]) -> dict[str, list[list[Message]]]:
    """The prompts (every turn before the answer) of the training rows generate_datasets writes, by
    dataset ("sft", "preference"): the preflight counts their tokens before the data exist. The
    training split is drawn first there, from a fresh generator, as here."""
    families = _families(spec, ConfigError)
    sft_train, preference_train = _training_examples(spec, families)
    rng = random.Random(spec["seed"])
    fraction, error_rates = spec["multi_turn_fraction"], spec.get("sft_error_rates") or {}
    rejected_kind = spec.get("rejected", "near_miss")
    sft = _rows(sft_train, families, fraction, rng, error_rates, rejected_kind)
    preference = _rows(preference_train, families, fraction, rng, error_rates, rejected_kind)
    return {"sft": [row[:-1] for row in sft["sft"]], "preference": [row[:-1] for row in preference["chosen"]]}


def run_generate_data(params: Mapping[str, Any], *, sft_output: Path, preference_output: Path) -> dict:
    """Stage generate_data."""
    generate_datasets(params["generate"], sft_output, preference_output)
    return {}
