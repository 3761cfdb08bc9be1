"""Tests for adpa.inputs.tasks: generation is seeded and balanced, answers are right, verify is strict."""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import itertools
import json
import math
import re
import string
from importlib import resources

import pytest
import tomllib
from conftest import REPO

from adpa.inputs import tasks
from adpa.inputs.tasks import FAMILY_NAMES, TaskExample, generate_examples, iter_examples, prompt_count, verify

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def solve(prompt: str) -> str:
    """Recompute the canonical answer from the prompt text, independently of the generator."""
    if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\? Answer with the number only\.", prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str({"+": a + b, "-": a - b, "*": a * b}[op])
    if m := re.fullmatch(r"Reverse the word '([a-z]+)'\. .*", prompt):
        return m[1][::-1]
    if m := re.fullmatch(r"Write the word '([a-z]+)' in uppercase letters\. .*", prompt):
        return m[1].upper()
    if m := re.fullmatch(r"Write the word '([A-Z]+)' in lowercase letters\. .*", prompt):
        return m[1].lower()
    if m := re.fullmatch(r"How many times does the letter '([a-z])' appear in '([a-z]+)'\? .*", prompt):
        return str(m[2].count(m[1]))
    if m := re.fullmatch(r"Sort these numbers in ascending order: ([\d, ]+)\. .*", prompt):
        return ", ".join(str(v) for v in sorted(int(x) for x in m[1].split(", ")))
    if m := re.fullmatch(r"Which letter comes right after '([a-y])' in the alphabet\? .*", prompt):
        return chr(ord(m[1]) + 1)
    if m := re.fullmatch(r"What day of the week comes after (\w+)\? .*", prompt):
        return DAYS[(DAYS.index(m[1]) + 1) % 7]
    if m := re.fullmatch(
        r"(?:Add|What is the sum of|How much is) (\d) (?:and|plus) (\d)[.?] Answer with the number only\.", prompt
    ):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"Compute (\d) \+ (\d)\. Answer with the number only\.", prompt):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"What is the first letter of the word '([a-z]+)'\? .*", prompt):
        return m[1][0]
    if m := re.fullmatch(r"What is the last letter of the word '([a-z]+)'\? .*", prompt):
        return m[1][-1]
    if m := re.fullmatch(r"Capitalize the first letter of the word '([a-z]+)'\. .*", prompt):
        return m[1].capitalize()
    if m := re.fullmatch(r"What is the plural of the word '([a-z]+)'\? .*", prompt):
        return m[1] + "s"
    raise AssertionError(f"unrecognised prompt: {prompt!r}")


@pytest.fixture(scope="module")
def many() -> list[TaskExample]:
    return generate_examples(900, seed=1234)


def test_family_names_are_unique_and_about_ten() -> None:
    assert len(set(FAMILY_NAMES)) == len(FAMILY_NAMES)
    assert 8 <= len(FAMILY_NAMES) <= 16


def test_same_seed_same_list_and_different_seed_different_list() -> None:
    assert generate_examples(50, seed=7) == generate_examples(50, seed=7)
    assert generate_examples(50, seed=7) != generate_examples(50, seed=8)


def test_generation_does_not_touch_global_random_state() -> None:
    import random

    random.seed(0)
    expected = random.random()
    random.seed(0)
    generate_examples(30, seed=3)
    assert random.random() == expected


def test_prefix_stable_and_n_respected() -> None:
    assert generate_examples(0, seed=1) == []
    assert len(generate_examples(17, seed=1)) == 17
    assert generate_examples(10, seed=5) == generate_examples(25, seed=5)[:10]


def test_iter_examples_is_the_stream_generate_examples_cuts() -> None:
    families = ("first_letter", "small_addition")
    assert list(itertools.islice(iter_examples(4, families), 30)) == generate_examples(30, 4, families)
    with pytest.raises(ValueError):
        iter_examples(0, families=[])


