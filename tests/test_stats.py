# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""The comparison statistics against published tables, and calibrated: under the null they say "different" about as
often as their level allows, and they do detect a real effect."""

import math
import random

import pytest

from qerl_repro.stats import (
    betainc,
    describe_difference,
    holm_adjust,
    mcnemar_exact,
    paired_bootstrap,
    reward_auc,
    t_cdf,
    t_interval,
    t_quantile,
    welch_t_test,
)


@pytest.mark.parametrize(
    "df, critical",  # two-sided 95 % critical values of Student's t (standard tables)
    [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (19, 2.093), (29, 2.045), (1000, 1.962)],
)
def test_t_quantile_matches_the_table(df, critical):
    assert t_quantile(0.975, df) == pytest.approx(critical, abs=1e-3)
    assert t_cdf(critical, df) == pytest.approx(0.975, abs=1e-4)
    assert t_cdf(-critical, df) == pytest.approx(0.025, abs=1e-4)


@pytest.mark.parametrize(
    "a, b, x, expected",  # closed forms: I_x(1, 1) = x, I_x(a, 1) = x^a, I_x(1, b) = 1 - (1 - x)^b, I_1/2(a, a) = 1/2
    [(1, 1, 0.3, 0.3), (3, 1, 0.6, 0.6**3), (1, 4, 0.2, 1 - 0.8**4), (7.5, 7.5, 0.5, 0.5), (2, 0.5, 0.99, None)],
)
def test_incomplete_beta_closed_forms(a, b, x, expected):
    if expected is None:  # I_x(a, b) + I_(1-x)(b, a) = 1
        assert betainc(a, b, x) + betainc(b, a, 1 - x) == pytest.approx(1.0, abs=1e-12)
    else:
        assert betainc(a, b, x) == pytest.approx(expected, abs=1e-12)


def test_t_interval():
    result = t_interval([0.60, 0.62, 0.64])
    assert result["mean"] == pytest.approx(0.62) and result["std"] == pytest.approx(0.02)
    half = 4.303 * 0.02 / math.sqrt(3)
    assert result["ci"] == pytest.approx([0.62 - half, 0.62 + half], abs=1e-4)
    assert t_interval([0.5])["ci"] is None


@pytest.mark.parametrize(
    "a_only, b_only, p_value",  # exact two-sided binomial p-values, computed by hand from the binomial(n, 1/2) tail
    [
        (0, 0, 1.0),
        (0, 5, 2 / 32),  # 2 * P(X <= 0), n = 5
        (1, 9, 2 * 11 / 1024),  # 2 * (1 + 10) / 2^10
        (5, 5, 1.0),
        (3, 7, 2 * (1 + 10 + 45 + 120) / 1024),
    ],
)
def test_mcnemar_exact(a_only, b_only, p_value):
    both, neither = 20, 30
    correct_a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    correct_b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    result = mcnemar_exact(correct_a, correct_b)
    assert (result["a_only"], result["b_only"]) == (a_only, b_only)
    assert result["p_value"] == pytest.approx(p_value)
    assert result["difference"] == pytest.approx((b_only - a_only) / len(correct_a))


def test_mcnemar_rejects_unpaired_input():
    with pytest.raises(ValueError, match="same questions"):
        mcnemar_exact([True, False], [True])


def _arm(rng, difficulty, accuracy_shift, seeds):
    """0/1 scores of one arm: question q is solved with probability difficulty[q] + shift (shared questions)."""
    return [[float(rng.random() < min(1.0, p + accuracy_shift)) for p in difficulty] for _ in range(seeds)]


def test_paired_bootstrap_is_calibrated_under_the_null_and_detects_an_effect():
    rng = random.Random(0)
    difficulty = [rng.random() * 0.8 for _ in range(200)]
    null_rejections = 0
    trials = 60
    for trial in range(trials):
        a, b = _arm(rng, difficulty, 0.0, 3), _arm(rng, difficulty, 0.0, 3)
        null_rejections += paired_bootstrap(a, b, num_resamples=1000, seed=trial)["p_value"] < 0.05
    # Level 5 %: a few of 60 at most (binomial 95th percentile: 6). The two-level bootstrap is conservative (0 here).
    assert null_rejections / trials <= 0.15
    a, b = _arm(rng, difficulty, 0.0, 3), _arm(rng, difficulty, 0.10, 3)
    effect = paired_bootstrap(a, b, num_resamples=2000, seed=1)
    assert effect["p_value"] < 0.05 and effect["ci"][0] > 0
    assert effect["difference"] == pytest.approx(sum(map(sum, b)) / 600 - sum(map(sum, a)) / 600)


def test_paired_bootstrap_pairs_the_questions():
    # Two arms that agree on every question except a consistent 5 % edge: pairing sees it, although the questions'
    # own spread (0 or 1) is far larger than the edge.
    rng = random.Random(1)
    a = [[float(rng.random() < 0.5) for _ in range(400)]]
    b = [list(a[0])]
    flipped = [q for q in range(400) if a[0][q] == 0.0][:20]
    for q in flipped:
        b[0][q] = 1.0
    result = paired_bootstrap(a, b, num_resamples=2000)
    assert result["difference"] == pytest.approx(20 / 400)
    assert result["p_value"] < 0.01
    with pytest.raises(ValueError, match="same questions"):
        paired_bootstrap(a, [[1.0] * 399])


def test_reward_auc():
    assert reward_auc([0, 1, 2], [0.0, 1.0, 1.0]) == pytest.approx(0.75)  # (0.5 + 1.0) / 2
    assert reward_auc([0, 10], [0.2, 0.2]) == pytest.approx(0.2)
    early = reward_auc([0, 1, 2, 3], [0.0, 1.0, 1.0, 1.0])
    late = reward_auc([0, 1, 2, 3], [0.0, 0.0, 0.0, 1.0])
    assert early > late


@pytest.mark.parametrize(
    "p_values, adjusted",
    [
        ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),  # 4 x 0.005, 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04)
        ([0.5, 0.6], [1.0, 1.0]),  # 2 x 0.5 = 1, then capped and carried up
        ([0.02, 0.02], [0.04, 0.04]),  # ties: the step-down maximum carries
        ([0.03], [0.03]),  # one test: nothing to adjust
        ([], []),
    ],
)
def test_holm_adjust_by_hand(p_values, adjusted):
    assert holm_adjust(p_values) == pytest.approx(adjusted)


def test_holm_adjust_controls_the_family_wise_error_and_keeps_power():
    rng = random.Random(0)
    m, trials = 7, 4000
    raw_any, holm_any = 0, 0
    for _ in range(trials):  # 7 true nulls: uniform p-values
        p = [rng.random() for _ in range(m)]
        raw_any += min(p) < 0.05
        holm_any += min(holm_adjust(p)) < 0.05
    assert raw_any / trials > 0.25  # 1 - 0.95**7 = 0.30: why the adjustment is needed
    assert holm_any / trials < 0.06  # at most alpha (plus Monte Carlo error)
    p = [1e-4, 0.2, 0.5, 0.7]  # one strong effect survives, the others stay above their raw p
    adjusted = holm_adjust(p)
    assert adjusted[0] < 0.05 and all(a >= raw for a, raw in zip(adjusted, p))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm_adjust([0.1, float("nan")])


def test_describe_difference():
    assert "not distinguishable at this sample size" in describe_difference("A", "B", 0.01, 0.4)
    assert describe_difference("bf16", "nvfp4+aqn", 0.05, 0.001).startswith("nvfp4+aqn is higher than bf16 by 0.050")


def test_welch_t_test_by_hand_and_calibrated():
    # a: mean 0.5, var 0.0004 (n 3); b: mean 0.56, var 0.0004 (n 3): se = sqrt(2 * 0.0004 / 3), df = 4
    result = welch_t_test([0.48, 0.50, 0.52], [0.54, 0.56, 0.58])
    se = math.sqrt(2 * 0.0004 / 3)
    assert result["difference"] == pytest.approx(0.06) and result["df"] == pytest.approx(4.0)
    assert result["ci"] == pytest.approx([0.06 - 2.776 * se, 0.06 + 2.776 * se], abs=1e-4)
    assert result["p_value"] == pytest.approx(2 * (1 - t_cdf(0.06 / se, 4)))
    assert 0.01 < result["p_value"] < 0.05  # t = 3.67 on 4 df
    rng = random.Random(2)
    rejections = sum(
        welch_t_test([rng.gauss(0.5, 0.02) for _ in range(5)], [rng.gauss(0.5, 0.02) for _ in range(5)])["p_value"]
        < 0.05
        for _ in range(400)
    )
    assert 0.02 <= rejections / 400 <= 0.09  # calibrated: about 5 % under the null
    with pytest.raises(ValueError, match="at least two"):
        welch_t_test([0.5], [0.6, 0.7])
