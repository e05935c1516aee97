"""How sure a figure is: 95% intervals for the metrics lora_ft reports, and paired tests between two adapters scored
on the same test examples. The statistics are scipy.stats'; bootstraps draw from a fixed seed, so that the same
predictions always give the same interval and p-value."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats

LEVEL = 0.95  # every interval's confidence level (the `_ci95` keys of a manifest's metrics)
SEED = 0  # every bootstrap's random draws
RESAMPLES = 9999  # scipy.stats.bootstrap's default
ALPHA = 0.05  # a paired difference is "beyond noise" when its p-value is below this


def wilson(successes: int, trials: int) -> list[float] | None:
    """The Wilson score interval of a proportion (accuracy: correct of all), None for no trials."""
    if trials == 0:
        return None
    interval = stats.binomtest(int(successes), int(trials)).proportion_ci(LEVEL, method="wilson")
    return [float(interval.low), float(interval.high)]


def _bootstrap(samples: tuple[np.ndarray, ...], statistic: Callable[..., Any]) -> Any:
    """scipy's percentile bootstrap, resampling examples (rows of every sample together) from SEED. Percentile rather
    than BCa: BCa is undefined when every resample gives the same value (a perfect or empty score, which tiny test
    splits do give)."""
    return stats.bootstrap(
        samples,
        statistic,
        n_resamples=RESAMPLES,
        paired=True,
        vectorized=True,
        confidence_level=LEVEL,
        method="percentile",
        rng=np.random.default_rng(SEED),
    )


def _interval(result: Any) -> list[float]:
    interval = result.confidence_interval
    return [float(interval.low), float(interval.high)]


def mean_interval(values: list[float] | np.ndarray) -> list[float] | None:
    """A bootstrap interval of a mean over examples (ROUGE-L F1: each test answer's score); None for under two."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    return _interval(_bootstrap((values,), lambda v, axis=-1: v.mean(axis=axis)))


def f1_score(labels: np.ndarray, predictions: np.ndarray, classes: int, axis: int = -1) -> np.ndarray:
    """F1 of label 1 for two classes, the mean of every label's for more (as sklearn's `binary` and `macro`), over the
    last axis, so that a bootstrap scores all its resamples at once. A label never predicted nor present scores 0, as
    sklearn's zero_division=0."""
    scores = []
    for label in [1] if classes == 2 else range(classes):
        true, said = labels == label, predictions == label
        hits = (true & said).sum(axis=axis)
        scores.append(np.where(hits > 0, 2 * hits / np.maximum(true.sum(axis=axis) + said.sum(axis=axis), 1), 0.0))
    return np.mean(scores, axis=0)


def f1_interval(labels: np.ndarray, predictions: np.ndarray, classes: int) -> list[float] | None:
    """A bootstrap interval of F1 (as `f1_score`), the test examples resampled; None for under two."""
    if len(labels) < 2:
        return None
    statistic = lambda y, p, axis=-1: f1_score(y, p, classes, axis)  # noqa: E731
    return _interval(_bootstrap((np.asarray(labels), np.asarray(predictions)), statistic))


def mcnemar(right_a: list[bool] | np.ndarray, right_b: list[bool] | np.ndarray) -> dict[str, Any]:
    """McNemar's exact test of two classifiers on the same examples: of the examples exactly one of them gets right
    (the discordant pairs), does each get about half? The binomial test of A's share of them against 1/2."""
    right_a, right_b = np.asarray(right_a, bool), np.asarray(right_b, bool)
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    p = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"test": "McNemar exact", "only_a_right": only_a, "only_b_right": only_b, "p_value": float(p)}


def paired_bootstrap(
    a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...], statistic: Callable[..., np.ndarray]
) -> dict[str, Any]:
    """A paired bootstrap of statistic(a) - statistic(b) over the same examples: each resample draws examples and
    scores both adapters on them. `a` and `b` are per-example arrays that `statistic(*arrays, axis)` reduces (a mean,
    or a ratio of sums). The p-value is two-sided, of no difference: the share of resampled differences at least as
    far from the observed one as the observed one is from 0 (the bootstrap distribution shifted to the null)."""
    count = len(a)

    def difference(*arrays: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(*arrays[:count], axis=axis) - statistic(*arrays[count:], axis=axis)

    arrays = tuple(np.asarray(x, dtype=float) for x in (*a, *b))
    observed = float(difference(*arrays))
    result = _bootstrap(arrays, difference)
    spread = np.abs(result.bootstrap_distribution - observed)
    p = (1 + int((spread >= abs(observed)).sum())) / (1 + RESAMPLES) if observed else 1.0
    return {"test": "paired bootstrap", "difference_ci95": _interval(result), "p_value": float(p)}


def mean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    return values.mean(axis=axis)


def ratio_of_sums(numerators: np.ndarray, denominators: np.ndarray, axis: int = -1) -> np.ndarray:
    """sum(numerators) / sum(denominators): a loss per token from each example's summed loss and its tokens."""
    return numerators.sum(axis=axis) / np.maximum(denominators.sum(axis=axis), 1)


def verdict(p_value: float) -> str:
    return "beyond noise" if p_value < ALPHA else "within noise"


def over_seeds(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation and the 95% t-interval of the mean (Student's t, n - 1 degrees of freedom) of a
    figure measured once per seed; std and interval None for one seed. Missing values (a run with no such figure)
    are left out."""
    found = np.array([v for v in values if v is not None], dtype=float)
    if len(found) == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    if len(found) == 1:
        return {"mean": float(found[0]), "std": None, "ci95": None, "n": 1}
    std = float(found.std(ddof=1))
    if std == 0:  # every seed the same: scipy's interval would be nan
        return {"mean": float(found.mean()), "std": 0.0, "ci95": [float(found.mean())] * 2, "n": len(found)}
    low, high = stats.t.interval(LEVEL, len(found) - 1, loc=found.mean(), scale=stats.sem(found))
    return {"mean": float(found.mean()), "std": std, "ci95": [float(low), float(high)], "n": len(found)}
