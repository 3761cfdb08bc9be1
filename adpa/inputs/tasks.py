"""Seeded, verifiable tiny instruction tasks for training and evaluating small language models.

Each `TaskExample` carries a short prompt, its canonical answer, a plausible wrong answer and the
family's typical mistake: the error a sloppy annotator makes (the uppercase word only capitalized,
the day repeated instead of the next one). Mixed-quality SFT data and the rejected side of
preference pairs are built from it (adpa/inputs/data.py). `verify` judges a free-text response by its
*final* answer candidate: the last number, the last list of numbers or the last word.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import re
import string
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class TaskExample:
    """One task instance: the user prompt, the canonical answer, a plausible wrong answer and the
    family's typical mistake (always wrong too)."""

    family: str
    prompt: str
    answer: str
    wrong_answer: str
    typical_mistake: str = ""


FAMILY_NAMES: tuple[str, ...] = (
    "addition",
    "subtraction",
    "multiplication",
    "reverse_word",
    "uppercase_word",
    "count_letter",
    "sort_numbers",
    "next_letter",
    "next_day",
    "first_letter",
    "small_addition",
    "last_letter",
    "lowercase_word",
    "capitalize_word",
    "plural_word",
)

_NUMERIC_FAMILIES = frozenset({"addition", "subtraction", "multiplication", "count_letter", "small_addition"})
_LIST_FAMILIES = frozenset({"sort_numbers"})
_CASELESS_WORD_FAMILIES = frozenset({"reverse_word", "next_letter", "next_day", "first_letter", "last_letter"})
_CASED_WORD_FAMILIES = frozenset({"uppercase_word", "lowercase_word", "capitalize_word"})
_PLAIN_WORD_FAMILIES = frozenset({"plural_word"})  # the whole word, case-blind

# The word lists live in adpa/inputs/task_data/, one word a line, read once at import. adpa/workflow/provenance.py hashes
# the files of the folder named here with this module's code: editing a list reruns the stages that run it.
_DATA_FOLDER = "task_data"


def _parse_words(text: str, source: str) -> tuple[str, ...]:
    """The words of a task data file in file order: one lowercase word (a-z) a line, each once; blank lines
    and lines starting with '#' are skipped. Anything else raises ValueError naming the file and line."""
    first_seen: dict[str, int] = {}  # word -> its line number, in file order
    for number, line in enumerate(text.splitlines(), 1):
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if not re.fullmatch(r"[a-z]+", word):
            raise ValueError(f"{source} line {number}: {word!r} is not one lowercase word (a-z)")
        if word in first_seen:
            raise ValueError(f"{source} line {number}: {word!r} repeats line {first_seen[word]}")
        first_seen[word] = number
    if not first_seen:
        raise ValueError(f"{source}: no words")
    return tuple(first_seen)


def _read_words(name: str) -> tuple[str, ...]:
    text = (resources.files(__package__) / _DATA_FOLDER / name).read_text(encoding="utf-8")
    return _parse_words(text, f"adpa/{_DATA_FOLDER}/{name}")


_WORDS = _read_words("words.txt")
# A palindrome would make "reverse the word" a copy task.
_REVERSIBLE_WORDS: tuple[str, ...] = tuple(w for w in _WORDS if w != w[::-1])
# Words with repeated letters, so counts other than 1 come up.
_COUNT_WORDS = _read_words("count_words.txt")
# Common words for the word families with many prompts (held-out prompts need a large space).
_MANY_WORDS = _read_words("many_words.txt")

_DAYS: tuple[str, ...] = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_LETTERS = string.ascii_lowercase

# A number not glued to a word or to another number's decimal point ("x2", "42nd", "1.5" -> "1.5").
_NUMBER_RE = re.compile(r"(?<![\w.])(-?)(\d+)(?:\.(\d+))?(?!\w)")
_INT = r"-?\d+(?!\w)"
_LIST_RE = re.compile(rf"(?<![\w.]){_INT}(?:(?:\s*[,;]\s*|\s+)(?:and\s+)?{_INT})*")
_INT_RE = re.compile(r"-?\d+")
_WORD_RE = re.compile(r"[A-Za-z]+")

_NUMBER_ONLY = "Answer with the number only."

# Returns (prompt, canonical answer, wrong-answer candidates, typical mistake).
_Generator = Callable[[random.Random], tuple[str, str, list[str], str]]


def _swap_last_digits(value: int) -> int | None:
    """`value` with its last two digits swapped, or None if that is a no-op or gives a leading zero."""
    text = str(value)
    if len(text) < 2 or text[-1] == text[-2] or (len(text) == 2 and text[-1] == "0"):
        return None
    return int(text[:-2] + text[-1] + text[-2])


