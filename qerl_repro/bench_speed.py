# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Speed benchmarks of the 4-bit base where users wait (registered into `qerl_repro.bench`, run by `make bench`):

- `lora_step_speed`: one LoRA micro-step (forward + backward, r=32 on every Linear, bf16 autocast, batch 2 x 128) on
  SmolLM2-135M with an NVFP4 base vs a bf16 base: both models in one process, steps alternated, medians over repeats;
  plus the peak RSS of the same micro-step for each base, each in a fresh subprocess.

`profile_lora_step` breaks one micro-step of each base down with `torch.profiler` (forward vs backward, FP4
dequantization vs matmul vs attention vs copies/casts vs allocation) and writes it as a Markdown table:

    python -m qerl_repro.bench_speed --output results/profile_lora_step_after.md
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time

import torch

from qerl_repro.bench import register_bench, run_in_subprocess


LORA_STEP_BATCH = (2, 128)  # the micro-batch of issue 12's measurement
BASES = ("none", "nvfp4")  # "none": the bf16 base
DEQUANT_RANGE = "fp4_dequantize"


def build_lora_model(model_path: str, quant_format: str):
    """SmolLM2 from `model_path` in bf16, with `quant_format`'s base and LoRA r=32 (QeRL) on every Linear, train mode."""
    from peft import LoraConfig, get_peft_model

    from qerl_repro.quantization.base import load_base_model

    model = load_base_model(model_path, quant_format, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules="all-linear"))
    model.train()
    return model


def micro_step_inputs(vocab_size: int, batch: tuple[int, int] = LORA_STEP_BATCH) -> torch.Tensor:
    return torch.randint(0, vocab_size, batch, generator=torch.Generator().manual_seed(0))


def lora_micro_step(model, input_ids: torch.Tensor) -> tuple[float, float]:
    """One forward (bf16 autocast, as `bf16=True` training runs) + backward; returns (forward_s, backward_s)."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    middle = time.perf_counter()
    loss.backward()
    end = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return middle - start, end - middle


def lora_step_peak_rss_autocast(quant_format: str, model_path: str) -> dict:
    """Peak RSS of one `lora_micro_step` on `quant_format`'s base (fresh process; see `bench.lora_step_peak_rss`)."""
    from qerl_repro.bench import lora_step_peak_rss

    return lora_step_peak_rss(quant_format, model_path, *LORA_STEP_BATCH, autocast_bf16=True)


@register_bench("lora_step_speed")
def lora_step_speed(repeats: int = 7) -> dict:
    """NVFP4-base / bf16-base LoRA micro-step time (one process, alternated, medians) and peak RSS (subprocesses)."""
    from qerl_repro.models import ensure_default_model

    path = ensure_default_model()
    # The RSS workers first, while this process is small (see `bench.lora_step_peak_rss` on ru_maxrss).
    rss = {fmt: run_in_subprocess(__name__, "lora_step_peak_rss_autocast", fmt, path) for fmt in BASES}
    models = {fmt: build_lora_model(path, fmt) for fmt in BASES}
    input_ids = micro_step_inputs(models["none"].config.vocab_size)
    for model in models.values():
        lora_micro_step(model, input_ids)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {fmt: [] for fmt in BASES}
    for _ in range(repeats):  # alternate, so that drifting machine load hits both alike
        for fmt, model in models.items():
            times[fmt].append(lora_micro_step(model, input_ids))
    results: dict = {
        "model": "SmolLM2-135M-Instruct",
        "batch": list(LORA_STEP_BATCH),
        "compute": "bf16 autocast, LoRA r=32 all-linear",
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }
    for fmt in BASES:
        label = "bf16" if fmt == "none" else fmt
        results[f"{label}_step_s_median"] = statistics.median(f + b for f, b in times[fmt])
        results[f"{label}_forward_s_median"] = statistics.median(f for f, _ in times[fmt])
        results[f"{label}_backward_s_median"] = statistics.median(b for _, b in times[fmt])
        results[f"{label}_peak_rss_step_mib"] = rss[fmt]["peak_rss_step_mib"]
    results["step_time_ratio_nvfp4_vs_bf16"] = results["nvfp4_step_s_median"] / results["bf16_step_s_median"]
    results["peak_rss_ratio_nvfp4_vs_bf16"] = results["nvfp4_peak_rss_step_mib"] / results["bf16_peak_rss_step_mib"]
    results["checks"] = {
        "step_time_ratio<=1.25": results["step_time_ratio_nvfp4_vs_bf16"] <= 1.25,
        "nvfp4_peak_rss<=bf16": results["peak_rss_ratio_nvfp4_vs_bf16"] <= 1.0,
    }
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _dequantize_marked():
    """Wrap `FP4Linear._weight_as` (the per-forward/backward dequantization) in a profiler range, for this block."""
    from qerl_repro.quantization.linear import FP4Linear

    original = FP4Linear._weight_as

    def marked(self, dtype):
        with torch.profiler.record_function(DEQUANT_RANGE):
            return original(self, dtype)

    FP4Linear._weight_as = marked
    try:
        yield
    finally:
        FP4Linear._weight_as = original


