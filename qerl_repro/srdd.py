# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""SRDD (static relative deadzone detection): which transformer blocks a 4-bit format hurts most.

    python -m qerl_repro.srdd --model smollm2 --format nvfp4 --output results/srdd_smollm2_nvfp4.json

A static scan of the stored weights (no data, no forward pass), after the seed studies' SRDD
(reference/seed_studies.md), built on the quantization error report (`qerl_repro.quantization.report`): every Linear
layer the trainer would quantize is quantized and dequantized in the chosen format (NVFP4 / MXFP4 with the trainer's
shared per-tensor scales, `fake_quantize`; NF4 through bitsandbytes with QLoRA's double quantization, as
`load_base_model` stores it) and compared with the original, per layer and per transformer block:

- `rel_frobenius`: ||W - Q(W)||_F / ||W||_F (size-weighted over a block's layers), the sound error measure;
- `sqnr_db`: -20 log10(rel_frobenius);
- `deadzone`: the share of the non-zero weights that quantize to exactly 0;
- `elementwise_rel`: the seeds' metric, the mean over non-zero weights of |W - Q(W)| / |W|. Reported for comparison
  only: a weight near zero has a tiny denominator, so each one in the deadzone counts 100 % and one rounded up to the
  smallest non-zero level counts many times 100 %, however little it adds to the layer's output; the mean is
  dominated by the smallest weights (1.8-2.7x the Frobenius ratio on Gaussian weights, reference/fp4_formats.md 5.2).

Blocks whose `rel_frobenius` exceeds `threshold` are flagged (the candidates for targeted RIN, `qerl_repro.rin`).
Default threshold: `threshold_margin` (1.05) times the format's own error on i.i.d. Gaussian weights
(`gaussian_reference_error`: about 9.5 % NVFP4, 11.2 % MXFP4, 9.2 % NF4). A flagged block quantizes clearly worse than
a weight matrix without structure would, so the excess comes from the block's weights (outliers, heavy tails, a grid the
format does not fit), not from the format's resolution. The 5 % margin (0.42 dB) keeps ordinary distributions out:
heavy-tailed (Laplace, Student-t) weights move NVFP4's error by -3 % and MXFP4's by +10 % from the Gaussian value
(reference/fp4_formats.md 5.2), and the blocks of trained models measured here (SmolLM2-135M, the testbed organism)
sit within -1 % to +4 % of it; without a margin, 0.01 % differences decide whether a block is flagged. The JSON also ranks the blocks by error and ends with a plain recommendation; `--plot` (default:
the JSON path with `.png`) draws the per-block errors with the threshold line.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from qerl_repro.errors import UserError
from qerl_repro.quantization.base import fp4_quantization_plan
from qerl_repro.quantization.formats import DEFAULT_MXFP4_SCALE_MODE, fake_quantize
from qerl_repro.quantization.report import _aggregate, _block_index, _kind, layer_error_stats, resolve_model_path


__all__ = [
    "SRDD_FORMATS",
    "SRDDArguments",
    "elementwise_relative_error_sums",
    "gaussian_reference_error",
    "main",
    "nf4_fake_quantize",
    "plot_srdd",
    "recommendation",
    "srdd_scan",
]

SRDD_VERSION = 1
SRDD_FORMATS = ("nvfp4", "mxfp4", "nf4")
NF4_BLOCK_SIZE = 64  # bitsandbytes' default, used by load_base_model (QLoRA's recipe)
GAUSSIAN_REFERENCE_SHAPE = (1024, 4096)
DEFAULT_THRESHOLD_MARGIN = 1.05
HIGHER_PRECISION = {
    "mxfp4": "NVFP4 (blocks of 16 with an E4M3 scale and an FP32 per-tensor scale: about 1.5-2 dB more SQNR)",
    "nf4": "an 8-bit format (FP8 / INT8) or NVFP4 with its per-tensor scale",
    "nvfp4": "an 8-bit format (FP8 / INT8) for the base, or keep the flagged blocks in BF16",
}


