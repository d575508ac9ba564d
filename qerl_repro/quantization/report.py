# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Quantization error report: how much NVFP4 / MXFP4 changes each Linear layer of a model.

    python -m qerl_repro.quantization.report --model smollm2 --format nvfp4 --output runs/quant_report/nvfp4.json

For every Linear layer that `quantize_model_` would quantize (same selection, same shared NVFP4 per-tensor scales for
q/k/v and gate/up, same MXFP4 scale mode) it computes the weight error of `fake_quantize`:

- `rel_frobenius`: ||W - Q(W)||_F / ||W||_F;
- `sqnr_db`: -20 log10(rel_frobenius);
- `deadzone`: the share of the non-zero weights that quantize to exactly 0 (the "deadzone" SRDD scans for).

Aggregates weight each layer by its size: model-wide and per transformer block, `rel_frobenius` is
sqrt(sum ||W - Q(W)||^2 / sum ||W||^2) and `deadzone` is (sum zeroed) / (sum non-zero). The JSON keeps the raw sums
(`sum_sq_weight`, `sum_sq_error`, `num_nonzero`, `num_zeroed`) so later scans can re-aggregate (by block, by projection
type, ...) without recomputing, plus rankings of layer names by deadzone and by error for SRDD-style selection.
`--model smollm2` resolves to the embedded default checkpoint (`qerl_repro.models.ensure_default_model`).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from qerl_repro.quantization.base import fp4_quantization_plan
from qerl_repro.quantization.formats import DEFAULT_MXFP4_SCALE_MODE, FP4_FORMATS, fake_quantize


__all__ = ["QuantReportArguments", "layer_error_stats", "main", "quantization_error_report"]

REPORT_VERSION = 1
_BLOCK_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)(?:\.|$)")


def _block_index(name: str) -> int | None:
    match = _BLOCK_PATTERN.search(name)
    return int(match.group(1)) if match else None


def _kind(name: str) -> str:
    """The layer's role inside its block, e.g. "self_attn.q_proj" (the full name for layers outside blocks)."""
    match = _BLOCK_PATTERN.search(name)
    return name[match.end() :] if match and match.end() < len(name) else name


def _rel(sum_sq_error: float, sum_sq_weight: float) -> float:
    return math.sqrt(sum_sq_error / sum_sq_weight) if sum_sq_weight > 0 else float("nan")


def _sqnr(rel: float) -> float:
    if math.isnan(rel):
        return float("nan")
    return math.inf if rel == 0 else -20.0 * math.log10(rel)


@torch.no_grad()
def layer_error_stats(weight: torch.Tensor, weight_hat: torch.Tensor) -> dict:
    """Error sums (float64) and metrics of one quantized weight: the per-layer entry of the report."""
    w = weight.detach().double()
    diff = w - weight_hat.detach().double()
    sum_sq_weight = float(w.square().sum())
    sum_sq_error = float(diff.square().sum())
    nonzero = w != 0
    num_nonzero = int(nonzero.sum())
    num_zeroed = int((nonzero & (weight_hat == 0)).sum())
    return _metrics_from_sums(sum_sq_weight, sum_sq_error, num_nonzero, num_zeroed)


def _metrics_from_sums(sum_sq_weight: float, sum_sq_error: float, num_nonzero: int, num_zeroed: int) -> dict:
    """Relative Frobenius error, SQNR and deadzone from the error sums (of one layer or summed over layers)."""
    rel = _rel(sum_sq_error, sum_sq_weight)
    return {
        "rel_frobenius": rel,
        "sqnr_db": _sqnr(rel),
        "deadzone": num_zeroed / num_nonzero if num_nonzero else float("nan"),
        "sum_sq_weight": sum_sq_weight,
        "sum_sq_error": sum_sq_error,
        "num_nonzero": num_nonzero,
        "num_zeroed": num_zeroed,
    }


def _aggregate(layers: list[dict]) -> dict:
    sums = {
        key: sum(layer[key] for layer in layers)
        for key in ("sum_sq_weight", "sum_sq_error", "num_nonzero", "num_zeroed")
    }
    return {
        "num_layers": len(layers),
        "num_params": sum(layer["numel"] for layer in layers),
        **_metrics_from_sums(**sums),
    }