# Families small enough to draw until every prompt has come up.
SMALL_FAMILIES = [family for family in FAMILY_NAMES if prompt_count(family) < 3000]


@pytest.mark.parametrize("family", SMALL_FAMILIES)
def test_prompt_count_is_every_prompt_the_generator_writes(family: str) -> None:
    count = prompt_count(family)
    # Coupon collector: count * (ln count + 12) draws miss one of `count` prompts with probability below e**-12.
    draws = math.ceil(count * (math.log(count) + 12))
    prompts = {example.prompt for example in generate_examples(draws, seed=11, families=[family])}
    assert len(prompts) == count


def test_prompt_count_of_the_large_families_and_unknown_names() -> None:
    assert set(FAMILY_NAMES) - set(SMALL_FAMILIES) == {"addition", "subtraction", "sort_numbers"}
    assert prompt_count("addition") == 90 * 90 and prompt_count("subtraction") == 4005
    # 3, 4 or 5 numbers of 1..49 in any order but the sorted one.
    assert prompt_count("sort_numbers") == 18424 * 5 + 211876 * 23 + 1906884 * 119
    with pytest.raises(ValueError, match="division"):
        prompt_count("division")


@pytest.mark.parametrize("seed", range(5))
def test_every_family_appears(seed: int) -> None:
    examples = generate_examples(len(FAMILY_NAMES) * 2, seed=seed)
    assert {ex.family for ex in examples} == set(FAMILY_NAMES)


def test_family_subset_only_yields_those_families() -> None:
    examples = generate_examples(40, seed=2, families=["addition", "next_day"])
    assert {ex.family for ex in examples} == {"addition", "next_day"}


def test_unknown_family_raises_with_its_name() -> None:
    with pytest.raises(ValueError, match="division"):
        generate_examples(5, seed=0, families=["addition", "division"])


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        generate_examples(-1, seed=0)
    with pytest.raises(ValueError):
        generate_examples(3, seed=0, families=[])
    with pytest.raises(TypeError):
        generate_examples(3, seed=0, families="addition")


def test_answers_are_correct_for_their_prompts(many: list[TaskExample]) -> None:
    for ex in many:
        assert solve(ex.prompt) == ex.answer, ex


def test_answer_verifies_and_wrong_answer_does_not(many: list[TaskExample]) -> None:
    for ex in many:
        assert verify(ex, ex.answer), ex
        assert not verify(ex, ex.wrong_answer), ex
        assert not verify(ex, f"The answer is {ex.wrong_answer}."), ex


def test_prompts_and_answers_are_short(many: list[TaskExample]) -> None:
    for ex in many:
        assert len(ex.prompt.split()) <= 20, ex.prompt
        assert 0 < len(ex.answer) <= 20 and 0 < len(ex.wrong_answer) <= 20, ex


def test_wrong_answers_are_plausible_near_misses(many: list[TaskExample]) -> None:
    for ex in many:
        right, wrong = ex.answer, ex.wrong_answer
        if ex.family in {"addition", "subtraction", "multiplication", "count_letter", "small_addition"}:
            assert wrong.isdigit() and not wrong.startswith("0") or wrong == "0", ex
            swapped = int(right[:-2] + right[-1] + right[-2]) if len(right) >= 2 else None
            assert abs(int(wrong) - int(right)) <= 10 or int(wrong) == swapped, ex
        elif ex.family == "sort_numbers":
            r, w = right.split(", "), wrong.split(", ")
            assert sorted(r) == sorted(w) and sum(a != b for a, b in zip(r, w)) == 2, ex
        elif ex.family == "reverse_word":
            assert len(wrong) == len(right) and wrong.islower(), ex
            assert 1 <= sum(a != b for a, b in zip(right, wrong)) <= 2, ex
        elif ex.family in ("uppercase_word", "lowercase_word", "capitalize_word"):
            assert len(wrong) == len(right), ex
            differing = sum(a != b for a, b in zip(right, wrong))
            assert wrong.upper() == right.upper() or differing == 1, ex
        elif ex.family == "next_letter":
            assert len(wrong) == 1 and abs(ord(wrong) - ord(right)) <= 2, ex
        elif ex.family == "next_day":
            assert wrong in DAYS, ex
        elif ex.family == "plural_word":
            assert wrong.startswith(right[:-1]) and len(wrong) - len(right) in (-1, 1), ex
        elif ex.family in ("first_letter", "last_letter"):
            assert len(wrong) == 1 and wrong.islower(), ex
        else:
            raise AssertionError(ex.family)


