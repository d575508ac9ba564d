# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Scoring GSM8K completions and the statistics of pass@1 (pure functions, no model).

- `score_completions`: the k completions of one question, judged by the training reward functions
  (`qerl_repro.rewards`): QeRL's exact `<answer>` match, the numeric-normalised answer and the format.
- `summarize_records`: per-question records to the headline metrics (accuracy, numeric accuracy, format rate, each with
  its 95 % interval, truncation rate).
- Confidence intervals: questions are the independent units. k = 1: Wilson score interval on n questions
  (`wilson_interval`); k > 1: normal approximation on the n per-question means (`mean_ci`), or Wilson on the sum of the
  means when those have zero variance (`pass_at_1_ci`).
"""

import math
from collections.abc import Sequence


__all__ = [
    "CORRECTNESS_REWARDS",
    "Z_95",
    "mean_ci",
    "pass_at_1_ci",
    "score_completions",
    "summarize_records",
    "wilson_interval",
]

CORRECTNESS_REWARDS = ("answer", "numeric_answer", "math_verify")
Z_95 = 1.959963984540054


# ----------------------------------------------------------------------------------------------------------------------
# Confidence intervals
# ----------------------------------------------------------------------------------------------------------------------


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion `successes / n`.

    `(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`, clipped to [0, 1]. Unlike the normal interval it is not
    degenerate at 0 or n successes (0/50 gives [0, 0.071]).

    >>> [round(x, 4) for x in wilson_interval(8, 10)]
    [0.4902, 0.9433]
    """
    if n <= 0:
        raise ValueError(f"wilson_interval needs n >= 1, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must lie in [0, n={n}]")
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def mean_ci(values: Sequence[float], z: float = Z_95) -> tuple[float, float]:
    """Normal-approximation interval of a mean: `mean ± z · s / sqrt(n)` (s: sample std, ddof=1), clipped to [0, 1].

    Meant for per-question pass@1 means in [0, 1]. With one value the interval is that value.

    >>> [round(x, 4) for x in mean_ci([0.0, 0.5, 1.0, 0.5])]
    [0.0999, 0.9001]
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, mean
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(variance / n)
    return max(0.0, mean - half), min(1.0, mean + half)


def pass_at_1_ci(per_question: Sequence[Sequence[float]], z: float = Z_95) -> dict:
    """pass@1 (mean over questions of the mean over samples) with its 95 % interval; see the module docstring.

    Args:
        per_question: one sequence of 0/1 correctness values (k samples) per question; k may differ per question.

    Returns:
        `dict` with `mean`, `ci95` ([low, high]), `half_width`, `method` ("wilson", "normal_per_question_mean" or
        "wilson_zero_variance"), `std_err` (s / sqrt(n) of the per-question means), `n` and `k` (samples per question,
        or the list when they differ).
    """
    if not per_question or any(len(samples) == 0 for samples in per_question):
        raise ValueError("pass_at_1_ci needs at least one question and at least one sample per question")
    means = [sum(map(float, samples)) / len(samples) for samples in per_question]
    n = len(means)
    ks = sorted({len(samples) for samples in per_question})
    mean = sum(means) / n
    variance = sum((m - mean) ** 2 for m in means) / (n - 1) if n > 1 else 0.0
    if ks == [1]:
        low, high = wilson_interval(sum(means), n, z)
        method = "wilson"
    elif variance == 0.0:
        low, high = wilson_interval(sum(means), n, z)
        method = "wilson_zero_variance"
    else:
        low, high = mean_ci(means, z)
        method = "normal_per_question_mean"
    return {
        "mean": mean,
        "ci95": [low, high],
        "half_width": (high - low) / 2,
        "method": method,
        "std_err": math.sqrt(variance / n),
        "n": n,
        "k": ks[0] if len(ks) == 1 else ks,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------------


def score_completions(
    completions: Sequence[str], gold: str, *, reward: str = "answer", prefill: str | None = None
) -> dict:
    """Score the k completions of one question with the training reward functions of `qerl_repro.rewards`.

    The prefill (when the prompt ended in one) is put back in front of each completion, so the whole assistant reply is
    judged, as in training.

    Args:
        completions: the generated texts (without the prefill).
        gold: the normalised gold answer (`load_gsm8k`'s `solution`).
        reward: correctness criterion, one of `CORRECTNESS_REWARDS` (`"answer"`: QeRL's exact `<answer>` match).
        prefill: text the assistant reply started with, or None.

    Returns:
        `dict` of per-completion lists: `extracted` (`extract_answer`, None without an `<answer>` tag), `correct`
        (per `reward`; a `None` reward, i.e. an unparseable gold for math_verify, counts as incorrect), `numeric_correct`,
        `formatted` (QeRL's soft format), and `pass1` (mean of `correct`).

    >>> score_completions(["<think> 6 * 7 </think> <answer> 42 </answer>", "<answer> 42.0"], "42")["correct"]
    [True, False]
    """
    from qerl_repro.rewards import REWARD_FUNCS, extract_answer

    if reward not in CORRECTNESS_REWARDS:
        raise ValueError(
            f"reward={reward!r} is not a correctness criterion; choose one of {list(CORRECTNESS_REWARDS)}"
        )
    completions = list(completions)
    kwargs = {"prefill": [prefill] * len(completions)} if prefill else {}
    golds = [gold] * len(completions)
    texts = [(prefill or "") + completion for completion in completions]
    correct = [bool(r) for r in REWARD_FUNCS[reward](completions, golds, **kwargs)]
    numeric = [bool(r) for r in REWARD_FUNCS["numeric_answer"](completions, golds, **kwargs)]
    formatted = [bool(r) for r in REWARD_FUNCS["format"](completions, golds, **kwargs)]
    return {
        "extracted": [extract_answer(text) for text in texts],
        "correct": correct,
        "numeric_correct": numeric,
        "formatted": formatted,
        "pass1": sum(correct) / len(correct) if correct else float("nan"),
    }


def summarize_records(records: Sequence[dict], z: float = Z_95) -> dict:
    """Aggregate per-question records (with `correct`, `numeric_correct`, `formatted` lists) into the headline metrics.

    Returns `accuracy`, `ci95`, `ci_half_width`, `ci_method`, `std_err`, `n`, `k`, `numeric_accuracy`, `numeric_ci95`,
    `format_rate`, `format_ci95` and, when records carry `finish_reasons`, `truncated_rate` (share of completions that
    hit the token limit).
    """
    accuracy = pass_at_1_ci([r["correct"] for r in records], z)
    numeric = pass_at_1_ci([r["numeric_correct"] for r in records], z)
    formatted = pass_at_1_ci([r["formatted"] for r in records], z)
    summary = {
        "accuracy": accuracy["mean"],
        "ci95": accuracy["ci95"],
        "ci_half_width": accuracy["half_width"],
        "ci_method": accuracy["method"],
        "std_err": accuracy["std_err"],
        "n": accuracy["n"],
        "k": accuracy["k"],
        "numeric_accuracy": numeric["mean"],
        "numeric_ci95": numeric["ci95"],
        "format_rate": formatted["mean"],
        "format_ci95": formatted["ci95"],
    }
    reasons = [reason for r in records for reason in r.get("finish_reasons", [])]
    if reasons:
        summary["truncated_rate"] = sum(reason == "length" for reason in reasons) / len(reasons)
    return summary