def _numeric_misses(value: int, offsets: Sequence[int], swap: bool = True) -> list[str]:
    candidates = [value + offset for offset in offsets]
    swapped = _swap_last_digits(value) if swap else None
    if swapped is not None:
        candidates.append(swapped)
    return [str(c) for c in candidates if c >= 0 and c != value]


def _gen_addition(rng: random.Random) -> tuple[str, str, list[str], str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    total = a + b
    # +-10 is the dropped/extra carry mistake.
    # The dropped carry is the typical mistake (or an extra one when there is none to drop).
    mistake = total - 10 if (a % 10) + (b % 10) >= 10 else total + 10
    return f"What is {a} + {b}? {_NUMBER_ONLY}", str(total), _numeric_misses(total, (-1, 1, -10, 10)), str(mistake)


def _gen_subtraction(rng: random.Random) -> tuple[str, str, list[str], str]:
    a = rng.randint(11, 99)
    b = rng.randint(10, a - 1)
    diff = a - b
    # +10 is the "forgot to borrow" mistake.
    return f"What is {a} - {b}? {_NUMBER_ONLY}", str(diff), _numeric_misses(diff, (-1, 1, 10, -10)), str(diff + 10)


def _gen_multiplication(rng: random.Random) -> tuple[str, str, list[str], str]:
    a, b = rng.randint(2, 9), rng.randint(2, 19)
    product = a * b
    # +-a is "one row of the times table off".
    misses = _numeric_misses(product, (-1, 1, -a, a))
    return f"What is {a} * {b}? {_NUMBER_ONLY}", str(product), misses, str(product + a)


def _gen_reverse_word(rng: random.Random) -> tuple[str, str, list[str], str]:
    word = rng.choice(_REVERSIBLE_WORDS)
    answer = word[::-1]
    misses = [
        answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]
        for i in range(len(answer) - 1)
        if answer[i] != answer[i + 1]
    ]
    i = rng.randrange(len(answer))
    replacement = rng.choice([c for c in _LETTERS if c != answer[i]])
    misses.append(answer[:i] + replacement + answer[i + 1 :])
    return f"Reverse the word '{word}'. Answer with the reversed word only.", answer, misses, word


def _gen_uppercase_word(rng: random.Random) -> tuple[str, str, list[str], str]:
    word = rng.choice(_MANY_WORDS)
    answer = word.upper()
    i = rng.randrange(len(word))
    replacement = rng.choice([c for c in _LETTERS if c != word[i]]).upper()
    misses = [
        word.capitalize(),
        answer[:i] + word[i] + answer[i + 1 :],  # one letter left lower case
        answer[:i] + replacement + answer[i + 1 :],
    ]
    return f"Write the word '{word}' in uppercase letters. Answer with the word only.", answer, misses, misses[0]


def _gen_lowercase_word(rng: random.Random) -> tuple[str, str, list[str], str]:
    word = rng.choice(_MANY_WORDS)
    i = rng.randrange(len(word))
    misses = [word.capitalize(), word.upper(), word[:i] + word[i].upper() + word[i + 1 :]]
    return f"Write the word '{word.upper()}' in lowercase letters. Answer with the word only.", word, misses, misses[0]


def _gen_capitalize_word(rng: random.Random) -> tuple[str, str, list[str], str]:
    word = rng.choice(_MANY_WORDS)
    misses = [word, word.upper(), word[0] + word[1:].capitalize()]
    prompt = f"Capitalize the first letter of the word '{word}'. Answer with the word only."
    return prompt, word.capitalize(), misses, word


# Irregular or uncountable nouns: no plural by adding an s.
_NO_S_PLURAL = frozenset(_read_words("no_s_plural.txt"))
# Nouns whose plural only adds an s (no -s/-x/-z/-ch/-sh/-y/-o/-f endings).
_PLURAL_WORDS: tuple[str, ...] = tuple(
    w
    for w in _MANY_WORDS
    if not w.endswith(("s", "x", "z", "ch", "sh", "y", "o", "f", "fe")) and w not in _NO_S_PLURAL
)


def _gen_plural_word(rng: random.Random) -> tuple[str, str, list[str], str]:
    word = rng.choice(_PLURAL_WORDS)
    misses = [word, word + "es", word + "ss"]
    prompt = f"What is the plural of the word '{word}'? Answer with the word only."
    return prompt, word + "s", misses, word


def _gen_count_letter(rng: random.Random) -> tuple[str, str, list[str], str]:
    word = rng.choice(_COUNT_WORDS)
    letter = rng.choice(word)  # by position, so repeated letters are asked about more often
    count = word.count(letter)
    prompt = f"How many times does the letter '{letter}' appear in '{word}'? {_NUMBER_ONLY}"
    return prompt, str(count), _numeric_misses(count, (-1, 1), swap=False), str(count + 1)


def _format_list(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values)