_CATEGORIES = (
    ("matmul", ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")),
    (
        "attention (sdpa)",
        (
            "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
        ),
    ),
    ("copies and casts", ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous")),
    (
        "allocation and fill",
        (
            "aten::empty",
            "aten::empty_strided",
            "aten::empty_like",
            "aten::zeros",
            "aten::fill_",
            "aten::zero_",
            "aten::resize_",
        ),
    ),
    ("elementwise mul/add", ("aten::mul", "aten::add", "aten::add_", "aten::mul_", "aten::div")),
    ("gather (index_select/embedding)", ("aten::index_select", "aten::embedding", "aten::index")),
)


_LABELS = tuple(label for label, _ in _CATEGORIES) + ("other",)


def _inside(event, name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def profile_breakdown(model, input_ids: torch.Tensor) -> dict:
    """Self CPU ms of one profiled micro-step per category, split by inside / outside FP4 dequantization."""
    from torch.profiler import ProfilerActivity, profile

    with _dequantize_marked(), profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("forward"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=input_ids, labels=input_ids).loss
        with torch.profiler.record_function("backward"):
            loss.backward()
    model.zero_grad(set_to_none=True)
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    result: dict[str, float] = {
        "forward (inclusive)": sum(e.cpu_time_total for e in events if e.name == "forward") / 1000,
        "backward (inclusive)": sum(e.cpu_time_total for e in events if e.name == "backward") / 1000,
        "fp4 dequantize in forward (inclusive)": 0.0,
        "fp4 dequantize in backward (inclusive)": 0.0,
    }
    dequant_calls = 0
    for event in events:
        if event.name == DEQUANT_RANGE:
            dequant_calls += 1
            phase = "forward" if _inside(event, "forward") else "backward"
            result[f"fp4 dequantize in {phase} (inclusive)"] += event.cpu_time_total / 1000
    rows = {f"{where}: {label}": 0.0 for where in ("outside dequantize", "inside dequantize") for label in _LABELS}
    for event in events:
        if event.name in (DEQUANT_RANGE, "forward", "backward"):
            continue
        where = "inside dequantize" if _inside(event, DEQUANT_RANGE) else "outside dequantize"
        label = next((label for label, names in _CATEGORIES if event.name in names), "other")
        rows[f"{where}: {label}"] += event.self_cpu_time_total / 1000
    result["profiled step (sum of self times)"] = sum(rows.values())
    result.update(rows)
    result = {f"{key} ms": value for key, value in result.items()}
    result["fp4 dequantize calls"] = dequant_calls
    return result


def profile_lora_step(repeats: int = 3) -> dict:
    """Profile of one micro-step per base, plus unprofiled medians of alternated steps (forward, backward, total)."""
    from qerl_repro.models import ensure_default_model

    path = ensure_default_model()
    models = {fmt: build_lora_model(path, fmt) for fmt in BASES}
    input_ids = micro_step_inputs(models["none"].config.vocab_size)
    for model in models.values():
        lora_micro_step(model, input_ids)
    times: dict[str, list[tuple[float, float]]] = {fmt: [] for fmt in BASES}
    for _ in range(repeats):
        for fmt, model in models.items():
            times[fmt].append(lora_micro_step(model, input_ids))
    result: dict = {"batch": list(LORA_STEP_BATCH), "threads": torch.get_num_threads(), "repeats": repeats}
    for fmt, model in models.items():
        result[fmt] = {
            "timed step (median) ms": 1000 * statistics.median(f + b for f, b in times[fmt]),
            "timed forward (median) ms": 1000 * statistics.median(f for f, _ in times[fmt]),
            "timed backward (median) ms": 1000 * statistics.median(b for _, b in times[fmt]),
            **profile_breakdown(model, input_ids),
        }
    return result


def profile_markdown(result: dict, title: str) -> str:
    """The profile as a Markdown table: one row per quantity, columns bf16 base, NVFP4 base, difference."""
    bf16, nvfp4 = result["none"], result["nvfp4"]
    lines = [
        f"# {title}",
        "",
        f"One LoRA micro-step (r=32 all-linear, bf16 autocast, batch {result['batch'][0]} x {result['batch'][1]}) on "
        f"SmolLM2-135M, {result['threads']} torch thread(s), machine loaded by other jobs. `timed` rows: medians of "
        f"{result['repeats']} alternated unprofiled steps. Other rows: self CPU ms of one profiled step "
        "(torch.profiler, which adds overhead); the `fp4 dequantize` rows are inclusive times of the dequantization "
        "in `FP4Linear` (forward and backward); the category rows split the self times of all ops into those inside "
        "and outside that dequantization.",
        "",
        "| quantity | bf16 base | NVFP4 base | NVFP4 - bf16 |",
        "|---|---:|---:|---:|",
    ]
    for key in nvfp4:
        a, b = bf16.get(key, 0.0), nvfp4[key]
        lines.append(f"| {key} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    ratio = nvfp4["timed step (median) ms"] / bf16["timed step (median) ms"]
    lines += ["", f"Timed step ratio NVFP4 / bf16: {ratio:.3f}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Profile one LoRA micro-step on an NVFP4 vs a bf16 base.")
    parser.add_argument("--output", required=True, help="Markdown file to write (a .json twin is written too).")
    parser.add_argument("--title", default="Profile of one LoRA micro-step, NVFP4 base vs bf16 base")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = profile_lora_step(args.repeats)
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    text = profile_markdown(result, args.title)
    with open(args.output, "w") as f:
        f.write(text)
    with open(args.output.removesuffix(".md") + ".json", "w") as f:
        json.dump(result, f, indent=2)
    print(text)  # noqa: T201


if __name__ == "__main__":
    main(sys.argv[1:])