@torch.no_grad()
def nf4_fake_quantize(weight: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize with bitsandbytes NF4 (blocks of 64, double-quantized absmax), the weight `load_base_model`
    (quant_format="nf4") holds; same shape and dtype as `weight`. Runs on CPU with bitsandbytes >= 0.45."""
    import bitsandbytes.functional as bnb_functional

    packed, state = bnb_functional.quantize_4bit(
        weight.detach().contiguous(), blocksize=NF4_BLOCK_SIZE, quant_type="nf4", compress_statistics=True
    )
    return bnb_functional.dequantize_4bit(packed, state).to(weight.dtype).reshape(weight.shape)


def _fake_quantize(weight: torch.Tensor, fmt: str, *, per_tensor_scale=None, mxfp4_scale_mode: str, name: str):
    if fmt == "nf4":
        return nf4_fake_quantize(weight)
    return fake_quantize(weight, fmt, per_tensor_scale=per_tensor_scale, mxfp4_scale_mode=mxfp4_scale_mode, name=name)


@torch.no_grad()
def elementwise_relative_error_sums(weight: torch.Tensor, weight_hat: torch.Tensor) -> dict:
    """`sum_elementwise_rel` (sum over non-zero weights of |w - q(w)| / |w|, float64) and `num_nonzero`: the seeds'
    element-wise metric is their ratio (kept as sums so blocks and models aggregate exactly)."""
    w = weight.detach().double()
    nonzero = w != 0
    ratio = (w - weight_hat.detach().double()).abs()[nonzero] / w.abs()[nonzero]
    return {"sum_elementwise_rel": float(ratio.sum()), "num_nonzero": int(nonzero.sum())}


@torch.no_grad()
def gaussian_reference_error(
    fmt: str, *, mxfp4_scale_mode: str = DEFAULT_MXFP4_SCALE_MODE, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> float:
    """Relative Frobenius error of `fmt` on a seeded i.i.d. N(0, 0.02^2) matrix of `GAUSSIAN_REFERENCE_SHAPE` (4.2 M
    elements, rounded to `dtype` like a checkpoint): the default SRDD threshold. NVFP4 about 9.5 %, MXFP4 (even)
    11.2 %, NF4 9.2 %; independent of the weights' scale for NVFP4 and NF4 (reference/fp4_formats.md 5.2)."""
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(GAUSSIAN_REFERENCE_SHAPE, generator=generator) * 0.02).to(dtype)
    per_tensor_scale = None
    if fmt == "nvfp4":
        from qerl_repro.quantization.formats import nvfp4_per_tensor_scale

        per_tensor_scale = nvfp4_per_tensor_scale(weight.abs().amax().float())
    weight_hat = _fake_quantize(
        weight, fmt, per_tensor_scale=per_tensor_scale, mxfp4_scale_mode=mxfp4_scale_mode, name="gaussian"
    )
    return layer_error_stats(weight, weight_hat)["rel_frobenius"]


def _targets(model: nn.Module, fmt: str, skip_modules) -> tuple[list[str], dict, list[str]]:
    """(layer names, per-tensor scales, skipped names): the trainer's selection of the Linear layers to quantize."""
    if fmt in ("nvfp4", "mxfp4"):
        plan = fp4_quantization_plan(model, fmt, skip_modules=skip_modules)
        return plan.targets, plan.per_tensor_scales, plan.skipped
    # NF4: bitsandbytes converts every Linear except the modules transformers keeps out (lm_head).
    targets, skipped = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            (skipped if name.split(".")[-1] in skip_modules or name in skip_modules else targets).append(name)
    return targets, dict.fromkeys(targets), skipped


def _summarise(members: list[dict]) -> dict:
    summary = _aggregate(members)
    sum_rel = sum(member["sum_elementwise_rel"] for member in members)
    summary["sum_elementwise_rel"] = sum_rel
    summary["elementwise_rel"] = sum_rel / summary["num_nonzero"] if summary["num_nonzero"] else float("nan")
    return summary