def _gen_sort_numbers(rng: random.Random) -> tuple[str, str, list[str], str]:
    ordered = sorted(rng.sample(range(1, 50), rng.randint(3, 5)))
    shown = list(ordered)
    while shown == ordered:
        rng.shuffle(shown)
    misses = []
    for i, j in [(i, i + 1) for i in range(len(ordered) - 1)] + [(0, len(ordered) - 1)]:
        near = list(ordered)
        near[i], near[j] = near[j], near[i]
        misses.append(_format_list(near))
    prompt = f"Sort these numbers in ascending order: {_format_list(shown)}. Answer with the numbers only."
    return prompt, _format_list(ordered), misses, _format_list(shown)


def _gen_next_letter(rng: random.Random) -> tuple[str, str, list[str], str]:
    index = rng.randrange(len(_LETTERS) - 1)  # never 'z'
    letter = _LETTERS[index]
    misses = [_LETTERS[i] for i in (index - 1, index + 2, index) if 0 <= i < len(_LETTERS)]
    prompt = f"Which letter comes right after '{letter}' in the alphabet? Answer with the letter only."
    return prompt, _LETTERS[index + 1], misses, letter


def _gen_next_day(rng: random.Random) -> tuple[str, str, list[str], str]:
    index = rng.randrange(len(_DAYS))
    misses = [_DAYS[(index + offset) % len(_DAYS)] for offset in (-1, 2, 0)]
    prompt = f"What day of the week comes after {_DAYS[index]}? Answer with the day only."
    return prompt, _DAYS[(index + 1) % len(_DAYS)], misses, _DAYS[index]


# Words whose last letter differs from the first: each is the other's typical mistake.
_FIRST_LETTER_WORDS: tuple[str, ...] = tuple(w for w in _MANY_WORDS if w[0] != w[-1])


def _gen_first_letter(rng: random.Random) -> tuple[str, str, list[str], str]:
    word = rng.choice(_FIRST_LETTER_WORDS)
    misses = [word[1], word[-1], rng.choice([c for c in _LETTERS if c != word[0]])]
    prompt = f"What is the first letter of the word '{word}'? Answer with the letter only."
    return prompt, word[0], misses, word[-1]


def _gen_last_letter(rng: random.Random) -> tuple[str, str, list[str], str]:
    word = rng.choice(_FIRST_LETTER_WORDS)
    misses = [word[-2], word[0], rng.choice([c for c in _LETTERS if c != word[-1]])]
    prompt = f"What is the last letter of the word '{word}'? Answer with the letter only."
    return prompt, word[-1], misses, word[0]


# Several wordings: 81 one-digit sums would leave no unseen prompts for a held-out split.
_SMALL_ADDITION_PROMPTS: tuple[str, ...] = (
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "Compute {a} + {b}.",
    "What is the sum of {a} and {b}?",
    "How much is {a} plus {b}?",
)


def _gen_small_addition(rng: random.Random) -> tuple[str, str, list[str], str]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    total = a + b
    prompt = f"{rng.choice(_SMALL_ADDITION_PROMPTS).format(a=a, b=b)} {_NUMBER_ONLY}"
    return prompt, str(total), _numeric_misses(total, (-2, -1, 1, 2), swap=False), str(total + 1)


_GENERATORS: dict[str, _Generator] = {
    "addition": _gen_addition,
    "subtraction": _gen_subtraction,
    "multiplication": _gen_multiplication,
    "reverse_word": _gen_reverse_word,
    "uppercase_word": _gen_uppercase_word,
    "count_letter": _gen_count_letter,
    "sort_numbers": _gen_sort_numbers,
    "next_letter": _gen_next_letter,
    "next_day": _gen_next_day,
    "first_letter": _gen_first_letter,
    "small_addition": _gen_small_addition,
    "last_letter": _gen_last_letter,
    "lowercase_word": _gen_lowercase_word,
    "capitalize_word": _gen_capitalize_word,
    "plural_word": _gen_plural_word,
}
assert tuple(_GENERATORS) == FAMILY_NAMES

# Distinct prompts each generator can write, counted from its ranges and word lists (each word list holds
# every word once). tests/test_tasks.py draws the small families until no new prompt comes up.
_PROMPT_COUNTS: dict[str, int] = {
    "addition": 90 * 90,  # a, b in 10..99
    "subtraction": sum(a - 10 for a in range(11, 100)),  # b in 10..a-1
    "multiplication": 8 * 18,  # a in 2..9, b in 2..19
    "reverse_word": len(_REVERSIBLE_WORDS),
    "uppercase_word": len(_MANY_WORDS),
    "count_letter": sum(len(set(word)) for word in _COUNT_WORDS),  # one prompt per distinct letter of a word
    # 3 to 5 numbers of 1..49, shown in any order but the sorted one.
    "sort_numbers": sum(math.comb(49, k) * (math.factorial(k) - 1) for k in range(3, 6)),
    "next_letter": len(_LETTERS) - 1,  # never 'z'
    "next_day": len(_DAYS),
    "first_letter": len(_FIRST_LETTER_WORDS),
    "small_addition": 9 * 9 * len(_SMALL_ADDITION_PROMPTS),
    "last_letter": len(_FIRST_LETTER_WORDS),
    "lowercase_word": len(_MANY_WORDS),
    "capitalize_word": len(_MANY_WORDS),
    "plural_word": len(_PLURAL_WORDS),
}
assert tuple(_PROMPT_COUNTS) == FAMILY_NAMES


