"""The statistics behind the intervals and paired tests, against values computed by hand or by scipy and sklearn
directly; the Pareto front with intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import f1_score

from lora_ft.bench import compare
from lora_ft.core import stats


def test_wilson_interval_matches_the_formula():
    # Wilson (1927) by hand: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.959964 for 95%.
    def by_hand(k: int, n: int) -> list[float]:
        z, p = 1.959963984540054, k / n
        centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return [(centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)]

    for k, n in [(296, 300), (295, 300), (0, 8), (8, 8), (55, 110)]:
        assert stats.wilson(k, n) == pytest.approx(by_hand(k, n), abs=1e-12)
    assert stats.wilson(296, 300) == pytest.approx([0.96622, 0.99480], abs=1e-5)  # README's 98.67%
    assert stats.wilson(0, 0) is None


def _labels(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    return labels, np.where(rng.random(n) < 0.85, labels, 1 - labels)


def test_vectorised_f1_is_sklearns():
    labels, predictions = _labels(1)
    assert stats.f1_score(labels, predictions, 2) == pytest.approx(f1_score(labels, predictions))
    rng = np.random.default_rng(2)
    three, guessed = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    assert stats.f1_score(three, guessed, 3) == pytest.approx(f1_score(three, guessed, average="macro"))
    assert stats.f1_score(np.zeros(5, int), np.zeros(5, int), 2) == 0.0  # no positive label: 0, as zero_division=0


def test_f1_interval_is_scipys_bootstrap_of_sklearns_f1():
    """The same resamples through scipy's own (unvectorised) loop and sklearn's F1: the same interval."""
    labels, predictions = _labels(3)

    def interval(statistic, vectorized: bool, resamples: int = 2000) -> list[float]:
        found = scipy_stats.bootstrap(
            (labels, predictions),
            statistic,
            paired=True,
            vectorized=vectorized,
            n_resamples=resamples,
            method="percentile",
            rng=np.random.default_rng(stats.SEED),
        ).confidence_interval
        return [found.low, found.high]

    reference = interval(lambda y, p: f1_score(y, p), vectorized=False)
    vectorised = lambda y, p, axis=-1: stats.f1_score(y, p, 2, axis)  # noqa: E731
    assert interval(vectorised, vectorized=True) == pytest.approx(reference, abs=1e-12)
    found = stats.f1_interval(labels, predictions, 2)  # the same bootstrap, with lora_ft's resamples
    assert found == pytest.approx(interval(vectorised, True, stats.RESAMPLES), abs=1e-12)
    assert found[0] < f1_score(labels, predictions) < found[1]
    assert stats.f1_interval(labels, predictions, 2) == found  # a fixed seed: the same figure every time


def test_mean_interval_near_the_normal_one_for_many_examples():
    scores = np.random.default_rng(4).random(2000)
    half = 1.959964 * scores.std(ddof=1) / math.sqrt(len(scores))
    assert stats.mean_interval(scores) == pytest.approx([scores.mean() - half, scores.mean() + half], abs=1e-3)
    assert stats.mean_interval([0.5]) is None


def test_mcnemar_exact_on_constructed_predictions():
    # 20 examples: 5 both right, 10 right by A alone, 2 by B alone, 3 both wrong. Exact two-sided p-value by hand:
    # 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    truth = np.zeros(20, int)
    a = np.array([0] * 5 + [0] * 10 + [1] * 2 + [1] * 3)
    b = np.array([0] * 5 + [1] * 10 + [0] * 2 + [1] * 3)
    result = stats.mcnemar(a == truth, b == truth)
    assert (result["only_a_right"], result["only_b_right"]) == (10, 2)
    assert result["p_value"] == pytest.approx(2 * 79 / 4096, abs=1e-15)
    assert stats.verdict(result["p_value"]) == "beyond noise"
    same = stats.mcnemar(a == truth, a == truth)
    assert same["p_value"] == 1.0 and stats.verdict(same["p_value"]) == "within noise"
    balanced = stats.mcnemar([True] * 3 + [False] * 3, [False] * 3 + [True] * 3)
    assert balanced["p_value"] == pytest.approx(1.0)


def test_paired_bootstrap():
    rng = np.random.default_rng(5)
    a = rng.random(110)
    shifted = a - 0.1 + rng.normal(0, 0.05, 110)  # worse by 0.1 on every example, give or take
    result = stats.paired_bootstrap((a,), (shifted,), stats.mean)
    low, high = result["difference_ci95"]
    assert low < (a - shifted).mean() < high and low > 0.08
    assert result["p_value"] == pytest.approx(1 / (1 + stats.RESAMPLES))  # none of 9,999 resamples reaches 0
    noise = stats.paired_bootstrap((a,), (a + rng.normal(0, 0.05, 110),), stats.mean)
    assert noise["p_value"] > 0.05 and noise["difference_ci95"][0] < 0 < noise["difference_ci95"][1]
    assert stats.paired_bootstrap((a,), (a,), stats.mean)["p_value"] == 1.0
    # a loss per token: each example's summed loss over its tokens, the ratio of sums on both sides
    sums, tokens = rng.random(50) * 10, rng.integers(5, 20, 50)
    ratio = stats.paired_bootstrap((sums, tokens), (sums * 1.5, tokens), stats.ratio_of_sums)
    assert ratio["difference_ci95"][1] < 0 < ratio["difference_ci95"][1] - ratio["difference_ci95"][0]


def test_t_interval_over_seeds_by_hand():
    values = [0.98, 0.9733, 0.9867]
    mean, sd = np.mean(values), np.std(values, ddof=1)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    figures = stats.over_seeds(values)
    assert figures["mean"] == pytest.approx(mean) and figures["std"] == pytest.approx(sd)
    assert figures["ci95"] == pytest.approx([mean - half, mean + half])
    assert stats.over_seeds([0.9, None])["ci95"] is None and stats.over_seeds([0.9, None])["n"] == 1
    assert stats.over_seeds([0.5, 0.5])["ci95"] == [0.5, 0.5]


def test_pareto_front_with_intervals():
    """With intervals, a run leaves the front only where its interval lies wholly below that of a run with no more
    trainable parameters."""
    rows = [
        {"name": "small", "trainable_parameters": 10, "m": 0.90, "m_ci95": [0.85, 0.95]},
        {"name": "overlaps", "trainable_parameters": 100, "m": 0.89, "m_ci95": [0.86, 0.92]},  # overlaps small: kept
        {"name": "below", "trainable_parameters": 100, "m": 0.70, "m_ci95": [0.60, 0.80]},  # below small: beaten
        {"name": "big", "trainable_parameters": 1000, "m": 0.99, "m_ci95": [0.97, 1.0]},
        {"name": "cheap-bad", "trainable_parameters": 5, "m": 0.50, "m_ci95": [0.40, 0.60]},  # nothing smaller: kept
    ]
    assert compare.pareto(rows, "m") == ["cheap-bad", "small", "overlaps", "big"]
    points = [{k: v for k, v in r.items() if k != "m_ci95"} for r in rows]  # one seed: the old rule
    assert compare.pareto(points, "m") == ["cheap-bad", "small", "big"]