def recommendation(fmt: str, blocks: list[dict], threshold: float) -> str:
    """Plain sentences on what to do with the scan's result (format choice, targeted or variable RIN), from the per-block
    entries (`block`, `rel_frobenius`, `flagged`) and the threshold."""
    flagged = [entry["block"] for entry in blocks if entry["flagged"]]
    num_blocks = len(blocks)
    errors = [entry["rel_frobenius"] for entry in blocks]
    spread = (
        f" Block errors span {100 * min(errors):.2f}-{100 * max(errors):.2f} % (worst/best = "
        f"{max(errors) / min(errors):.3f})."
        if errors and min(errors) > 0
        else ""
    )
    limit = f"{100 * threshold:.2f} % relative Frobenius error"
    if num_blocks and len(flagged) == num_blocks:
        return (
            f"Every block ({num_blocks}) exceeds {limit}: {fmt} fits this model's weights worse than Gaussian weights "
            f"throughout, so no block stands out. Consider a higher-precision format: {HIGHER_PRECISION[fmt]}. "
            "Targeted RIN would noise every block (plain AQN); variable RIN (aqn_rin: variable) still weights the "
            f"blocks by their error.{spread}"
        )
    if not flagged:
        return (
            f"No block exceeds {limit}: no block quantizes clearly worse in {fmt} than Gaussian weights do. Plain AQN; "
            "targeted RIN needs an explicit choice (aqn_rin_blocks, or aqn_rin_top_k for the worst k blocks); variable RIN "
            f"(aqn_rin: variable) still weights the blocks by their error.{spread}"
        )
    return (
        f"Blocks {flagged} exceed {limit} ({len(flagged)} of {num_blocks}): the candidates for targeted RIN "
        f"(aqn_rin: targeted, noise only there); variable RIN (aqn_rin: variable) weights every block by its "
        f"error.{spread}"
    )


@torch.no_grad()
def srdd_scan(
    model: nn.Module,
    fmt: str,
    *,
    threshold: float | None = None,
    threshold_margin: float = DEFAULT_THRESHOLD_MARGIN,
    mxfp4_scale_mode: str = DEFAULT_MXFP4_SCALE_MODE,
    skip_modules=("lm_head",),
) -> dict:
    """The SRDD report of `model` (left unchanged) in `fmt`; see the module docstring.

    Returns a JSON-serialisable dict: `version`, `format`, `mxfp4_scale_mode`, `num_blocks` (decoder blocks of the
    model, `config.num_hidden_layers`), `threshold` and `threshold_source`, `summary` (model-wide aggregate),
    `blocks` (per block: the metrics, `rank` by `rel_frobenius` with 1 the worst, `flagged`), `flagged_blocks`,
    `ranking` (block indices, worst first), `layers` (per Linear: name, block, kind, shape, metrics, raw sums),
    `recommendation`, `elementwise_note` and `skipped`.
    """
    if fmt not in SRDD_FORMATS:
        raise UserError(f"Unknown format {fmt!r}; SRDD scans one of: {', '.join(SRDD_FORMATS)}.")
    gaussian = gaussian_reference_error(fmt, mxfp4_scale_mode=mxfp4_scale_mode)
    threshold_source = "user"
    if threshold is None:
        if not (math.isfinite(threshold_margin) and threshold_margin > 0):
            raise UserError(f"threshold_margin={threshold_margin!r} must be a positive factor (e.g. 1.05).")
        threshold = threshold_margin * gaussian
        threshold_source = (
            f"{threshold_margin:g} x the {fmt} relative Frobenius error on i.i.d. Gaussian weights "
            f"({GAUSSIAN_REFERENCE_SHAPE[0]}x{GAUSSIAN_REFERENCE_SHAPE[1]}, bf16, seed 0: {100 * gaussian:.3f} %)"
        )
    elif not (math.isfinite(threshold) and threshold > 0):
        raise UserError(f"threshold={threshold!r} must be a positive relative error (e.g. 0.1 for 10 %).")

    targets, per_tensor_scales, skipped = _targets(model, fmt, skip_modules)
    layers = []
    for name in targets:
        weight = model.get_submodule(name).weight.detach()
        weight_hat = _fake_quantize(
            weight, fmt, per_tensor_scale=per_tensor_scales[name], mxfp4_scale_mode=mxfp4_scale_mode, name=name
        )
        entry = {
            "name": name,
            "block": _block_index(name),
            "kind": _kind(name),
            "shape": list(weight.shape),
            "numel": weight.numel(),
        }
        entry.update(layer_error_stats(weight, weight_hat))
        entry.update(elementwise_relative_error_sums(weight, weight_hat))
        entry["elementwise_rel"] = entry["sum_elementwise_rel"] / entry["num_nonzero"] if entry["num_nonzero"] else 0.0
        layers.append(entry)
    if not layers:
        raise UserError("No Linear layer to quantize in the model (all skipped?).")

    by_block: dict[int, list[dict]] = {}
    for layer in layers:
        if layer["block"] is not None:
            by_block.setdefault(layer["block"], []).append(layer)
    num_blocks = getattr(getattr(model, "config", None), "num_hidden_layers", None) or (max(by_block, default=-1) + 1)
    blocks = [{"block": index, **_summarise(members)} for index, members in sorted(by_block.items())]
    ranking = [entry["block"] for entry in sorted(blocks, key=lambda entry: entry["rel_frobenius"], reverse=True)]
    for entry in blocks:
        entry["rank"] = ranking.index(entry["block"]) + 1
        entry["flagged"] = bool(entry["rel_frobenius"] > threshold)
    flagged = [entry["block"] for entry in blocks if entry["flagged"]]
    return {
        "version": SRDD_VERSION,
        "format": fmt,
        "mxfp4_scale_mode": mxfp4_scale_mode if fmt == "mxfp4" else None,
        "num_blocks": int(num_blocks),
        "threshold": threshold,
        "threshold_source": threshold_source,
        "gaussian_reference": gaussian,
        "summary": _summarise(layers),
        "blocks": blocks,
        "flagged_blocks": flagged,
        "ranking": ranking,
        "recommendation": recommendation(fmt, blocks, threshold),
        "elementwise_note": (
            "elementwise_rel is the seeds' metric, the mean over non-zero weights of |w - q(w)| / |w|. It inflates: "
            "a weight near zero has a tiny denominator, so each one in the deadzone counts 100 % and one rounded up "
            "to the smallest non-zero level counts many times 100 %, however little it adds to the layer's output. "
            "rel_frobenius and sqnr_db weight each error by its size and are the sound measures."
        ),
        "layers": layers,
        "skipped": skipped,
    }


