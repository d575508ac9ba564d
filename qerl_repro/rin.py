# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""RIN (resilient-improving noise): AQN with a per-block sigma multiplier chosen from an SRDD scan.

The seed studies' extension of QeRL's AQN (reference/seed_studies.md): the noise of each decoder block's RMSNorms is
`multiplier[block] * aqn_noise(...)`, the multipliers computed once from an SRDD JSON (`python -m qerl_repro.srdd`) and
options, by pure functions (no RNG: identical on every rank, in every process, and in the server's workers):

- `targeted`: multiplier 1 on the chosen blocks, 0 elsewhere. The blocks are `aqn_rin_blocks` if given, else the
  `aqn_rin_top_k` blocks with the highest SRDD error, else the blocks SRDD flagged (`flagged_blocks`).
- `variable`: a multiplier proportional to the block's SRDD relative Frobenius error, normalised to mean 1 over the
  blocks (the overall noise level stays AQN's), optionally clamped to `[aqn_rin_min, aqn_rin_max]`; with clamps, the
  scale is solved so that the clamped multipliers still average 1 (`normalised_clamped`).

Each norm gets the multiplier of the block its name belongs to (`model.layers.<i>.<...>` in vLLM, HF and PEFT models
alike: `qerl_repro.noise.find_norm_weights` returns canonical names). The final norm (`aqn_include_final_norm`)
belongs to no block: it gets 0 in targeted mode (it is not one of the chosen blocks) and 1 in variable mode (the mean
multiplier, plain AQN's sigma). The draw of a norm is the same as plain AQN's for the same `(seed, step, index)`, only
scaled: targeted RIN on a block leaves its noise exactly as global AQN would have drawn it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass


__all__ = [
    "RIN_MODES",
    "RINPlan",
    "load_srdd",
    "norm_block_index",
    "norm_multipliers",
    "normalised_clamped",
    "rin_block_multipliers",
    "rin_metrics",
    "rin_plan",
    "rin_plan_from_config",
]

RIN_MODES = ("none", "targeted", "variable")
_NORM_BLOCK_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def load_srdd(path: str) -> dict:
    """Read and check an SRDD JSON (`python -m qerl_repro.srdd --output PATH`); `ValueError` naming the problem."""
    if not os.path.isfile(path):
        raise ValueError(
            f"aqn_rin_srdd={path!r} does not exist; write one with `python -m qerl_repro.srdd --model <model> "
            f"--format <format> --output {path}`."
        )
    try:
        with open(path) as f:
            srdd = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"aqn_rin_srdd={path!r} is not valid JSON ({error}).") from error
    problem = _srdd_problem(srdd)
    if problem:
        raise ValueError(f"aqn_rin_srdd={path!r} is not an SRDD report from qerl_repro.srdd: {problem}.")
    return srdd


def _srdd_problem(srdd) -> str | None:
    if not isinstance(srdd, dict):
        return "the JSON is not an object"
    missing = [key for key in ("num_blocks", "blocks", "flagged_blocks", "ranking") if key not in srdd]
    if missing:
        return f"missing keys {missing}"
    num_blocks = srdd["num_blocks"]
    if not isinstance(num_blocks, int) or num_blocks < 1:
        return f"num_blocks={num_blocks!r} is not a positive integer"
    indices = [entry.get("block") for entry in srdd["blocks"]] if isinstance(srdd["blocks"], list) else None
    if indices != list(range(num_blocks)):
        return f"`blocks` must list blocks 0..{num_blocks - 1} in order, got {indices}"
    for entry in srdd["blocks"]:
        error = entry.get("rel_frobenius")
        if not isinstance(error, (int, float)) or not math.isfinite(error) or error < 0:
            return f"block {entry['block']} has rel_frobenius={error!r}, not a finite number >= 0"
    return None


def _check_block_list(blocks: Sequence[int], num_blocks: int, name: str) -> list[int]:
    blocks = list(blocks)
    if not blocks:
        raise ValueError(f"{name}=[] selects no block: targeted RIN would add no noise. Name at least one block.")
    bad = [block for block in blocks if isinstance(block, bool) or not isinstance(block, int)]
    if bad:
        raise ValueError(f"{name}={blocks} must hold block indices (integers), got {bad}.")
    out_of_range = [block for block in blocks if not 0 <= block < num_blocks]
    if out_of_range:
        raise ValueError(
            f"{name}={blocks}: blocks {out_of_range} do not exist; the model has blocks 0..{num_blocks - 1}."
        )
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"{name}={blocks} lists a block twice.")
    return sorted(blocks)


def normalised_clamped(
    errors: Sequence[float], min_multiplier: float | None = None, max_multiplier: float | None = None
) -> list[float]:
    """`clip(c * errors, min_multiplier, max_multiplier)` with `c > 0` chosen so that the result averages 1.

    Without clamps `c = 1 / mean(errors)`. With clamps the mean of the clipped values grows monotonically with `c`, so
    `c` is found by bisection (float64, to machine precision). Needs `min_multiplier <= 1 <= max_multiplier`; errors
    all zero give all-ones (no information: plain AQN).

    >>> normalised_clamped([1.0, 2.0, 3.0])
    [0.5, 1.0, 1.5]
    >>> normalised_clamped([1.0, 2.0, 9.0], max_multiplier=1.5)
    [0.5, 1.0, 1.5]
    """
    errors = [float(error) for error in errors]
    if not errors:
        raise ValueError("No block errors to normalise.")
    low = 0.0 if min_multiplier is None else float(min_multiplier)
    high = math.inf if max_multiplier is None else float(max_multiplier)
    if not (0.0 <= low <= 1.0 <= high):
        raise ValueError(
            f"aqn_rin_min={min_multiplier!r} and aqn_rin_max={max_multiplier!r} must satisfy 0 <= min <= 1 <= max: the "
            "multipliers average 1 over the blocks."
        )
    total = sum(errors)
    if total <= 0:
        return [1.0] * len(errors)

    def clipped(scale: float) -> list[float]:
        return [min(high, max(low, scale * error)) for error in errors]

    def mean(values: list[float]) -> float:
        return math.fsum(values) / len(values)

    scale = len(errors) / total  # exact answer when no clamp binds
    if low == 0.0 and high == math.inf:
        return clipped(scale)
    if mean(clipped(scale)) != 1.0:
        lower, upper = 0.0, scale
        while mean(clipped(upper)) < 1.0:  # reachable unless every error is 0 (handled) or max < 1 (rejected)
            lower, upper = upper, 2 * upper
            if upper > 1e300:
                break  # mean(clip(c e)) < 1 for all c: every block is at max_multiplier == 1 or errors vanish
        for _ in range(200):
            middle = 0.5 * (lower + upper)
            if middle in (lower, upper):
                break
            lower, upper = (middle, upper) if mean(clipped(middle)) < 1.0 else (lower, middle)
        scale = upper
        # Exact scale for the clamp pattern found: the free blocks make up what the clamped ones leave of the mean.
        free = [error for error in errors if low < scale * error < high]
        if free:
            clamped = math.fsum(
                min(high, max(low, scale * error)) for error in errors if not low < scale * error < high
            )
            exact = (len(errors) - clamped) / math.fsum(free)
            if [low < exact * error < high for error in errors] == [low < scale * error < high for error in errors]:
                scale = exact
    return clipped(scale)


def rin_block_multipliers(
    srdd: Mapping | None,
    mode: str,
    *,
    blocks: Sequence[int] | None = None,
    top_k: int | None = None,
    min_multiplier: float | None = None,
    max_multiplier: float | None = None,
    num_blocks: int | None = None,
) -> list[float]:
    """The per-block AQN sigma multipliers of RIN (index = block), a pure function of the SRDD report and options.

    Args:
        srdd: an SRDD report (`load_srdd`); may be None only for `targeted` with explicit `blocks` and `num_blocks`.
        mode: `"targeted"` or `"variable"` (see the module docstring).
        blocks / top_k: targeted only; explicit block list, or the `top_k` worst blocks of the SRDD ranking.
        min_multiplier / max_multiplier: variable only; clamps, with the mean kept at 1 (`normalised_clamped`).
        num_blocks: the number of blocks when there is no SRDD report.
    """
    if mode not in RIN_MODES or mode == "none":
        raise ValueError(f"aqn_rin={mode!r}: RIN multipliers need a mode among {list(RIN_MODES[1:])}.")
    if srdd is None and not (mode == "targeted" and blocks is not None and num_blocks):
        raise ValueError(
            f"aqn_rin={mode!r} needs an SRDD report (aqn_rin_srdd); only targeted RIN with an explicit aqn_rin_blocks "
            "list can do without."
        )
    total = int(srdd["num_blocks"]) if srdd is not None else int(num_blocks)
    if mode == "targeted":
        if min_multiplier is not None or max_multiplier is not None:
            raise ValueError("aqn_rin_min / aqn_rin_max apply to aqn_rin='variable' only.")
        if blocks is not None and top_k is not None:
            raise ValueError("Give aqn_rin_blocks or aqn_rin_top_k, not both.")
        if blocks is not None:
            chosen = _check_block_list(blocks, total, "aqn_rin_blocks")
        elif top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= total:
                raise ValueError(f"aqn_rin_top_k={top_k!r} must be an integer in 1..{total} (the number of blocks).")
            chosen = sorted(srdd["ranking"][:top_k])
        else:
            chosen = _check_block_list(srdd["flagged_blocks"], total, "the SRDD report's flagged_blocks")
        return [1.0 if block in chosen else 0.0 for block in range(total)]
    if blocks is not None or top_k is not None:
        raise ValueError("aqn_rin_blocks / aqn_rin_top_k apply to aqn_rin='targeted' only.")
    errors = [entry["rel_frobenius"] for entry in srdd["blocks"]]
    return normalised_clamped(errors, min_multiplier, max_multiplier)


def norm_block_index(name: str) -> int | None:
    """Decoder block of a norm weight by its canonical name (`model.layers.3.input_layernorm.weight` -> 3; the same in
    vLLM, HF and PEFT models, see `find_norm_weights`); None for a norm outside the blocks (`model.norm.weight`)."""
    match = _NORM_BLOCK_RE.search(name)
    return int(match.group(1)) if match else None


def norm_multipliers(
    names: Iterable[str], block_multipliers: Sequence[float], *, final_norm_multiplier: float
) -> dict[str, float]:
    """`{norm name: multiplier}` for the AQN targets of a model: its block's multiplier, `final_norm_multiplier` for a
    norm outside the blocks. Raises `ValueError` when the model's blocks and the multipliers disagree in number."""
    names = list(names)
    indices = {name: norm_block_index(name) for name in names}
    in_blocks = [index for index in indices.values() if index is not None]
    num_model_blocks = max(in_blocks) + 1 if in_blocks else 0
    if num_model_blocks != len(block_multipliers):
        raise ValueError(
            f"RIN has multipliers for {len(block_multipliers)} blocks but the model's norms span {num_model_blocks} "
            "blocks: the SRDD report (aqn_rin_srdd) was made for another model. Scan this model with "
            "`python -m qerl_repro.srdd`."
        )
    return {
        name: final_norm_multiplier if index is None else float(block_multipliers[index])
        for name, index in indices.items()
    }


@dataclass(frozen=True)
class RINPlan:
    """The resolved RIN settings: what the trainer logs, writes to `rin_multipliers.json` and sends to the workers."""

    mode: str
    block_multipliers: tuple[float, ...]
    final_norm_multiplier: float
    srdd: str | None
    srdd_format: str | None

    def to_json(self) -> dict:
        return {**asdict(self), "block_multipliers": list(self.block_multipliers)}


def rin_plan(
    mode: str,
    *,
    srdd_path: str | None = None,
    blocks: Sequence[int] | None = None,
    top_k: int | None = None,
    min_multiplier: float | None = None,
    max_multiplier: float | None = None,
    num_blocks: int | None = None,
) -> RINPlan | None:
    """Load the SRDD report (if any) and compute the multipliers; None when `mode == "none"`."""
    if mode not in RIN_MODES:
        raise ValueError(f"aqn_rin={mode!r} is not one of {list(RIN_MODES)}.")
    if mode == "none":
        return None
    srdd = load_srdd(srdd_path) if srdd_path is not None else None
    if srdd is not None and num_blocks is not None and int(srdd["num_blocks"]) != int(num_blocks):
        raise ValueError(
            f"aqn_rin_srdd={srdd_path!r} describes a model with {srdd['num_blocks']} blocks, but the model has "
            f"{num_blocks}: scan this model with `python -m qerl_repro.srdd`."
        )
    multipliers = rin_block_multipliers(
        srdd,
        mode,
        blocks=blocks,
        top_k=top_k,
        min_multiplier=min_multiplier,
        max_multiplier=max_multiplier,
        num_blocks=num_blocks,
    )
    return RINPlan(
        mode=mode,
        block_multipliers=tuple(multipliers),
        final_norm_multiplier=0.0 if mode == "targeted" else 1.0,
        srdd=srdd_path,
        srdd_format=srdd.get("format") if srdd is not None else None,
    )


def rin_plan_from_config(args, num_blocks: int | None = None) -> RINPlan | None:
    """`rin_plan` from the `aqn_rin*` fields of a `QeRLConfig`."""
    return rin_plan(
        args.aqn_rin,
        srdd_path=args.aqn_rin_srdd,
        blocks=args.aqn_rin_blocks,
        top_k=args.aqn_rin_top_k,
        min_multiplier=args.aqn_rin_min,
        max_multiplier=args.aqn_rin_max,
        num_blocks=num_blocks,
    )


def rin_metrics(plan: RINPlan, *, per_block: bool = False) -> dict[str, float]:
    """`aqn/rin_*` log entries: how many blocks receive noise and the range and mean of the multipliers (plus one
    `aqn/rin_multiplier/block_<i>` per block with `per_block`, logged once at the first step)."""
    multipliers = plan.block_multipliers
    metrics = {
        "aqn/rin_num_noised_blocks": sum(1 for value in multipliers if value > 0),
        "aqn/rin_multiplier_min": min(multipliers),
        "aqn/rin_multiplier_max": max(multipliers),
        "aqn/rin_multiplier_mean": math.fsum(multipliers) / len(multipliers),
    }
    if per_block:
        metrics.update({f"aqn/rin_multiplier/block_{i}": value for i, value in enumerate(multipliers)})
    return metrics
