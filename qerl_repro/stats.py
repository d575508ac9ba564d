# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Statistics for comparing training runs and arms: pure functions, no SciPy (not in the pinned set).

- `t_interval`, `one_sample_t_test`: mean, std and Student-t interval across seeds; is the mean different from 0.
- `mcnemar_exact`: two arms (or before/after) on the same questions, one sample each: exact two-sided McNemar test.
- `paired_bootstrap`: two arms, each with several seeds, scored on the same questions: the difference of their mean
  accuracy with a percentile interval and a two-sided p-value, resampling questions (shared by both arms, which is
  what pairs them) and each arm's seeds.
- `welch_t_test`: two arms' per-seed numbers (accuracy on the fixed test set, reward AUC): Welch's t.
- `holm_adjust`: several claims tested at once: Holm's step-down adjusted p-values (family-wise error control).
- `reward_auc`: the area under a reward curve per step (the paper's "faster reward growth", one number per seed).
- `describe_difference`: the result in words, including "not distinguishable at this sample size".
"""

import math
from collections.abc import Sequence

import torch


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz; converges for x < (a+1)/(a+b+2))."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x} must be in [0, 1].")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    """CDF of Student's t with `df` degrees of freedom (through the incomplete beta function)."""
    if df <= 0:
        raise ValueError(f"df={df} must be positive.")
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + x * x))
    return 1.0 - tail if x > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The `p` quantile of Student's t (bisection on `t_cdf`)."""
    if not 0 < p < 1:
        raise ValueError(f"p={p} must be in (0, 1).")
    low, high = -1e3, 1e3
    for _ in range(80):
        mid = (low + high) / 2
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean, sample std and the Student-t interval of the mean of `values` (e.g. one accuracy per seed)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value.")
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "std": None, "n": 1, "ci": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci": [mean - half, mean + half]}


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Exact two-sided McNemar test of two paired 0/1 outcomes on the same questions (e.g. one arm before and after
    training, or two arms at one seed). Only discordant questions count: `b_only` (B right, A wrong) and `a_only`; under
    the null each discordant question goes either way with probability 1/2."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired outcomes need the same questions: {len(correct_a)} vs {len(correct_b)}.")
    a_only = sum(1 for a, b in zip(correct_a, correct_b) if a and not b)
    b_only = sum(1 for a, b in zip(correct_a, correct_b) if b and not a)
    discordant = a_only + b_only
    if discordant == 0:
        p_value = 1.0
    else:
        tail = sum(math.comb(discordant, k) for k in range(min(a_only, b_only) + 1)) / 2**discordant
        p_value = min(1.0, 2 * tail)
    n = len(correct_a)
    return {
        "n": n,
        "a_only": a_only,
        "b_only": b_only,
        "difference": (b_only - a_only) / n if n else 0.0,
        "p_value": p_value,
    }