def format_srdd(report: dict) -> str:
    """A text table of the per-block numbers, the flagged blocks and the recommendation."""
    summary = report["summary"]
    lines = [
        f"SRDD {report['format']}: {len(report['blocks'])} blocks, {summary['num_layers']} layers; threshold "
        f"{100 * report['threshold']:.3f} % ({report['threshold_source']})",
        f"  model-wide: relF {100 * summary['rel_frobenius']:.3f} %  SQNR {summary['sqnr_db']:.2f} dB  deadzone "
        f"{100 * summary['deadzone']:.3f} %  elementwise |dw|/|w| {100 * summary['elementwise_rel']:.2f} %",
        f"  {'block':>5} {'rank':>4} {'relF %':>8} {'SQNR dB':>8} {'dead %':>8} {'|dw|/|w| %':>10}  flagged",
    ]
    for entry in report["blocks"]:
        lines.append(
            f"  {entry['block']:>5} {entry['rank']:>4} {100 * entry['rel_frobenius']:8.3f} {entry['sqnr_db']:8.2f} "
            f"{100 * entry['deadzone']:8.3f} {100 * entry['elementwise_rel']:10.2f}  {'*' if entry['flagged'] else ''}"
        )
    lines.append(f"  {report['recommendation']}")
    return "\n".join(lines)