def test_each_family_has_varied_wrong_answer_kinds(many: list[TaskExample]) -> None:
    offsets = {int(ex.wrong_answer) - int(ex.answer) for ex in many if ex.family == "addition"}
    assert {-1, 1}.issubset(offsets) and len(offsets) >= 4


def test_sort_prompt_is_never_already_sorted(many: list[TaskExample]) -> None:
    for ex in many:
        if ex.family == "sort_numbers":
            shown = re.search(r": ([\d, ]+)\.", ex.prompt)[1]  # type: ignore[index]
            assert shown != ex.answer


def ex(family: str, answer: str) -> TaskExample:
    return TaskExample(family=family, prompt="(hand-built)", answer=answer, wrong_answer="")


ACCEPTED: list[tuple[str, str, str]] = [
    ("addition", "42", "42"),
    ("addition", "42", " 42. "),
    ("addition", "42", "The answer is 42."),
    ("addition", "42", "Answer: 42"),
    ("addition", "42", "17 + 25 = 42"),
    ("addition", "42", "42.0"),
    ("subtraction", "35", "52 - 17 = 35."),
    ("subtraction", "35", "52-17=35"),
    ("multiplication", "84", "7 * 12 is 84"),
    ("count_letter", "3", "The letter 'r' appears 3 times."),
    ("count_letter", "3", "3"),
    ("sort_numbers", "3, 5, 9", "3, 5, 9"),
    ("sort_numbers", "3, 5, 9", "3 5 9"),
    ("sort_numbers", "3, 5, 9", "[3, 5, 9]"),
    ("sort_numbers", "3, 5, 9", "3,5,9"),
    ("sort_numbers", "3, 5, 9", "The sorted numbers are 3, 5, 9."),
    ("sort_numbers", "3, 5, 9", "Sorting 9, 3, 5 gives 3, 5 and 9."),
    ("sort_numbers", "3, 5, 9", "Answer: [3,5,9]"),
    ("reverse_word", "tenalp", "tenalp"),
    ("reverse_word", "tenalp", "TENALP"),
    ("reverse_word", "tenalp", "The reversed word is 'tenalp'."),
    ("uppercase_word", "CAT", "CAT"),
    ("uppercase_word", "CAT", "The answer is CAT."),
    ("uppercase_word", "CAT", 'Answer: "CAT"'),
    ("next_letter", "h", "h"),
    ("next_letter", "h", "H."),
    ("next_letter", "h", "The next letter is h."),
    ("next_day", "Tuesday", "Tuesday"),
    ("next_day", "Tuesday", "tuesday"),
    ("next_day", "Tuesday", "The day after Monday is TUESDAY."),
    ("first_letter", "g", "g"),
    ("first_letter", "g", "The first letter is G."),
    ("last_letter", "n", "n"),
    ("lowercase_word", "garden", "garden"),
    ("capitalize_word", "Garden", "Garden"),
    ("plural_word", "gardens", "The plural is gardens."),
    ("small_addition", "12", "5 + 7 = 12"),
]

