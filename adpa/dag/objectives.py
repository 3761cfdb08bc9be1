"""The distillation losses as data: each is a weighted sum of per-token terms on named sequences.

No torch here: Snakemake reads the method registry (adpa/dag/methods.py), which declares each method's
terms, at parse time. adpa/training/losses.py computes the terms (`response_term_sums`) and their weighted
sum (`loss_from_term_sums`) for any table of them.

Sequences are named by what they are: ``chosen`` (y_w), ``rejected`` (y_l) and ``own`` (the
student's own response). Token kinds: ``nll`` (-log pi_S(label)), ``topk_kl`` (forward KL to the
teacher's stored top-k with the rest bin) and ``advantage`` (sum over the stored top-k of
pi_S(a|s_t) A(s_t, a), A read from an advantage store).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple

TokenKind = Literal["nll", "topk_kl", "advantage"]
SequenceName = Literal["chosen", "rejected", "own"]
# Batch order of the sequences of one example (the collator lays them out in this order).
SEQUENCE_ORDER: tuple[SequenceName, ...] = ("chosen", "rejected", "own")


class Term(NamedTuple):
    """One term of a loss: sign * weight * response_mean(per-token `tokens` on `sequence`)."""

    tokens: TokenKind
    sequence: SequenceName
    weight: str | None  # the training setting that weighs it (e.g. "nll_weight"); None: 1
    sign: float = 1.0


Terms = Mapping[str, Term]

NLL_ON_CHOSEN: Terms = {"nll": Term("nll", "chosen", None)}
VANILLA_KD: Terms = {"nll": Term("nll", "chosen", "nll_weight"), "chosen_kl": Term("topk_kl", "chosen", "kl_weight")}
DCKD: Terms = {
    "nll": Term("nll", "chosen", "nll_weight"),
    "chosen_kl": Term("topk_kl", "chosen", "chosen_kl_weight"),
    "rejected_kl": Term("topk_kl", "rejected", "rejected_kl_weight"),
}
ADPA: Terms = {
    "nll": Term("nll", "chosen", "nll_weight"),
    "own_advantage": Term("advantage", "own", "adpa_weight", -1.0),
}
# The paper's losses by name (the tests and benches name them so).
LOSSES: dict[str, Terms] = {"nll": NLL_ON_CHOSEN, "vanilla_kd": VANILLA_KD, "dckd": DCKD, "adpa": ADPA}


def resolve(objective: str | Terms) -> Terms:
    """A loss's terms, given them or the name of one of LOSSES."""
    if isinstance(objective, str):
        if objective not in LOSSES:
            raise ValueError(f"unknown objective {objective!r} (one of {', '.join(LOSSES)})")
        return LOSSES[objective]
    return objective


def sequences_of(objective: str | Terms) -> tuple[SequenceName, ...]:
    """The sequences a loss reads, in batch order."""
    named = {term.sequence for term in resolve(objective).values()}
    return tuple(name for name in SEQUENCE_ORDER if name in named)


def weights_of(objective: str | Terms) -> tuple[str, ...]:
    """The training settings a loss reads as its terms' weights, in term order."""
    return tuple(dict.fromkeys(term.weight for term in resolve(objective).values() if term.weight is not None))


def store_kind(objective: str | Terms, sequence: str) -> Literal["topk", "advantage"] | None:
    """Which store a sequence's terms read: the teacher's top-k, an advantage store, or none."""
    kinds = {term.tokens for term in resolve(objective).values() if term.sequence == sequence}
    if {"topk_kl", "advantage"} <= kinds:
        raise ValueError(f"sequence {sequence!r} cannot read both the top-k store and an advantage store")
    if "topk_kl" in kinds:
        return "topk"
    return "advantage" if "advantage" in kinds else None
