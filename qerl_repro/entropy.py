# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Does a 4-bit base have a higher token entropy than its BF16 original, and what does AQN's noise do to it? Measured
on the CPU testbed's organism without any training.

QeRL (https://huggingface.co/papers/2510.11696, Section 3 and Fig. 5 / Fig. 14) reports that NVFP4, MXFP4 and NF4
LoRA runs have a higher policy entropy than BF16 LoRA and reads it as better exploration. This module measures the
premise directly: the entropy (nats, fp32 logits, full softmax over the vocabulary, temperature 1.0) of the
next-token distribution at every completion position of the testbed's 1000 fixed test prompts.

- **Bases** (`"none"` = BF16 as trained, `"nf4"`, `"mxfp4"`, `"nvfp4"`): the 4-bit bases are the trainer's own
  quantizer, dequantized (`qerl_repro.loading.load_policy`), run by a transformers forward.
- **Sequence sets**: teacher-forced on the *same* token sequences for every base, so every comparison is paired per
  prompt: (1) the BF16 base's own samples at T 1.0 (`num_samples` per prompt, seeded), (2) the reference answers
  (gold sum + EOS); and (3) each base on its *own* samples (same seed for every base), the quantity TRL logs as
  `entropy` during training (TRL computes it with the training model on the engine's samples).
- **AQN**: the NVFP4 base with QeRL's noise on its RMSNorm weights (`qerl_repro.noise.aqn_noised`, the same
  `find_norm_weights` / `apply_aqn_` the trainer applies to the rollout engine), at every distinct sigma of the
  recipe's schedule (`aqn_schedule_table`) plus sigma 0, over `num_draws` noise draws per sigma: the noise vectors of
  the first `num_draws` steps of the stage for the run seed `seed` (exactly the noise a run with that seed gets at
  those steps), on sequence set (1).

Statistics (`qerl_repro.stats`): per prompt, the token-weighted mean entropy over the completion tokens of its
sequences (EOS included, prompt and padding excluded, as TRL's completion mask). Across prompts: the mean with a
Student-t 95 % interval; paired differences vs BF16 by a one-sample t test on the per-prompt differences. AQN rows,
whose noise is a second random factor, use `paired_bootstrap` (questions and draws resampled together, so the
draw-to-draw variation is inside the interval) and also report the spread of the per-draw means.

A second, separate use: `summarize_grid_entropy` summarises TRL's logged `entropy` per arm of the Table 1 grid
(`results/table1_cpu/<model>/*-seed*.json`).

Commands (`make testbed-entropy` runs the first two):

    python -m qerl_repro.entropy measure --model data/testbed/adder3 --output results/testbed/entropy.json
    python -m qerl_repro.entropy grid --grid_dir results/table1_cpu/adder3
    python -m qerl_repro.entropy report --input results/testbed/entropy.json   # md + png again from the JSON
"""

import argparse
import glob
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from qerl_repro.errors import UserError, run_cli


logger = logging.getLogger(__name__)

__all__ = [
    "CompletionSet",
    "aqn_entropy_draws",
    "completion_entropy",
    "difference_in_words",
    "draws_vs_reference",
    "entropy_markdown",
    "load_grid_runs",
    "masked_entropy_sums",
    "measure",
    "paired_vs_reference",
    "per_prompt_means",
    "plot_entropy",
    "reference_completions",
    "sample_completions",
    "summarize_grid_entropy",
    "token_entropy",
]

SCHEMA = "qerl_repro.entropy/v1"
BASES = ("none", "nf4", "mxfp4", "nvfp4")
BASE_NAMES = {"none": "BF16", "nf4": "NF4", "mxfp4": "MXFP4", "nvfp4": "NVFP4"}
SEQUENCE_SETS = {
    "bf16_samples": "teacher-forced on the BF16 base's own samples (T 1.0), the same sequences for every base",
    "reference": "teacher-forced on the reference answers (gold sum + EOS), the same sequences for every base",
    "own_samples": "each base on its own samples (T 1.0, same seed): what TRL logs as `entropy`",
}


# ----------------------------------------------------------------------------------------------------------------------
# Maths (pure)
# ----------------------------------------------------------------------------------------------------------------------


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Shannon entropy in nats of `softmax(logits / temperature)` along the last axis, computed in fp32 over the full
    vocabulary (no top-k / top-p truncation); shape `logits.shape[:-1]`.

    >>> round(float(token_entropy(torch.zeros(4))), 6) == round(math.log(4), 6)
    True
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    # 0 * log 0 = 0: a one-hot distribution (-inf logits elsewhere) has entropy 0, not nan.
    return -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)


def masked_entropy_sums(
    logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `logits` `[batch, positions, vocab]`: the sum of the token entropies at the positions where `mask`
    `[batch, positions]` is 1, and how many such positions there are. Positions outside the mask (prompt, padding)
    do not enter at all, whatever their logits."""
    if logits.shape[:-1] != mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits {tuple(logits.shape[:-1])}.")
    keep = mask.bool()
    entropies = torch.where(keep, token_entropy(logits, temperature), torch.zeros((), dtype=torch.float32))
    return entropies.sum(-1), keep.sum(-1)


def per_prompt_means(
    sums: Sequence[float], counts: Sequence[int], prompt_of: Sequence[int], weights: Sequence[int], num_prompts: int
) -> list[float]:
    """Token-weighted mean entropy per prompt: `sum_j w_j s_j / sum_j w_j c_j` over the sequences `j` of the prompt
    (`s_j` entropy sum over its `c_j` completion tokens, `w_j` how many times the sequence was sampled). A prompt
    with no completion token gets nan."""
    total = [0.0] * num_prompts
    tokens = [0] * num_prompts
    for s, c, p, w in zip(sums, counts, prompt_of, weights, strict=True):
        total[p] += w * float(s)
        tokens[p] += w * int(c)
    return [t / n if n else math.nan for t, n in zip(total, tokens)]


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def mean_interval(values: Sequence[float]) -> dict:
    """Mean over prompts with its Student-t 95 % interval (`stats.t_interval`)."""
    from qerl_repro.stats import t_interval

    summary = t_interval(_finite(values))
    return {**summary, "ci_method": "Student-t over prompts"}


def difference_in_words(
    name_ref: str, name_other: str, difference: float, p_value: float, *, p_floor: float | None = None
) -> str:
    """`stats.describe_difference`'s sentence for an entropy difference: same 5 % rule, 4 decimals and the unit
    (differences here are thousandths of a nat, which its 3 decimals round to 0). `p_floor`: a bootstrap p of 0 is
    written `p < p_floor`."""
    p_text = f"< {p_floor:.2g}" if p_value == 0 and p_floor else f"= {p_value:.2g}"
    if p_value >= 0.05:
        return (
            f"{name_other} vs {name_ref}: {difference:+.4f} nats per token, not distinguishable at this sample size "
            f"(p {p_text})."
        )
    direction = "higher" if difference > 0 else "lower"
    return f"{name_other} is {direction} than {name_ref} by {abs(difference):.4f} nats per token (p {p_text})."


def paired_vs_reference(reference: Sequence[float], other: Sequence[float], name_ref: str, name_other: str) -> dict:
    """`other - reference`, paired per prompt: mean difference, Student-t 95 % interval and two-sided p of a one-sample
    t test on the per-prompt differences, the difference relative to the reference mean, and the result in words."""
    from qerl_repro.stats import one_sample_t_test

    if len(reference) != len(other):
        raise ValueError(f"paired values need the same prompts: {len(reference)} vs {len(other)}.")
    pairs = [(r, o) for r, o in zip(reference, other) if math.isfinite(r) and math.isfinite(o)]
    diffs = [o - r for r, o in pairs]
    test = one_sample_t_test(diffs)
    ref_mean = sum(r for r, _ in pairs) / len(pairs)
    return {
        "difference": test["mean"],
        "ci": test["ci"],
        "p_value": test["p_value"],
        "std": test["std"],
        "n": test["n"],
        "relative": test["mean"] / ref_mean if ref_mean else None,
        "mean_abs_difference": sum(abs(d) for d in diffs) / len(diffs),
        "ci_method": "one-sample Student-t on per-prompt differences",
        "words": difference_in_words(name_ref, name_other, test["mean"], test["p_value"]),
    }


def draws_vs_reference(
    reference: Sequence[float] | None,
    draws: Sequence[Sequence[float]],
    name_ref: str,
    name_other: str,
    *,
    num_resamples: int = 5000,
    seed: int = 0,
) -> dict:
    """Mean over draws and prompts of `draws[d][q] - reference[q]` (`reference=None`: the level itself), with the
    `stats.paired_bootstrap` percentile 95 % interval and p-value, which resample the prompts (shared with the
    reference: the pairing) and the noise draws, so draw-to-draw variation is inside the interval. Also the per-draw
    means and their spread (Student-t over draws, prompts fixed)."""
    from qerl_repro.stats import paired_bootstrap, t_interval

    num_prompts = len(draws[0])
    if any(len(row) != num_prompts for row in draws):
        raise ValueError("every draw needs a value per prompt.")
    ref = list(reference) if reference is not None else [0.0] * num_prompts
    if len(ref) != num_prompts:
        raise ValueError(f"reference has {len(ref)} prompts, draws {num_prompts}.")
    keep = [q for q in range(num_prompts) if math.isfinite(ref[q]) and all(math.isfinite(row[q]) for row in draws)]
    ref = [ref[q] for q in keep]
    rows = [[row[q] for q in keep] for row in draws]
    boot = paired_bootstrap([ref], rows, num_resamples=num_resamples, seed=seed)
    per_draw = [sum(row) / len(row) - sum(ref) / len(ref) for row in rows]
    spread = t_interval(per_draw)
    out = {
        "difference" if reference is not None else "mean": boot["difference"],
        "ci": boot["ci"],
        "n": len(keep),
        "num_draws": len(rows),
        "ci_method": f"paired bootstrap over prompts and draws ({num_resamples} resamples)",
        "per_draw": per_draw,
        "draw_std": spread["std"],
        "draw_ci": spread["ci"],
    }
    if reference is not None:
        out["p_value"] = boot["p_value"]
        out["mean_abs_difference"] = sum(abs(v - r) for row in rows for v, r in zip(row, ref)) / (len(rows) * len(ref))
        out["words"] = difference_in_words(
            name_ref, name_other, boot["difference"], boot["p_value"], p_floor=1 / num_resamples
        )
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def summarize_grid_entropy(
    rows: Mapping[str, Sequence[dict]], *, first_steps: int = 25, reference_row: str | None = "bf16_lora"
) -> dict[str, dict]:
    """Per arm of the Table 1 grid, TRL's logged `entropy` (nats, token-weighted mean over each step's completions,
    computed by the training model): per seed the mean over the first `first_steps` logged steps, over all steps and
    over the last `first_steps` steps; across seeds mean, std and Student-t 95 % interval (`stats.t_interval`; one seed:
    no interval). With `reference_row` and >= 2 seeds in both arms, the difference to it by Welch's t across seeds.

    `rows` maps a row name to its runs (the table1 run JSONs, `load_grid_runs` or `table1.load_results(dir)[model]`);
    runs without `metrics.entropy` (the untrained base rows) are skipped. Returns `{row: summary}`, rows in input order.
    """
    from qerl_repro.stats import t_interval, welch_t_test

    if first_steps < 1:
        raise ValueError(f"first_steps={first_steps} must be >= 1.")
    out: dict[str, dict] = {}
    for row, runs in rows.items():
        per_seed = []
        for run in runs:
            curve = (run.get("metrics") or {}).get("entropy") or {}
            values = [float(v) for v in curve.get("values") or [] if v is not None and math.isfinite(v)]
            if not values:
                continue
            per_seed.append(
                {
                    "seed": run.get("seed"),
                    "file": run.get("_file"),
                    "num_steps": len(values),
                    "first": _mean(values[:first_steps]),
                    "all": _mean(values),
                    "last": _mean(values[-first_steps:]),
                }
            )
        if not per_seed:
            continue
        out[row] = {
            "num_seeds": len(per_seed),
            "seeds": [s["seed"] for s in per_seed],
            "first_steps": first_steps,
            "first": t_interval([s["first"] for s in per_seed]),
            "all": t_interval([s["all"] for s in per_seed]),
            "last": t_interval([s["last"] for s in per_seed]),
            "per_seed": per_seed,
        }
    if reference_row in out:
        ref = out[reference_row]
        for row, summary in out.items():
            if row == reference_row or summary["num_seeds"] < 2 or ref["num_seeds"] < 2:
                continue
            summary["vs_reference"] = {
                "reference": reference_row,
                **{
                    key: welch_t_test([s[key] for s in ref["per_seed"]], [s[key] for s in summary["per_seed"]])
                    for key in ("first", "all", "last")
                },
            }
    return out


def grid_entropy_table(summary: Mapping[str, dict]) -> str:
    """Markdown table of `summarize_grid_entropy`."""
    first = next(iter(summary.values()))["first_steps"] if summary else 25

    def cell(s: dict) -> str:
        if s["n"] == 1:
            return f"{s['mean']:.4f}"
        return f"{s['mean']:.4f} ± {s['std']:.4f} [{s['ci'][0]:.4f}, {s['ci'][1]:.4f}]"

    reference = next((s["vs_reference"]["reference"] for s in summary.values() if "vs_reference" in s), None)
    lines = [
        f"| arm | seeds | entropy, first {first} steps | all steps | last {first} steps |"
        + (f" all steps minus {reference} [95 % CI], p |" if reference else ""),
        "|---|---|---|---|---|" + ("---|" if reference else ""),
    ]
    for row, s in summary.items():
        seeds = ", ".join(str(x) for x in s["seeds"])
        line = f"| {row} | {seeds} | {cell(s['first'])} | {cell(s['all'])} | {cell(s['last'])} |"
        if reference:
            d = s.get("vs_reference", {}).get("all")
            line += (
                f" {d['difference']:+.4f} {_ci_text(d['ci'], signed=True)}, p {d['p_value']:.2g} |" if d else " - |"
            )
        lines.append(line)
    lines.append("")
    lines.append(
        "TRL's logged `entropy` (nats per completion token, training model). Mean over seeds ± std [Student-t 95 % "
        "interval over seeds]; a single number is one seed (no interval)."
        + (f" Minus {reference}: Welch's t across seeds (arms with >= 2 seeds)." if reference else "")
    )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# Sequences and the model forward
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class CompletionSet:
    """Token sequences to score: per prompt, its distinct completions (token ids, EOS included when the completion
    ended) with how many times each occurred. Identical samples are scored once and weighted by their count."""

    name: str
    prompt_ids: list[list[int]]
    completions: list[list[tuple[tuple[int, ...], int]]]

    def num_tokens(self) -> int:
        return sum(len(c) * w for per_prompt in self.completions for c, w in per_prompt)

    def num_sequences(self) -> int:
        return sum(w for per_prompt in self.completions for _, w in per_prompt)

    def num_distinct(self) -> int:
        return sum(len(per_prompt) for per_prompt in self.completions)


def _cut_at_eos(ids: Sequence[int], eos_id: int) -> tuple[int, ...]:
    ids = list(ids)
    return tuple(ids[: ids.index(eos_id) + 1]) if eos_id in ids else tuple(ids)


def _count(completions: Sequence[tuple[int, ...]]) -> list[tuple[tuple[int, ...], int]]:
    counts: dict[tuple[int, ...], int] = {}
    for c in completions:
        counts[c] = counts.get(c, 0) + 1
    return list(counts.items())


def _prompt_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def reference_completions(tokenizer, prompts: Sequence[str], solutions: Sequence[str]) -> CompletionSet:
    """The gold answers (+ EOS) as the completions of `prompts`."""
    eos = tokenizer.eos_token_id
    completions = [[(tuple(tokenizer(s, add_special_tokens=False)["input_ids"]) + (eos,), 1)] for s in solutions]
    return CompletionSet("reference", _prompt_ids(tokenizer, prompts), completions)


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    num_samples: int,
    seed: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 250,
    name: str = "samples",
) -> CompletionSet:
    """`num_samples` completions per prompt from `model` (transformers `generate`, T `temperature`, top-k 0, top-p 1:
    the rollout setting), seeded by `seed` (the global RNG is restored afterwards), cut after the first EOS."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.eval()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    completions: list[list[tuple[tuple[int, ...], int]]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                list(prompts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                padding_side="left",
                add_special_tokens=False,
            )
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                num_return_sequences=num_samples,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            new = out[:, batch["input_ids"].shape[1] :].tolist()
            for i in range(len(new) // num_samples):
                completions.append(
                    _count([_cut_at_eos(ids, eos) for ids in new[i * num_samples : (i + 1) * num_samples]])
                )
    finally:
        torch.random.set_rng_state(state)
    return CompletionSet(name, _prompt_ids(tokenizer, prompts), completions)


@torch.no_grad()
def completion_entropy(
    model, completion_set: CompletionSet, *, pad_id: int, batch_size: int = 512, temperature: float = 1.0
) -> list[float]:
    """Per prompt, the token-weighted mean entropy (nats) of `model`'s next-token distribution at the positions that
    predict the completion tokens (teacher-forced; the prompt's own positions and padding excluded).

    Sequences are right-padded (positions of the real tokens are then 0..L-1, as unpadded), one forward per batch.
    """
    model.eval()
    flat = [
        (p, completion, weight)
        for p, per_prompt in enumerate(completion_set.completions)
        for completion, weight in per_prompt
        if completion
    ]
    sums, counts = [], []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        seqs = [completion_set.prompt_ids[p] + list(c) for p, c, _ in chunk]
        width = max(map(len, seqs))
        input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, ((p, c, _), seq) in enumerate(zip(chunk, seqs)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
            prompt_len = len(completion_set.prompt_ids[p])
            # The logits at position t predict token t + 1: completion token k is predicted at prompt_len - 1 + k.
            mask[row, prompt_len - 1 : prompt_len - 1 + len(c)] = 1
        logits = model(input_ids=input_ids, attention_mask=attention).logits
        s, n = masked_entropy_sums(logits, mask, temperature)
        sums += s.tolist()
        counts += n.tolist()
    return per_prompt_means(
        sums, counts, [p for p, _, _ in flat], [w for _, _, w in flat], len(completion_set.completions)
    )


def aqn_entropy_draws(
    model,
    completion_set: CompletionSet,
    sigma: float,
    *,
    seed: int,
    steps: Sequence[int],
    pad_id: int,
    batch_size: int = 512,
    temperature: float = 1.0,
) -> tuple[list[list[float]], int]:
    """Per noise draw, `completion_entropy` of `model` with AQN's noise on its RMSNorm weights, and how many norms
    were noised per draw.

    Draw `i` is the noise the trainer gives the rollout engine at optimizer step `steps[i]` of a run seeded `seed`:
    `qerl_repro.noise.aqn_noised(find_norm_weights(model), sigma, seed=seed, step=steps[i])` (the same targets,
    `apply_aqn_` and generator as the trainer; `w = clean + z`, z ~ N(0, sigma^2) drawn in fp32, rounded once to the
    weight's dtype). The clean weights are restored bit-exactly after every draw, also on error."""
    from qerl_repro.noise import aqn_noised, find_norm_weights, require_norm_targets

    targets = require_norm_targets(find_norm_weights(model), "the model to noise")
    draws, noised = [], set()
    for step in steps:
        with aqn_noised(targets, sigma, seed=seed, step=step) as num_noised:
            draws.append(
                completion_entropy(
                    model, completion_set, pad_id=pad_id, batch_size=batch_size, temperature=temperature
                )
            )
        noised.add(num_noised)
    if len(noised) != 1:
        raise RuntimeError(f"AQN noised a different number of norms across draws: {sorted(noised)}")
    return draws, noised.pop()


# ----------------------------------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------------------------------


def _check_model_dir(model_dir: str) -> None:
    if not os.path.isdir(model_dir):
        raise UserError(f"--model {model_dir}: no such folder (build the testbed organism first: `make testbed`)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"--model {model_dir}: not a model folder (no config.json)")


def _set_summary(completion_set: CompletionSet) -> dict:
    return {
        "description": SEQUENCE_SETS[completion_set.name],
        "num_sequences": completion_set.num_sequences(),
        "num_distinct_sequences": completion_set.num_distinct(),
        "num_completion_tokens": completion_set.num_tokens(),
    }


def _round(values: Sequence[float], digits: int = 6) -> list[float | None]:
    return [round(v, digits) if math.isfinite(v) else None for v in values]


def aqn_sigmas(
    total_steps: int, sigma_start: float, sigma_end: float, num_stages: int, schedule: str = "qerl_code"
) -> list[dict]:
    """The distinct sigmas of an AQN schedule, each with the stages and first step where it applies (sigma 0 first)."""
    from qerl_repro.noise import aqn_schedule_table

    rows: list[dict] = []
    for stage in aqn_schedule_table(total_steps, sigma_start, sigma_end, num_stages, schedule):
        if rows and rows[-1]["sigma"] == stage["sigma"]:
            rows[-1]["stages"].append(stage["stage"])
            rows[-1]["last_step"] = stage["last_step"]
        else:
            rows.append(
                {
                    "sigma": stage["sigma"],
                    "stages": [stage["stage"]],
                    **{k: stage[k] for k in ("first_step", "last_step")},
                }
            )
    return rows


def measure(
    model_dir: str,
    *,
    bases: Sequence[str] = BASES,
    num_samples: int = 8,
    sample_seed: int = 0,
    limit: int | None = None,
    dtype: str = "float32",
    aqn_base: str = "nvfp4",
    aqn_total_steps: int = 250,
    aqn_sigma_start: float = 1e-2,
    aqn_sigma_end: float = 5e-4,
    aqn_num_stages: int = 10,
    aqn_schedule: str = "qerl_code",
    aqn_seed: int = 42,
    num_draws: int = 4,
    batch_size: int = 512,
    num_resamples: int = 5000,
) -> dict:
    """The whole experiment (see the module docstring); returns the results dict that `measure` writes as JSON."""
    from qerl_repro.evaluation import _git_info
    from qerl_repro.loading import load_policy, resolve_dtype
    from qerl_repro.noise import find_norm_weights, require_norm_targets
    from qerl_repro.testbed import MAX_NEW_TOKENS, _versions, build_tokenizer, load_split

    _check_model_dir(model_dir)
    unknown = [b for b in bases if b not in BASES]
    if unknown or "none" not in bases:
        raise UserError(f"--bases {list(bases)}: every base must be one of {list(BASES)}, and 'none' (BF16) is needed")
    if aqn_base not in bases:
        raise UserError(f"--aqn_base {aqn_base} is not among --bases {list(bases)}")
    if num_draws < 2:
        raise UserError(f"--num_draws {num_draws}: at least 2 noise draws are needed for a draw-to-draw spread")
    torch_dtype = resolve_dtype(dtype)
    git = _git_info()  # the code that runs (taken before the minutes of measuring)
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    pad = tokenizer.pad_token_id
    test = load_split("test", limit=limit)
    prompts, solutions = test["prompt"], test["solution"]
    sample_kwargs = dict(num_samples=num_samples, seed=sample_seed, max_new_tokens=MAX_NEW_TOKENS)

    models = {}
    for base in bases:
        models[base] = load_policy(model_dir, base, dtype=torch_dtype).eval()
    sets = {
        "bf16_samples": sample_completions(models["none"], tokenizer, prompts, name="bf16_samples", **sample_kwargs),
        "reference": reference_completions(tokenizer, prompts, solutions),
    }
    per_prompt: dict[str, dict[str, list[float]]] = {name: {} for name in SEQUENCE_SETS}
    own_sets = {}
    for base, model in models.items():
        for name in ("bf16_samples", "reference"):
            per_prompt[name][base] = completion_entropy(model, sets[name], pad_id=pad, batch_size=batch_size)
        own = (
            sets["bf16_samples"]
            if base == "none"
            else sample_completions(model, tokenizer, prompts, name="own_samples", **sample_kwargs)
        )
        own_sets[base] = _set_summary(CompletionSet("own_samples", own.prompt_ids, own.completions))
        per_prompt["own_samples"][base] = completion_entropy(model, own, pad_id=pad, batch_size=batch_size)
        logger.info(
            "%s: entropy %.4f (BF16 samples), %.4f (reference), %.4f (own samples)",
            base,
            *(_mean(_finite(per_prompt[name][base])) for name in SEQUENCE_SETS),
        )

    results_sets = {}
    for name in SEQUENCE_SETS:
        rows = {}
        for base in bases:
            row = {"level": mean_interval(per_prompt[name][base])}
            if base != "none":
                row["vs_bf16"] = paired_vs_reference(
                    per_prompt[name]["none"], per_prompt[name][base], BASE_NAMES["none"], BASE_NAMES[base]
                )
            if name == "own_samples":
                row["sequences"] = own_sets[base]
            row["per_prompt"] = _round(per_prompt[name][base])
            rows[base] = row
        results_sets[name] = {
            "description": SEQUENCE_SETS[name],
            **(_set_summary(sets[name]) if name in sets else {}),
            "bases": rows,
        }

    # AQN on the chosen base, teacher-forced on the BF16 samples (fails here if the base has no RMSNorm to noise).
    model = models[aqn_base]
    require_norm_targets(find_norm_weights(model), f"the {aqn_base} base")
    sigma_rows = aqn_sigmas(aqn_total_steps, aqn_sigma_start, aqn_sigma_end, aqn_num_stages, aqn_schedule)
    clean = per_prompt["bf16_samples"][aqn_base]
    bf16 = per_prompt["bf16_samples"]["none"]
    aqn_rows = []
    for row in sigma_rows:
        sigma = row["sigma"]
        if sigma == 0:
            draws = [clean]
            entry = {"sigma": 0.0, "level": mean_interval(clean), "num_noised_modules": 0}
            entry["vs_bf16"] = paired_vs_reference(bf16, clean, "BF16", f"{BASE_NAMES[aqn_base]} + AQN sigma 0")
        else:
            steps = [row["first_step"] + d for d in range(num_draws)]
            draws, num_noised = aqn_entropy_draws(
                model, sets["bf16_samples"], sigma, seed=aqn_seed, steps=steps, pad_id=pad, batch_size=batch_size
            )
            name = f"{BASE_NAMES[aqn_base]} + AQN sigma {sigma:.3g}"
            common = dict(num_resamples=num_resamples)
            entry = {
                "sigma": sigma,
                "num_noised_modules": num_noised,
                "noise_steps": steps,
                "level": draws_vs_reference(None, draws, "", name, **common),
                "vs_bf16": draws_vs_reference(bf16, draws, "BF16", name, **common),
                f"vs_{aqn_base}": draws_vs_reference(
                    clean, draws, f"{BASE_NAMES[aqn_base]} (no noise)", name, **common
                ),
            }
            entry["per_prompt_mean_over_draws"] = _round([_mean(col) for col in zip(*draws)])
            logger.info("AQN sigma %.3g: entropy %.4f (%d draws)", sigma, entry["level"]["mean"], num_draws)
        entry.update({k: row[k] for k in ("stages", "first_step", "last_step")})
        aqn_rows.append(entry)

    return {
        "schema": SCHEMA,
        "what": (
            "Entropy (nats) of the next-token distribution at completion positions (EOS included, prompt and padding "
            "excluded), fp32 logits, full softmax, temperature 1.0; per prompt the token-weighted mean over its "
            "completion tokens; across the prompts of the fixed test split."
        ),
        "config": {
            "model": model_dir,
            "num_prompts": len(prompts),
            "split": "test (qerl_repro.testbed.load_split)",
            "num_samples": num_samples,
            "sample_seed": sample_seed,
            "max_new_tokens": MAX_NEW_TOKENS,
            "sampling": "transformers generate, T 1.0, top-k 0, top-p 1",
            "dtype": dtype,
            "bases": {b: f"qerl_repro.loading.load_policy(model, {b!r}, dtype={dtype})" for b in bases},
            "aqn": {
                "base": aqn_base,
                "total_steps": aqn_total_steps,
                "sigma_start": aqn_sigma_start,
                "sigma_end": aqn_sigma_end,
                "num_stages": aqn_num_stages,
                "schedule": aqn_schedule,
                "seed": aqn_seed,
                "num_draws": num_draws,
                "draws": "qerl_repro.noise.aqn_noised(find_norm_weights(model), sigma, seed, step) for the first "
                "num_draws steps of the sigma's first stage",
                "sequences": "bf16_samples",
            },
            "num_resamples": num_resamples,
        },
        "command": " ".join([os.path.basename(sys.executable), "-m", "qerl_repro.entropy", *sys.argv[1:]]),
        **git,
        "versions": _versions(),
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
        "sets": results_sets,
        "aqn": aqn_rows,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Report: markdown table and figure from the JSON
# ----------------------------------------------------------------------------------------------------------------------


def _ci_text(ci, digits: int = 4, signed: bool = False) -> str:
    if ci is None:
        return "-"
    fmt = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"[{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _p_text(p: float, num_resamples: int | None = None) -> str:
    if p == 0 and num_resamples:
        return f"< {1 / num_resamples:.0e}"
    return f"{p:.2g}"


def entropy_markdown(result: dict, json_name: str = "entropy.json") -> str:
    """The markdown summary of a `measure` result (tables and sentences, all numbers from the JSON)."""
    c = result["config"]
    aqn = c["aqn"]
    base_name = BASE_NAMES[aqn["base"]]
    lines = [
        "# Token entropy of the testbed's bases, with and without AQN (no training)",
        "",
        f"Generated by `python -m qerl_repro.entropy` from `{json_name}`; do not edit by hand. Command: "
        f"`{result['command']}` (git {str(result.get('git_commit'))[:7]}{', dirty' if result.get('git_dirty') else ''}).",
        "",
        result["what"] + f" n = {c['num_prompts']} prompts; {c['num_samples']} samples per prompt (seed "
        f"{c['sample_seed']}, {c['sampling']}); bases computed in {c['dtype']} from the trainer's quantizer, "
        "dequantized. Intervals are 95 %; differences are paired per prompt (minus BF16).",
        "",
        "## Bases",
        "",
        "| sequences | base | entropy [95 % CI] | minus BF16 [95 % CI] | relative | p | in words |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in result["sets"].items():
        for base, row in s["bases"].items():
            lv = row["level"]
            d = row.get("vs_bf16")
            lines.append(
                f"| {name} | {BASE_NAMES[base]} | {lv['mean']:.4f} {_ci_text(lv['ci'])} | "
                + (
                    f"{d['difference']:+.4f} {_ci_text(d['ci'], signed=True)} | {100 * d['relative']:+.1f} % | "
                    f"{_p_text(d['p_value'])} | {d['words']} |"
                    if d
                    else "- | - | - | - |"
                )
            )
    lines += [""]
    for name, s in result["sets"].items():
        lines.append(f"- `{name}`: {s['description']}.")
    lines += [
        "",
        f"## {base_name} + AQN across the schedule (teacher-forced on the BF16 samples)",
        "",
        f"Schedule: `{aqn['schedule']}`, sigma {aqn['sigma_start']:g} -> {aqn['sigma_end']:g}, {aqn['num_stages']} "
        f"stages over {aqn['total_steps']} steps (the testbed recipe). Each sigma: {aqn['num_draws']} noise draws "
        f"(the AQN noise of run seed {aqn['seed']} at the first {aqn['num_draws']} steps of its stage). Intervals: "
        "paired bootstrap over prompts and draws; draw std: standard deviation across draws of the per-draw mean; mean "
        "abs. change: mean over prompts and draws of |entropy with noise - without| (the noise moves single prompts "
        "both ways).",
        "",
        f"| stages | sigma | entropy [95 % CI] | draw std | minus BF16 [95 % CI] | p | minus {base_name} [95 % CI] | p "
        "| mean abs. change per prompt |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    key = f"vs_{aqn['base']}"
    for row in result["aqn"]:
        lv = row["level"]
        d = row["vs_bf16"]
        stages = ",".join(str(s) for s in row["stages"])
        if row["sigma"] == 0:
            lines.append(
                f"| {stages} | 0 | {lv['mean']:.4f} {_ci_text(lv['ci'])} | 0 | {d['difference']:+.4f} "
                f"{_ci_text(d['ci'], signed=True)} | {_p_text(d['p_value'])} | 0 | - | 0 |"
            )
            continue
        r = row[key]
        lines.append(
            f"| {stages} | {row['sigma']:.3g} | {lv['mean']:.4f} {_ci_text(lv['ci'])} | {lv['draw_std']:.4f} | "
            f"{d['difference']:+.4f} {_ci_text(d['ci'], signed=True)} | {_p_text(d['p_value'], c['num_resamples'])} | "
            f"{r['difference']:+.4f} {_ci_text(r['ci'], signed=True)} | {_p_text(r['p_value'], c['num_resamples'])} | "
            f"{r['mean_abs_difference']:.4f} |"
        )
    lines += ["", "In words:", ""]
    for name, s in result["sets"].items():
        for row in s["bases"].values():
            if "vs_bf16" in row:
                lines.append(f"- {name}: {row['vs_bf16']['words']}")
    for row in result["aqn"]:
        if row["sigma"] > 0:
            lines.append(f"- {row[key]['words']}")
    return "\n".join(lines) + "\n"


def plot_entropy(result: dict, path: str) -> str:
    """Two panels: paired differences to BF16 per 4-bit base and sequence set; NVFP4 + AQN minus BF16 across sigma."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1, 1.2]})
    sets = list(result["sets"])
    quantized = [b for b in result["sets"][sets[0]]["bases"] if b != "none"]
    width = 0.8 / len(sets)
    for i, name in enumerate(sets):
        xs, ys, lows, highs = [], [], [], []
        for j, base in enumerate(quantized):
            d = result["sets"][name]["bases"][base]["vs_bf16"]
            xs.append(j + (i - (len(sets) - 1) / 2) * width)
            ys.append(d["difference"])
            lows.append(d["difference"] - d["ci"][0])
            highs.append(d["ci"][1] - d["difference"])
        left.errorbar(xs, ys, yerr=[lows, highs], fmt="o", capsize=4, label=name.replace("_", " "))
    left.axhline(0, color="black", lw=0.8)
    left.set_xticks(range(len(quantized)), [BASE_NAMES[b] for b in quantized])
    left.set_ylabel("entropy minus BF16 base (nats / token)")
    left.set_title("4-bit bases vs BF16, paired per prompt\n(error bars: 95 % Student-t CI over prompts)", fontsize=10)
    left.legend(title="sequences", fontsize=8)
    left.grid(alpha=0.3, axis="y")

    aqn = result["config"]["aqn"]
    base_name = BASE_NAMES[aqn["base"]]
    key = f"vs_{aqn['base']}"
    noisy = [r for r in result["aqn"] if r["sigma"] > 0]
    zero = next((r for r in result["aqn"] if r["sigma"] == 0), None)
    sig = [r["sigma"] for r in noisy]
    ys = [r[key]["difference"] for r in noisy]
    err = [[y - r[key]["ci"][0] for y, r in zip(ys, noisy)], [r[key]["ci"][1] - y for y, r in zip(ys, noisy)]]
    right.errorbar(
        sig, ys, yerr=err, fmt="o-", capsize=4, label=f"mean change ({aqn['num_draws']} noise draws per sigma)"
    )
    right.plot(
        sig,
        [r[key]["mean_abs_difference"] for r in noisy],
        "s--",
        color="tab:gray",
        label="mean |change| per prompt and draw",
    )
    right.axhline(0, color="black", lw=0.8, label=f"{base_name}, no noise (sigma 0)")
    if zero is not None:
        gap = -zero["vs_bf16"]["difference"]
        right.axhline(gap, color="tab:red", lw=1.0, ls=":", label=f"BF16 base ({gap:+.4f})")
    right.set_xscale("log")
    right.set_xlabel("AQN sigma (std of the additive noise on RMSNorm weights, log scale)")
    right.set_ylabel(f"entropy minus {base_name} without noise (nats / token)")
    right.set_title(
        f"{base_name} + AQN across the schedule ({aqn['sigma_start']:g} -> {aqn['sigma_end']:g})\n"
        "(error bars: 95 % paired bootstrap CI over prompts and noise draws)",
        fontsize=10,
    )
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle(
        f"Token entropy on the testbed's {result['config']['num_prompts']} test prompts (T 1.0, no training)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(result: dict, json_path: str) -> tuple[str, str]:
    """`<stem>.md` and `<stem>.png` next to `json_path`."""
    stem = os.path.splitext(json_path)[0]
    md_path, png_path = stem + ".md", stem + ".png"
    with open(md_path, "w") as f:
        f.write(entropy_markdown(result, os.path.basename(json_path)))
    plot_entropy(result, png_path)
    return md_path, png_path


# ----------------------------------------------------------------------------------------------------------------------
# The Table 1 grid's logged entropy
# ----------------------------------------------------------------------------------------------------------------------


def load_grid_runs(grid_dir: str) -> dict[str, list[dict]]:
    """`{row: [run JSON per seed, by seed]}` from the table1 run JSONs (`*.json` with the table1 schema) directly in
    `grid_dir` (e.g. `results/table1_cpu/adder3`). A file that does not parse (the grid may be writing it) is skipped
    with a warning."""
    from qerl_repro.table1 import SCHEMA as RUN_SCHEMA

    if not os.path.isdir(grid_dir):
        raise UserError(f"--grid_dir {grid_dir}: no such folder")
    rows: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(grid_dir, "*.json"))):
        try:
            with open(path) as f:
                run = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("skipping %s: %s", path, exc)
            continue
        if not isinstance(run, dict) or run.get("schema") != RUN_SCHEMA:
            continue
        run["_file"] = os.path.basename(path)
        rows.setdefault(run["row"], []).append(run)
    for runs in rows.values():
        runs.sort(key=lambda r: (r.get("seed") is None, r.get("seed")))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m qerl_repro.entropy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="Measure the bases and AQN; write the JSON, its markdown and its figure.")
    m.add_argument("--model", default="data/testbed/adder3")
    m.add_argument("--output", default="results/testbed/entropy.json")
    m.add_argument("--bases", nargs="+", default=list(BASES), choices=BASES)
    m.add_argument("--num_samples", type=int, default=8, help="samples per prompt (the GRPO group size)")
    m.add_argument("--sample_seed", type=int, default=0)
    m.add_argument("--limit", type=int, default=None, help="first N test prompts only (default: all 1000)")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    m.add_argument("--aqn_base", default="nvfp4", choices=BASES)
    m.add_argument("--aqn_total_steps", type=int, default=250, help="max_steps of the testbed recipe")
    m.add_argument("--aqn_sigma_start", type=float, default=1e-2)
    m.add_argument("--aqn_sigma_end", type=float, default=5e-4)
    m.add_argument("--aqn_num_stages", type=int, default=10)
    m.add_argument("--aqn_schedule", default="qerl_code", choices=["qerl_code", "paper"])
    m.add_argument("--aqn_seed", type=int, default=42, help="the run seed whose AQN noise is drawn")
    m.add_argument("--num_draws", type=int, default=4, help="noise draws per sigma")
    m.add_argument("--batch_size", type=int, default=512)
    m.add_argument("--num_resamples", type=int, default=5000)
    r = sub.add_parser("report", help="Write the markdown and the figure again from a measure JSON.")
    r.add_argument("--input", default="results/testbed/entropy.json")
    g = sub.add_parser("grid", help="Summarise TRL's logged entropy per arm of the Table 1 grid.")
    g.add_argument("--grid_dir", default="results/table1_cpu/adder3")
    g.add_argument("--first_steps", type=int, default=25)
    g.add_argument("--reference_row", default="bf16_lora")
    g.add_argument("--output", default=None, help="also write the summary as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(name)s - %(message)s")

    if args.command == "measure":
        from qerl_repro.evaluation import write_json

        result = measure(
            args.model,
            bases=args.bases,
            num_samples=args.num_samples,
            sample_seed=args.sample_seed,
            limit=args.limit,
            dtype=args.dtype,
            aqn_base=args.aqn_base,
            aqn_total_steps=args.aqn_total_steps,
            aqn_sigma_start=args.aqn_sigma_start,
            aqn_sigma_end=args.aqn_sigma_end,
            aqn_num_stages=args.aqn_num_stages,
            aqn_schedule=args.aqn_schedule,
            aqn_seed=args.aqn_seed,
            num_draws=args.num_draws,
            batch_size=args.batch_size,
            num_resamples=args.num_resamples,
        )
        write_json(result, args.output)
        md_path, png_path = write_reports(result, args.output)
        sys.stdout.write(entropy_markdown(result, os.path.basename(args.output)))
        sys.stdout.write(f"wrote {args.output}, {md_path}, {png_path}\n")
        return result
    if args.command == "report":
        if not os.path.isfile(args.input):
            raise UserError(f"--input {args.input}: no such file (run `python -m qerl_repro.entropy measure` first)")
        with open(args.input) as f:
            result = json.load(f)
        if result.get("schema") != SCHEMA:
            raise UserError(f"--input {args.input}: not an entropy measurement (schema {result.get('schema')!r})")
        md_path, png_path = write_reports(result, args.input)
        sys.stdout.write(f"wrote {md_path}, {png_path}\n")
        return result
    summary = summarize_grid_entropy(
        load_grid_runs(args.grid_dir), first_steps=args.first_steps, reference_row=args.reference_row or None
    )
    if not summary:
        raise UserError(f"--grid_dir {args.grid_dir}: no table1 run JSON with a logged entropy curve")
    sys.stdout.write(grid_entropy_table(summary))
    if args.output:
        from qerl_repro.evaluation import write_json

        write_json({"schema": SCHEMA + "/grid", "grid_dir": args.grid_dir, "rows": summary}, args.output)
    return summary


if __name__ == "__main__":
    run_cli(main)