@torch.no_grad()
def quantization_error_report(
    model: nn.Module,
    fmt: str,
    *,
    mxfp4_scale_mode: str = DEFAULT_MXFP4_SCALE_MODE,
    skip_modules=("lm_head",),
    top_k: int = 5,
) -> dict:
    """Per-layer, per-block and model-wide FP4 weight error of `model` (left unchanged); see the module docstring.

    Returns a JSON-serialisable dict with keys `version`, `format`, `mxfp4_scale_mode`, `summary` (model-wide
    aggregate plus `worst_layers`, the `top_k` layers with the highest relative error), `layers` (one entry per
    layer: `name`, `block`, `kind`, `shape`, `numel`, `per_tensor_scale`, the metrics and the raw sums), `blocks`
    (aggregate per transformer block), `kinds` (aggregate per projection type, e.g. "mlp.down_proj"), `ranking`
    (layer names sorted by `deadzone` and by `rel_frobenius`, worst first) and `skipped`.
    """
    if fmt not in FP4_FORMATS:
        raise ValueError(f"Unknown format {fmt!r}; valid formats are: {', '.join(FP4_FORMATS)}.")
    plan = fp4_quantization_plan(model, fmt, skip_modules=skip_modules)
    layers = []
    for name in plan.targets:
        weight = model.get_submodule(name).weight.detach()
        pts = plan.per_tensor_scales[name]
        weight_hat = fake_quantize(
            weight, fmt, per_tensor_scale=pts, mxfp4_scale_mode=mxfp4_scale_mode, name=f"{name}.weight"
        )
        entry = {
            "name": name,
            "block": _block_index(name),
            "kind": _kind(name),
            "shape": list(weight.shape),
            "numel": weight.numel(),
            "per_tensor_scale": float(pts) if pts is not None else None,
        }
        entry.update(layer_error_stats(weight, weight_hat))
        layers.append(entry)
    if not layers:
        raise ValueError("No Linear layer to quantize in the model (all skipped?).")

    blocks, kinds = {}, {}
    for layer in layers:
        if layer["block"] is not None:
            blocks.setdefault(layer["block"], []).append(layer)
        kinds.setdefault(layer["kind"], []).append(layer)
    by_rel = sorted(layers, key=lambda layer: layer["rel_frobenius"], reverse=True)
    by_deadzone = sorted(layers, key=lambda layer: layer["deadzone"], reverse=True)
    summary = _aggregate(layers)
    summary["worst_layers"] = [
        {key: layer[key] for key in ("name", "rel_frobenius", "sqnr_db", "deadzone")} for layer in by_rel[:top_k]
    ]
    return {
        "version": REPORT_VERSION,
        "format": fmt,
        "mxfp4_scale_mode": mxfp4_scale_mode if fmt == "mxfp4" else None,
        "shared_scale_groups": plan.shared_scale_groups,
        "summary": summary,
        "layers": layers,
        "blocks": [{"block": index, **_aggregate(members)} for index, members in sorted(blocks.items())],
        "kinds": {kind: _aggregate(members) for kind, members in kinds.items()},
        "ranking": {
            "by_deadzone": [layer["name"] for layer in by_deadzone],
            "by_rel_frobenius": [layer["name"] for layer in by_rel],
        },
        "skipped": plan.skipped,
    }


def format_summary(report: dict) -> str:
    """A short text table: model-wide numbers, per-kind numbers and the worst layers."""
    summary = report["summary"]
    mode = f" ({report['mxfp4_scale_mode']})" if report.get("mxfp4_scale_mode") else ""
    lines = [
        f"{report['format']}{mode}: {summary['num_layers']} layers, {summary['num_params']:,} weights",
        f"  model-wide (size-weighted): relF {100 * summary['rel_frobenius']:.3f} %  "
        f"SQNR {summary['sqnr_db']:.2f} dB  "
        f"deadzone {100 * summary['deadzone']:.3f} %",
        f"  {'kind':<28} {'relF %':>8} {'SQNR dB':>8} {'dead %':>8}",
    ]
    for kind, agg in report["kinds"].items():
        lines.append(
            f"  {kind:<28} {100 * agg['rel_frobenius']:8.3f} {agg['sqnr_db']:8.2f} {100 * agg['deadzone']:8.3f}"
        )
    lines.append(f"  worst {len(summary['worst_layers'])} layers by relF:")
    for layer in summary["worst_layers"]:
        lines.append(
            f"  {layer['name']:<44} {100 * layer['rel_frobenius']:8.3f} {layer['sqnr_db']:8.2f} "
            f"{100 * layer['deadzone']:8.3f}"
        )
    return "\n".join(lines)


@dataclass
class QuantReportArguments:
    """Arguments of `python -m qerl_repro.quantization.report`."""

    model: str = field(
        default="smollm2",
        metadata={"help": "Checkpoint path (or Hub id), or 'smollm2' for the embedded default model."},
    )
    format: str = field(default="nvfp4", metadata={"help": "FP4 format: 'nvfp4' or 'mxfp4'."})
    mxfp4_scale_mode: str = field(
        default=DEFAULT_MXFP4_SCALE_MODE, metadata={"help": "MXFP4 only: 'floor', 'even' or 'rceil'."}
    )
    dtype: str = field(default="bfloat16", metadata={"help": "Dtype the weights are loaded in before quantization."})
    output: str | None = field(default=None, metadata={"help": "Where to write the JSON report."})
    top_k: int = field(default=5, metadata={"help": "How many worst layers the summary lists."})


def resolve_model_path(model: str) -> str:
    """'smollm2' -> the embedded default checkpoint (converted once); a folder or a Hub id is returned unchanged, and
    a path that does not exist is a `UserError` (`qerl_repro.models.check_model_name_or_path`)."""
    from qerl_repro.models import check_model_name_or_path, ensure_default_model

    if model.lower() in ("smollm2", "default"):
        return ensure_default_model()
    check_model_name_or_path(model)
    return model


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForCausalLM, HfArgumentParser

    (args,) = HfArgumentParser(QuantReportArguments).parse_args_into_dataclasses(args=argv)
    path = resolve_model_path(args.model)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    report = quantization_error_report(model, args.format, mxfp4_scale_mode=args.mxfp4_scale_mode, top_k=args.top_k)
    report["model"] = path
    report["dtype"] = args.dtype
    report["seconds"] = round(time.perf_counter() - start, 2)
    print(format_summary(report))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
        print(f"report written to {args.output}")
    return report


if __name__ == "__main__":
    from qerl_repro.errors import run_cli

    run_cli(main)