def paired_bootstrap(
    scores_a: Sequence[Sequence[float]],
    scores_b: Sequence[Sequence[float]],
    *,
    num_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Difference of mean accuracy B - A between two arms scored on the same questions.

    `scores_a[s][q]` is arm A's score (0/1, or the mean over samples) of seed `s` on question `q`; same questions, in
    the same order, for B (the seed counts may differ). Each resample draws the questions with replacement, the same
    draw for both arms (the pairing), and each arm's seeds with replacement. Returns the observed difference, the
    percentile interval and a two-sided p-value (twice the share of resampled differences on the other side of 0).

    Questions and seeds are crossed (every seed answers every question), and resampling both counts the per-answer
    noise twice: the interval is wider than nominal and the test conservative (under the null, 0 of 60 simulated
    comparisons fell below p = 0.05 in `tests/test_stats.py`). A difference it calls significant is safe to report;
    "not distinguishable" may also mean too little power: read it beside `welch_t_test` across seeds."""
    a = torch.as_tensor(scores_a, dtype=torch.float64)
    b = torch.as_tensor(scores_b, dtype=torch.float64)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError("scores must be [seeds][questions] tables.")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two arms must be scored on the same questions: {a.shape[1]} vs {b.shape[1]}.")
    generator = torch.Generator().manual_seed(seed)
    num_questions = a.shape[1]
    questions = torch.randint(num_questions, (num_resamples, num_questions), generator=generator)
    seeds_a = torch.randint(a.shape[0], (num_resamples, a.shape[0]), generator=generator)
    seeds_b = torch.randint(b.shape[0], (num_resamples, b.shape[0]), generator=generator)
    chunks = []
    for start in range(0, num_resamples, 500):  # [chunk, seeds, questions] stays small
        rows = slice(start, start + 500)
        per_question_a = a[seeds_a[rows]].mean(1)  # [chunk, questions]: the resampled seeds' mean per question
        per_question_b = b[seeds_b[rows]].mean(1)
        picked = questions[rows]
        chunks.append((per_question_b.gather(1, picked) - per_question_a.gather(1, picked)).mean(1))
    differences = torch.cat(chunks)
    observed = float(b.mean() - a.mean())
    alpha = 1 - confidence
    low, high = torch.quantile(differences, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
    below = float((differences <= 0).double().mean())
    above = float((differences >= 0).double().mean())
    return {
        "difference": observed,
        "ci": [low, high],
        "p_value": min(1.0, 2 * min(below, above)),
        "num_questions": num_questions,
        "num_seeds": [a.shape[0], b.shape[0]],
        "num_resamples": num_resamples,
    }


def one_sample_t_test(values: Sequence[float], mu: float = 0.0, confidence: float = 0.95) -> dict:
    """Is the mean of `values` (e.g. one reward rise per seed) different from `mu`? Student's t, two-sided."""
    summary = t_interval(values, confidence)
    if summary["n"] < 2:
        raise ValueError("one_sample_t_test needs at least two values (seeds).")
    se = summary["std"] / math.sqrt(summary["n"])
    if se == 0:
        p_value = 1.0 if summary["mean"] == mu else 0.0
    else:
        p_value = 2 * (1 - t_cdf(abs(summary["mean"] - mu) / se, summary["n"] - 1))
    return {**summary, "p_value": p_value}


def welch_t_test(values_a: Sequence[float], values_b: Sequence[float], confidence: float = 0.95) -> dict:
    """Difference of means B - A of two groups of per-seed numbers (accuracy on a fixed test set, reward AUC), with
    Welch's unequal-variance t interval and two-sided p-value (Welch-Satterthwaite degrees of freedom). Needs >= 2
    values per group. For a fixed test set this is the calibrated test across seeds; `paired_bootstrap` also resamples
    the questions (generalising to new questions) and is conservative (see its docstring)."""
    a, b = t_interval(values_a), t_interval(values_b)
    if a["n"] < 2 or b["n"] < 2:
        raise ValueError("welch_t_test needs at least two values (seeds) per group.")
    var_a, var_b = a["std"] ** 2 / a["n"], b["std"] ** 2 / b["n"]
    difference = b["mean"] - a["mean"]
    se = math.sqrt(var_a + var_b)
    if se == 0:
        return {"difference": difference, "ci": [difference, difference], "p_value": 1.0 if difference == 0 else 0.0}
    df = (var_a + var_b) ** 2 / (var_a**2 / (a["n"] - 1) + var_b**2 / (b["n"] - 1))
    half = t_quantile(0.5 + confidence / 2, df) * se
    p_value = 2 * (1 - t_cdf(abs(difference) / se, df))
    return {"difference": difference, "ci": [difference - half, difference + half], "p_value": p_value, "df": df}


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: with m tests sorted p_(1) <= ... <= p_(m), the i-th gets
    max over j <= i of min(1, (m - j + 1) p_(j)). Calling a claim significant when its adjusted p < alpha keeps the
    chance of any false claim among the m at most alpha, whatever their dependence (Holm 1979)."""
    if any(not 0 <= p <= 1 for p in p_values):  # also catches NaN
        raise ValueError(f"holm_adjust needs p-values in [0, 1], got {list(p_values)}")
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def reward_auc(steps: Sequence[float], rewards: Sequence[float]) -> float:
    """Mean reward over training as the trapezoid area under the reward curve divided by the step span (one number
    per run: higher means the reward grew sooner or further)."""
    if len(steps) != len(rewards) or len(steps) < 2:
        raise ValueError("reward_auc needs matching steps and rewards, at least two of each.")
    area = sum((steps[i + 1] - steps[i]) * (rewards[i + 1] + rewards[i]) / 2 for i in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])


def describe_difference(name_a: str, name_b: str, difference: float, p_value: float, alpha: float = 0.05) -> str:
    """One sentence for a paired comparison (difference = B - A)."""
    if p_value >= alpha:
        return f"{name_b} vs {name_a}: {difference:+.3f}, not distinguishable at this sample size (p = {p_value:.2g})."
    direction = "higher" if difference > 0 else "lower"
    return f"{name_b} is {direction} than {name_a} by {abs(difference):.3f} (p = {p_value:.2g})."