REJECTED: list[tuple[str, str, str]] = [
    ("addition", "42", ""),
    ("addition", "42", "   "),
    ("addition", "42", "43"),
    ("addition", "42", "42? no, 43"),
    ("addition", "42", "-42"),
    ("addition", "42", "42.5"),
    ("addition", "42", "42nd"),
    ("addition", "42", "forty-two"),
    ("subtraction", "35", "45"),
    ("multiplication", "84", "78"),
    ("count_letter", "3", "three"),
    ("sort_numbers", "3, 5, 9", ""),
    ("sort_numbers", "3, 5, 9", "3, 9, 5"),
    ("sort_numbers", "3, 5, 9", "9, 5, 3"),
    ("sort_numbers", "3, 5, 9", "3, 5"),
    ("sort_numbers", "3, 5, 9", "3, 5, 9, 10"),
    ("sort_numbers", "3, 5, 9", "3, 5, 9 from 9, 3, 5"),
    ("sort_numbers", "3, 5, 9", "359"),
    ("reverse_word", "tenalp", ""),
    ("reverse_word", "tenalp", "tenlap"),
    ("reverse_word", "tenalp", "planet"),
    ("reverse_word", "tenalp", "tenalp, no wait, tenapl"),
    ("uppercase_word", "CAT", "cat"),
    ("uppercase_word", "CAT", "Cat"),
    ("uppercase_word", "CAT", "CaT"),
    ("uppercase_word", "CAT", "CAT or COT? COT"),
    ("next_letter", "h", "f"),
    ("next_letter", "h", "hh"),
    ("next_letter", "h", "h? no, i"),
    ("next_day", "Tuesday", "Tue"),
    ("next_day", "Tuesday", "Wednesday"),
    ("next_day", "Tuesday", "Tuesday, no, Monday"),
    ("next_day", "Tuesday", ""),
    ("first_letter", "g", "n"),
    ("last_letter", "n", "g"),
    ("lowercase_word", "garden", "Garden"),
    ("capitalize_word", "Garden", "garden"),
    ("plural_word", "gardens", "garden"),
    ("first_letter", "g", "garden"),
    ("small_addition", "12", "13"),
]


def test_typical_mistake_is_wrong_and_the_family_error(many: list[TaskExample]) -> None:
    for ex in many:
        assert ex.typical_mistake and not verify(ex, ex.typical_mistake), ex
    by_family = {ex.family: ex for ex in many}
    assert by_family["uppercase_word"].typical_mistake == by_family["uppercase_word"].answer.capitalize()
    assert by_family["next_day"].typical_mistake in by_family["next_day"].prompt  # the day asked about
    assert by_family["small_addition"].typical_mistake == str(int(by_family["small_addition"].answer) + 1)
    assert by_family["plural_word"].typical_mistake + "s" == by_family["plural_word"].answer


@pytest.mark.parametrize(("family", "answer", "response"), ACCEPTED)
def test_equivalent_forms_accepted(family: str, answer: str, response: str) -> None:
    assert verify(ex(family, answer), response)


@pytest.mark.parametrize(("family", "answer", "response"), REJECTED)
def test_wrong_forms_rejected(family: str, answer: str, response: str) -> None:
    assert not verify(ex(family, answer), response)


def test_every_family_has_hand_built_accept_and_reject_cases() -> None:
    assert {case[0] for case in ACCEPTED} == set(FAMILY_NAMES)
    assert {case[0] for case in REJECTED} == set(FAMILY_NAMES)


def test_verify_unknown_family_raises() -> None:
    with pytest.raises(ValueError, match="division"):
        verify(TaskExample("division", "p", "2", "3"), "2")


def test_all_letters_and_days_generate() -> None:
    examples = generate_examples(2000, seed=9, families=["next_letter", "next_day"])
    asked = {m[1] for e in examples if (m := re.search(r"after '([a-z])'", e.prompt))}
    assert asked == set(string.ascii_lowercase[:-1])
    assert {e.answer for e in examples if e.family == "next_day"} == set(DAYS)


def sha256_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


WORD_FAMILIES = (
    "reverse_word",
    "uppercase_word",
    "lowercase_word",
    "capitalize_word",
    "plural_word",
    "count_letter",
    "first_letter",
    "last_letter",
)


