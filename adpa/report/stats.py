"""Per-row metrics of an evaluation and percentile-bootstrap confidence intervals of their means.

Every evaluated model answers the same held-out rows, and so does every student seed, so a metric
is an array shaped [seeds, rows] (a teacher, trained once, has one seed). Rows a metric does not
apply to (no verifier verdict) hold NaN and are left out of every mean.

With several seeds the bootstrap has two levels: each resample draws seeds with replacement and
rows with replacement, and the drawn rows are the same for every drawn seed, since the rows are
shared by all seeds (crossed, not nested: drawing rows per seed would count one held-out row's
difficulty as if it were several independent rows). A paired difference A - B resamples the per-row
differences, which applies the same row and seed indices to both models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

RESAMPLES = 2000
CONFIDENCE = 0.95
RANDOM_SEED = 0
# Metrics that compare the two log-probabilities of a row; they need the answer records' log-prob fields.
PREFERENCE_METRICS = ("preference_accuracy", "preference_accuracy_per_token", "margin", "margin_per_token")


@dataclass(frozen=True)
class Interval:
    """An estimate with the bounds of its confidence interval; all NaN where nothing was measured."""

    estimate: float
    low: float
    high: float

    @property
    def measured(self) -> bool:
        return not math.isnan(self.estimate)

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @classmethod
    def missing(cls) -> Interval:
        return cls(math.nan, math.nan, math.nan)


def verdict_scores(answers: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """[rows] 1.0 where the verifier accepted the answer, 0.0 where it rejected it, NaN where it had no verdict."""
    return np.array([math.nan if a.get("correct") is None else float(a["correct"]) for a in answers], dtype=float)


def win_scores(verdicts: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """[rows] 1 where only this model is right, 0 where only the baseline is, 0.5 for a tie; NaN if either is unjudged.

    Both arguments are [rows] verdict scores (see `verdict_scores`) of the same held-out rows.
    """
    if verdicts.shape != baseline.shape:
        raise ValueError(f"verdicts {verdicts.shape} and baseline {baseline.shape} cover different rows")
    return 0.5 + (verdicts - baseline) / 2


def has_logprobs(answers: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the answer records carry the per-row log-probs (evaluations before them do not)."""
    return bool(answers) and all("chosen_logprob" in a and "rejected_logprob" in a for a in answers)


def preference_scores(answers: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """[rows] per preference metric: preference accuracy (1/0) and margin, summed and per token.

    All NaN when the records lack the log-prob fields.
    """
    if not has_logprobs(answers):
        return {name: np.full(len(answers), math.nan) for name in PREFERENCE_METRICS}
    chosen = np.array([a["chosen_logprob"] for a in answers], dtype=float)
    rejected = np.array([a["rejected_logprob"] for a in answers], dtype=float)
    chosen_tokens = np.array([a.get("chosen_tokens", math.nan) for a in answers], dtype=float)
    rejected_tokens = np.array([a.get("rejected_tokens", math.nan) for a in answers], dtype=float)
    margin = chosen - rejected
    with np.errstate(divide="ignore", invalid="ignore"):
        margin_per_token = chosen / chosen_tokens - rejected / rejected_tokens
    return {
        "preference_accuracy": (margin > 0).astype(float),
        # NaN > 0 is False: keep a row without token counts out of the mean instead.
        "preference_accuracy_per_token": np.where(np.isnan(margin_per_token), math.nan, margin_per_token > 0),
        "margin": margin,
        "margin_per_token": margin_per_token,
    }


def row_metrics(answers: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """[rows] per metric of one evaluation: accuracy (verdict scores) and the preference metrics."""
    return {"accuracy": verdict_scores(answers), **preference_scores(answers)}


def _as_seeds_by_rows(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[None, :]
    if values.ndim != 2 or 0 in values.shape:
        raise ValueError(f"expected [rows] or [seeds, rows] values, got shape {values.shape}")
    return values


def _mean_of_measured(values: np.ndarray, axis: int) -> np.ndarray:
    """The mean over `axis` of the non-NaN entries; NaN (without a warning) where there are none."""
    measured = ~np.isnan(values)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(measured, values, 0.0).sum(axis) / measured.sum(axis)


def seed_mean(values: np.ndarray) -> float:
    """The mean over seeds of each seed's mean over its measured rows; values [rows] or [seeds, rows]."""
    per_seed = _mean_of_measured(_as_seeds_by_rows(values), axis=1)
    return float(_mean_of_measured(per_seed, axis=0))


def resample_indices(
    seeds: int, rows: int, resamples: int = RESAMPLES, random_seed: int = RANDOM_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Seeds drawn per resample [resamples, seeds] and rows drawn per resample [resamples, rows]."""
    rng = np.random.default_rng(random_seed)
    return rng.integers(0, seeds, size=(resamples, seeds)), rng.integers(0, rows, size=(resamples, rows))


def resampled_means(values: np.ndarray, seed_draws: np.ndarray, row_draws: np.ndarray) -> np.ndarray:
    """[resamples] the statistic of `seed_mean` on each resample of values [seeds, rows].

    seed_draws [resamples, seeds] and row_draws [resamples, rows] come from `resample_indices`;
    every drawn seed is read on the same drawn rows.
    """
    values = _as_seeds_by_rows(values)
    resamples, rows = row_draws.shape
    # How often each row is drawn, [resamples, rows]: a weighted sum replaces a [resamples, seeds, rows] gather.
    offsets = (row_draws + rows * np.arange(resamples)[:, None]).ravel()
    weights = np.bincount(offsets, minlength=resamples * rows).reshape(resamples, rows).astype(float)
    measured = ~np.isnan(values)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_seed = (weights @ np.where(measured, values, 0.0).T) / (weights @ measured.T.astype(float))
    return _mean_of_measured(np.take_along_axis(per_seed, seed_draws, axis=1), axis=1)


def percentile_interval(estimate: float, statistics: np.ndarray, confidence: float = CONFIDENCE) -> Interval:
    """The estimate with the central `confidence` percentile range of the bootstrap statistics [resamples]."""
    statistics = statistics[~np.isnan(statistics)]
    if math.isnan(estimate) or statistics.size == 0:
        return Interval.missing()
    low, high = np.quantile(statistics, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(estimate, float(low), float(high))


def bootstrap_mean(
    values: np.ndarray, resamples: int = RESAMPLES, confidence: float = CONFIDENCE, random_seed: int = RANDOM_SEED
) -> Interval:
    """The mean of values [rows] or [seeds, rows] with its percentile bootstrap interval.

    One seed: rows are resampled. Several: seeds and rows (see the module docstring).
    """
    values = _as_seeds_by_rows(values)
    estimate = seed_mean(values)
    if math.isnan(estimate):
        return Interval.missing()
    seed_draws, row_draws = resample_indices(*values.shape, resamples, random_seed)
    return percentile_interval(estimate, resampled_means(values, seed_draws, row_draws), confidence)


def paired_difference(
    values: np.ndarray,
    baseline: np.ndarray,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    random_seed: int = RANDOM_SEED,
) -> Interval:
    """The mean difference values - baseline, both [rows] or [seeds, rows], with its paired bootstrap interval.

    Row i of seed s of one model is paired with row i of seed s of the other; rows either leaves
    unmeasured are left out. Resampling the differences draws the same rows and seeds for both.
    """
    values, baseline = _as_seeds_by_rows(values), _as_seeds_by_rows(baseline)
    if values.shape != baseline.shape:
        raise ValueError(f"paired arrays differ in shape: {values.shape} and {baseline.shape}")
    return bootstrap_mean(values - baseline, resamples, confidence, random_seed)