def plot_srdd(report: dict, path: str) -> None:
    """Two panels per block: relative Frobenius error with the threshold line (flagged blocks highlighted), and
    deadzone beside the seeds' element-wise |dw|/|w|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = report["blocks"]
    index = [entry["block"] for entry in blocks]
    rel = [100 * entry["rel_frobenius"] for entry in blocks]
    colors = ["tab:red" if entry["flagged"] else "tab:blue" for entry in blocks]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.32 * len(blocks) + 3), 6.5), sharex=True)
    top.bar(index, rel, color=colors)
    top.axhline(100 * report["threshold"], color="black", linestyle="--", linewidth=1)
    top.text(
        index[-1] + 0.5,
        100 * report["threshold"],
        f" threshold {100 * report['threshold']:.2f} %",
        va="bottom",
        ha="right",
        fontsize=8,
    )
    gaussian = report.get("gaussian_reference")
    if gaussian is not None:
        top.axhline(100 * gaussian, color="gray", linestyle=":", linewidth=1)
        top.text(index[0] - 0.5, 100 * gaussian, " Gaussian weights", va="bottom", ha="left", fontsize=8, color="gray")
    values = rel + [100 * report["threshold"]] + ([100 * gaussian] if gaussian is not None else [])
    low, high = min(values), max(values)
    top.set_ylim(max(0.0, low - 0.25 * (high - low) - 0.2), high + 0.15 * (high - low) + 0.1)
    top.set_ylabel("relative Frobenius error (%)\n(axis does not start at 0)")
    model = os.path.basename(str(report.get("model", "")).rstrip("/")) or "model"
    top.set_title(
        f"SRDD {report['format']} on {model}: {len(report['flagged_blocks'])}/{len(blocks)} blocks flagged (red)"
    )
    top.grid(axis="y", alpha=0.3)
    width = 0.4
    bottom.bar([i - width / 2 for i in index], [100 * e["deadzone"] for e in blocks], width, label="deadzone")
    bottom.bar(
        [i + width / 2 for i in index],
        [100 * e["elementwise_rel"] for e in blocks],
        width,
        label="element-wise mean |dw|/|w| (seeds' metric, inflated by small weights)",
    )
    bottom.set_ylabel("share of non-zero weights / mean ratio (%)")
    bottom.set_xlabel("transformer block index")
    bottom.set_ylim(0, 1.35 * max(100 * e["elementwise_rel"] for e in blocks))
    bottom.legend(fontsize=8, loc="upper left")
    bottom.grid(axis="y", alpha=0.3)
    bottom.set_xticks(index)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class SRDDArguments:
    """Arguments of `python -m qerl_repro.srdd`."""

    model: str = field(
        default="smollm2",
        metadata={"help": "Checkpoint path (or Hub id), or 'smollm2' for the embedded default model."},
    )
    format: str = field(default="nvfp4", metadata={"help": "4-bit format: 'nvfp4', 'mxfp4' or 'nf4'."})
    threshold: float | None = field(
        default=None,
        metadata={
            "help": "Flag blocks whose relative Frobenius error exceeds this (e.g. 0.1); default: threshold_margin x "
            "the format's error on Gaussian weights."
        },
    )
    threshold_margin: float = field(
        default=DEFAULT_THRESHOLD_MARGIN,
        metadata={"help": "Default threshold = this factor x the format's error on i.i.d. Gaussian weights."},
    )
    mxfp4_scale_mode: str = field(
        default=DEFAULT_MXFP4_SCALE_MODE, metadata={"help": "MXFP4 only: 'floor', 'even' or 'rceil'."}
    )
    dtype: str = field(default="bfloat16", metadata={"help": "Dtype the weights are loaded in before quantization."})
    output: str | None = field(default=None, metadata={"help": "Where to write the JSON report."})
    plot: str | None = field(
        default=None, metadata={"help": "Where to write the PNG bar plot; default: the output path with .png."}
    )


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForCausalLM, HfArgumentParser

    (args,) = HfArgumentParser(SRDDArguments).parse_args_into_dataclasses(args=argv)
    if args.format not in SRDD_FORMATS:
        raise UserError(f"--format {args.format!r} is not one of: {', '.join(SRDD_FORMATS)}.")
    path = resolve_model_path(args.model)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    report = srdd_scan(
        model,
        args.format,
        threshold=args.threshold,
        threshold_margin=args.threshold_margin,
        mxfp4_scale_mode=args.mxfp4_scale_mode,
    )
    report["model"] = path if args.model.lower() not in ("smollm2", "default") else "smollm2 (embedded SmolLM2-135M)"
    report["dtype"] = args.dtype
    report["seconds"] = round(time.perf_counter() - start, 2)
    sys.stdout.write(format_srdd(report) + "\n")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
        sys.stdout.write(f"report written to {args.output}\n")
    plot = args.plot or (os.path.splitext(args.output)[0] + ".png" if args.output else None)
    if plot:
        plot_srdd(report, plot)
        sys.stdout.write(f"plot written to {plot}\n")
    return report


if __name__ == "__main__":
    from qerl_repro.errors import run_cli

    run_cli(main)