# sha256 of the examples' JSON, computed with the word lists still inline in adpa/inputs/tasks.py (before they moved
# to adpa/inputs/task_data/). Every generated dataset is built from these examples: a generator change or a word list
# edit that changes the generated data fails here. If the change is meant, update the pins.
@pytest.mark.parametrize(
    ("n", "seed", "families", "sha256"),
    [
        (300, 2024, FAMILY_NAMES, "8db287f67d663c7991ae7483ac6319d3ce4a6f741d1a6a3702a0fa3c2a1f005f"),
        (
            400,
            0,
            ("first_letter", "small_addition", "capitalize_word", "plural_word"),  # config/config.yaml's
            "e09c0f4d5ed19a2a1fb264def6ab9baa5eabed308ea258d366f2cb36ac9bd950",
        ),
        (3000, 1, WORD_FAMILIES, "a72cc5eae82408f8f22e11f51022c0cfe722e61ed4c1231efb478f9ee19583fa"),
    ],
    ids=["all families", "config.yaml families", "word families"],
)
def test_generated_examples_are_pinned(n: int, seed: int, families: tuple[str, ...], sha256: str) -> None:
    rows = [dataclasses.asdict(example) for example in generate_examples(n, seed, families)]
    assert sha256_json(rows) == sha256, "the generated data changed; if that is meant, update the pin"


# What tasks.py reads from each file in adpa/inputs/task_data/.
DATA_FILES = {
    "words.txt": "_WORDS",
    "count_words.txt": "_COUNT_WORDS",
    "many_words.txt": "_MANY_WORDS",
    "no_s_plural.txt": "_NO_S_PLURAL",
}


def test_word_lists_are_pinned() -> None:
    """Any change to a list's words or their order (which seeded picks index into) changes generated data,
    even where the pinned generations above miss it; comments in the files may change freely."""
    tables = {name: getattr(tasks, table) for name, table in DATA_FILES.items()}
    tables = {name: sorted(words) if isinstance(words, frozenset) else list(words) for name, words in tables.items()}
    assert sha256_json(tables) == "d36b488ca343a031c6f383d60016b93eda0a0ae357664cb34532ce71cde625a9", (
        "a word list in adpa/inputs/task_data/ changed, and the generated data with it; if that is meant, update the pin"
    )


def test_each_data_file_is_unique_lowercase_words_and_read_as_written() -> None:
    folder = resources.files("adpa.inputs") / "task_data"
    assert {path.name for path in folder.iterdir()} == set(DATA_FILES), "every file in adpa/inputs/task_data/ is read"
    for name, table in DATA_FILES.items():
        lines = (folder / name).read_text(encoding="utf-8").splitlines()
        entries = [line for line in lines if not line.startswith("#")]
        assert entries, name
        for entry in entries:
            assert re.fullmatch(r"[a-z]+", entry), f"{name}: {entry!r} (blank, padded or not one lowercase word)"
        assert len(set(entries)) == len(entries), f"{name}: a word repeats"
        loaded = getattr(tasks, table)
        assert loaded == (frozenset(entries) if isinstance(loaded, frozenset) else tuple(entries)), name


def test_word_list_reader_skips_comments_and_rejects_bad_lines() -> None:
    assert tasks._parse_words("# about\ncat\n\n  dog \n", "x.txt") == ("cat", "dog")
    for text, message in (
        ("cat\ndog\ncat\n", "x.txt line 3: 'cat' repeats line 1"),
        ("cat\nDog\n", "x.txt line 2: 'Dog' is not one lowercase word"),
        ("ice cream\n", "x.txt line 1: 'ice cream' is not one lowercase word"),
        ("# only a comment\n\n", "x.txt: no words"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            tasks._parse_words(text, "x.txt")


def test_data_files_ship_with_the_package() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools.get("package-data", {}).get("adpa.inputs", [])
    for name in DATA_FILES:
        assert any(fnmatch.fnmatch(f"task_data/{name}", pattern) for pattern in patterns), name