def prompt_count(family: str) -> int:
    """The number of distinct prompts `family` can produce. Held-out splits need prompts the training
    splits never drew, so this bounds how many held-out rows a config can ask for (adpa/inputs/datagen.py)."""
    if family not in _PROMPT_COUNTS:
        raise ValueError(f"unknown task family {family!r} (expected one of {', '.join(FAMILY_NAMES)})")
    return _PROMPT_COUNTS[family]


def _final_candidate(family: str, text: str) -> Hashable | None:
    """The normalized final answer stated in `text` for `family`, or None if it states none."""
    if family in _NUMERIC_FAMILIES:
        numbers = list(_NUMBER_RE.finditer(text))
        if not numbers:
            return None
        sign, whole, fraction = numbers[-1].groups()
        if fraction and fraction.strip("0"):
            return None  # a non-integer can never be a correct answer here
        return int(sign + whole)
    if family in _LIST_FAMILIES:
        lists = list(_LIST_RE.finditer(text))
        if not lists:
            return None
        return tuple(int(v) for v in _INT_RE.findall(lists[-1].group()))
    if family in _CASELESS_WORD_FAMILIES or family in _CASED_WORD_FAMILIES or family in _PLAIN_WORD_FAMILIES:
        words = _WORD_RE.findall(text)
        if not words:
            return None
        return words[-1] if family in _CASED_WORD_FAMILIES else words[-1].lower()
    raise ValueError(f"unknown task family {family!r} (expected one of {', '.join(FAMILY_NAMES)})")


def verify(example: TaskExample, response: str) -> bool:
    """True iff the final answer stated in `response` is the example's correct answer."""
    expected = _final_candidate(example.family, example.answer)
    got = _final_candidate(example.family, response)
    return expected is not None and got == expected


# The generators repeat the same few answer texts: caching their parse makes generation about twice as fast
# (adpa/inputs/datagen.py regenerates the training examples in `python -m adpa check`).
_cached_candidate = functools.lru_cache(maxsize=1 << 16)(_final_candidate)


def _make_example(family: str, rng: random.Random) -> TaskExample:
    prompt, answer, candidates, mistake = _GENERATORS[family](rng)
    expected = _cached_candidate(family, answer)
    wrong = [c for c in dict.fromkeys(candidates) if _cached_candidate(family, c) not in (None, expected)]
    if not wrong or _cached_candidate(family, mistake) in (None, expected):  # generators always give both
        raise RuntimeError(f"no wrong answer for {family!r} prompt {prompt!r}")
    return TaskExample(family, prompt, answer, rng.choice(wrong), mistake)


def _family_names(families: Sequence[str]) -> tuple[str, ...]:
    if isinstance(families, str):
        raise TypeError(f"families must be a sequence of family names, not the string {families!r}")
    names = tuple(families)
    for name in names:
        if name not in _GENERATORS:
            raise ValueError(f"unknown task family {name!r} (expected one of {', '.join(FAMILY_NAMES)})")
    return names


def _stream(seed: int, names: tuple[str, ...]) -> Iterator[TaskExample]:
    rng = random.Random(seed)
    block: list[str] = []
    while True:
        if not block:
            # Shuffled round-robin: balanced coverage without a fixed, learnable order.
            block = list(names)
            rng.shuffle(block)
        yield _make_example(block.pop(), rng)


def iter_examples(seed: int, families: Sequence[str] = FAMILY_NAMES) -> Iterator[TaskExample]:
    """The endless example stream that `generate_examples(n, seed, families)` takes its first n from: a
    caller that needs more than it first drew continues the same stream instead of regenerating it."""
    names = _family_names(families)
    if not names:
        raise ValueError("families must name at least one task family")
    return _stream(seed, names)


def generate_examples(n: int, seed: int, families: Sequence[str] = FAMILY_NAMES) -> list[TaskExample]:
    """`n` examples, deterministic for `(n, seed, families)`; each block of len(families) covers all of them."""
    names = _family_names(families)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n > 0 and not names:
        raise ValueError("families must name at least one task family")
    return list(itertools.islice(_stream(seed, names), n))
