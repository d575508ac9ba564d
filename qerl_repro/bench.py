# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Benchmarks behind `make bench`: a registry of named bench functions, each returning a dict of results.

    python -m qerl_repro.bench --output results/bench.json                 # every registered bench
    python -m qerl_repro.bench --only gaussian_error,fake_quantize_speed   # a selection

Results are printed as a table and merged into the JSON file by bench name (entries of benches not run are kept), so
other modules can register more benches with `@register_bench("name")`.

Quantization benches:

- `gaussian_error`: relative Frobenius error of NVFP4 and MXFP4 (floor / even / rceil) on a 4096x4096 Gaussian bf16
  matrix, and on 16 * W (must be identical: NVFP4 without its FP32 per-tensor scale is not; DESIGN trap 6).
- `smollm2_memory`: bytes held by SmolLM2-135M's Linear weights in NVFP4 / MXFP4 / NF4 vs bf16, and the peak RSS of
  one LoRA forward+backward step on an NVFP4 vs a bf16 base, each in a fresh subprocess.
- `fake_quantize_speed`: elements/s of `qerl_repro.quantization.fake_quantize` vs torchao's reference
  (quantize + dequantize) on a 4096x4096 bf16 tensor, medians over repeats (target: >= 10x, bit-identical).
- `dequantize_speed`: `FP4Linear`'s per-forward NVFP4 dequantization (pre-scaled byte table vs nibble decode) on
  SmolLM2's largest Linear shape, and its share of that layer's forward+backward on a demo micro-batch.

`qerl_repro.bench_speed` adds `lora_step_speed` (LoRA micro-step time and peak RSS, NVFP4 base vs bf16 base).
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


BENCHES: dict[str, Callable[[], dict]] = {}
# Other modules that register benches with `@register_bench`; imported by the CLI when they exist.
BENCH_MODULES = ("qerl_repro.bench_trainer", "qerl_repro.bench_speed")


def register_bench(name: str):
    """Decorator: register `fn() -> dict` under `name` (results must be JSON-serialisable)."""

    def decorator(fn):
        if name in BENCHES:
            raise ValueError(f"bench {name!r} is already registered")
        BENCHES[name] = fn
        return fn

    return decorator


def _gaussian_bf16(n: int = 4096, sigma: float = 0.02, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, n, generator=generator) * sigma).to(torch.bfloat16)  # rounded to bf16 like a checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# gaussian_error
# ---------------------------------------------------------------------------------------------------------------------


@register_bench("gaussian_error")
def gaussian_error(n: int = 4096) -> dict:
    """NVFP4 / MXFP4 error on N(0, 0.02^2) n x n bf16, and invariance to scaling the weights by 16."""
    from qerl_repro.quantization.formats import deadzone_fraction, fake_quantize, relative_frobenius_error, sqnr_db

    weight = _gaussian_bf16(n)
    recipes = {
        "nvfp4": {"fmt": "nvfp4"},
        "mxfp4_floor": {"fmt": "mxfp4", "mxfp4_scale_mode": "floor"},
        "mxfp4_even": {"fmt": "mxfp4", "mxfp4_scale_mode": "even"},
        "mxfp4_rceil": {"fmt": "mxfp4", "mxfp4_scale_mode": "rceil"},
    }
    results: dict = {"shape": list(weight.shape), "sigma": 0.02, "dtype": "bfloat16"}
    for label, kwargs in recipes.items():
        w_hat = fake_quantize(weight, **kwargs)
        rel = relative_frobenius_error(weight, w_hat)
        scaled = weight * 16  # exact in bf16
        rel_16 = relative_frobenius_error(scaled, fake_quantize(scaled, **kwargs))
        results[label] = {
            "rel_frobenius_pct": 100 * rel,
            "sqnr_db": sqnr_db(weight, w_hat),
            "deadzone_pct": 100 * deadzone_fraction(weight, w_hat),
            "rel_frobenius_16x_pct": 100 * rel_16,
            "invariant_16x": rel_16 == rel,
        }
        del w_hat
    results["checks"] = {
        "nvfp4_9.5+-0.1": abs(results["nvfp4"]["rel_frobenius_pct"] - 9.5) <= 0.1,
        "mxfp4_floor_11.4+-0.2": abs(results["mxfp4_floor"]["rel_frobenius_pct"] - 11.4) <= 0.2,
        "all_invariant_16x": all(results[label]["invariant_16x"] for label in recipes),
    }
    return results


# ---------------------------------------------------------------------------------------------------------------------
# smollm2_memory
# ---------------------------------------------------------------------------------------------------------------------


def _rss_kb() -> tuple[int, int]:
    """(current VmRSS, peak VmHWM) in KiB from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split()[:2]
                values[key] = int(value)
    return values["VmRSS:"], values["VmHWM:"]


def _reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter VmHWM (Linux `clear_refs` 5); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Give freed heap memory back to the OS (glibc `malloc_trim`), so RSS reflects live memory only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def lora_step_peak_rss(
    quant_format: str, model_path: str, batch_size: int = 1, seq_len: int = 64, autocast_bf16: bool = False
) -> dict:
    """Peak RSS (MiB) of one LoRA (r=32, all-linear) forward+backward step on `quant_format` ("none" or "nvfp4", ...),
    the forward under bf16 autocast if `autocast_bf16`.

    One warm-up step runs first (gradients then freed), so the measured step is a steady-state training step.

    Meant to run in a fresh process (see `smollm2_memory`). Loading and quantizing go through the bf16 weights and
    leave freed temporaries in the heap, so after the model is built the freed heap is returned to the OS
    (`malloc_trim`) and the peak counter VmHWM is reset (`clear_refs`); `peak_rss_step_mib` is then the peak of the
    step alone: resident model + activations + gradients + the Python/torch runtime. The peak is read from VmHWM and
    from `getrusage().ru_maxrss` (both reset by `clear_refs`); they agree unless the parent process was larger than
    the step peak when it started this one (Linux keeps `ru_maxrss` across fork + `execve`, so it never drops below
    the parent's RSS at fork time), which is why `smollm2_memory` starts its workers before loading any model.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from qerl_repro.quantization.base import load_base_model

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(model_path))]  # import the model code: runtime RSS
    gc.collect()
    _release_free_heap()
    rss_runtime_kb = _rss_kb()[0]
    model = load_base_model(model_path, quant_format, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules="all-linear"))  # QeRL: r 32
    model.train()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16)
    start = time.perf_counter()
    with autocast:
        warm_up_loss = model(input_ids=input_ids, labels=input_ids).loss
    warm_up_loss.backward()  # warm-up: the first step is 10-100x slower
    del warm_up_loss
    first_step_seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    gc.collect()
    _release_free_heap()
    rss_model_kb, load_peak_kb = _rss_kb()
    reset = _reset_peak_rss() and _rss_kb()[1] <= rss_model_kb + 1024
    start = time.perf_counter()
    with autocast:
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    step_seconds = time.perf_counter() - start
    step_peak_kb = _rss_kb()[1]
    return {
        "quant_format": quant_format,
        "batch": [batch_size, seq_len],
        "autocast_bf16": autocast_bf16,
        "loss": float(loss),
        "peak_reset_ok": reset,
        "rss_runtime_mib": rss_runtime_kb / 1024,
        "rss_model_loaded_mib": rss_model_kb / 1024,
        "peak_rss_load_mib": load_peak_kb / 1024,
        "peak_rss_step_mib": step_peak_kb / 1024 if reset else float("nan"),
        "ru_maxrss_step_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_step_seconds": first_step_seconds,
        "step_seconds": step_seconds,
    }


def run_in_subprocess(module: str, function: str, *args) -> dict:
    """`module.function(*args)` in a fresh Python process (its own memory: a vLLM engine or a clean peak RSS); the
    function returns a JSON-serialisable dict."""
    code = (
        f"import json; from {module} import {function}; "
        f"print('QERL_BENCH_RESULT=' + json.dumps({function}(*{args!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("QERL_BENCH_RESULT="):
            return json.loads(line.removeprefix("QERL_BENCH_RESULT="))
    raise RuntimeError(f"bench worker {function}{args} failed:\n{proc.stderr[-3000:]}")


def _run_worker(quant_format: str, model_path: str) -> dict:
    return run_in_subprocess("qerl_repro.bench", "lora_step_peak_rss", quant_format, model_path)


@register_bench("smollm2_memory")
def smollm2_memory() -> dict:
    """Linear weight bytes of SmolLM2-135M per format, and peak RSS of a LoRA step on NVFP4 vs bf16 (subprocesses)."""
    from transformers import AutoModelForCausalLM

    from qerl_repro.models import ensure_default_model
    from qerl_repro.quantization.base import linear_weight_bytes, load_base_model, quantize_model_

    path = ensure_default_model()
    # The LoRA-step workers first, while this process is small (see `lora_step_peak_rss` on ru_maxrss).
    steps = {fmt: _run_worker(fmt, path) for fmt in ("none", "nvfp4")}
    skip = ("lm_head",)  # SmolLM2 ties lm_head to the embeddings: not a quantized Linear
    results: dict = {"model": "SmolLM2-135M-Instruct", "counted": "Linear weights except lm_head, scales included"}
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    bf16_bytes = linear_weight_bytes(bf16, skip)
    results["linear_bytes_bf16"] = bf16_bytes
    for fmt in ("nvfp4", "mxfp4"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16) if fmt != "nvfp4" else bf16
        quantize_model_(model, fmt)
        results[f"linear_bytes_{fmt}"] = linear_weight_bytes(model, skip)
        results[f"ratio_{fmt}_vs_bf16"] = results[f"linear_bytes_{fmt}"] / bf16_bytes
        del model
    del bf16
    nf4 = load_base_model(path, "nf4", dtype=torch.bfloat16)
    results["linear_bytes_nf4"] = linear_weight_bytes(nf4, skip)
    results["ratio_nf4_vs_bf16"] = results["linear_bytes_nf4"] / bf16_bytes
    del nf4
    gc.collect()

    results["lora_step_bf16"] = steps["none"]
    results["lora_step_nvfp4"] = steps["nvfp4"]
    results["peak_rss_step_ratio_nvfp4_vs_bf16"] = (
        steps["nvfp4"]["peak_rss_step_mib"] / steps["none"]["peak_rss_step_mib"]
    )
    above_runtime = {fmt: s["peak_rss_step_mib"] - s["rss_runtime_mib"] for fmt, s in steps.items()}
    results["peak_rss_step_above_runtime_ratio_nvfp4_vs_bf16"] = above_runtime["nvfp4"] / above_runtime["none"]
    results["checks"] = {"nvfp4_linear_bytes_<=0.30x": results["ratio_nvfp4_vs_bf16"] <= 0.30}
    return results


# ---------------------------------------------------------------------------------------------------------------------
# fake_quantize_speed
# ---------------------------------------------------------------------------------------------------------------------


def _median_seconds(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _alternated_median_seconds(fns, repeats: int) -> list[tuple[float, torch.Tensor]]:
    """Like `_median_seconds` for several functions, timed in turn in each repeat (drifting machine load hits all)."""
    outs = [fn() for fn in fns]  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [(statistics.median(t), out) for t, out in zip(times, outs)]


@register_bench("fake_quantize_speed")
def fake_quantize_speed(repeats: int = 5) -> dict:
    """Elements/s of our `fake_quantize` vs torchao's quantize+dequantize (same recipe, same bf16 4096x4096)."""
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    from qerl_repro.quantization.formats import fake_quantize

    x = _gaussian_bf16()
    numel = x.numel()
    cases = {
        "nvfp4": (
            lambda: fake_quantize(x, "nvfp4"),
            lambda: NVFP4Tensor.to_nvfp4(x, 16, per_tensor_amax_to_scale(x.abs().amax())).dequantize(x.dtype),
        ),
        "mxfp4_even": (
            lambda: fake_quantize(x, "mxfp4", mxfp4_scale_mode="even"),
            lambda: MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32, scaling_mode=ScaleCalculationMode.EVEN).dequantize(
                x.dtype
            ),
        ),
    }
    results: dict = {
        "shape": list(x.shape),
        "dtype": "bfloat16",
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }
    for label, (ours, reference) in cases.items():
        (ours_s, ours_out), (ref_s, ref_out) = _alternated_median_seconds((ours, reference), repeats)
        results[label] = {
            "ours_median_s": ours_s,
            "torchao_median_s": ref_s,
            "ours_elements_per_s": numel / ours_s,
            "torchao_elements_per_s": numel / ref_s,
            "speed_ratio_ours_vs_torchao": ref_s / ours_s,
            "outputs_bit_identical": bool(torch.equal(ours_out, ref_out)),
        }
    results["checks"] = {
        **{f"{label}_ours>=10x_torchao": results[label]["speed_ratio_ours_vs_torchao"] >= 10 for label in cases},
        **{f"{label}_bit_identical": results[label]["outputs_bit_identical"] for label in cases},
    }
    return results


@register_bench("dequantize_speed")
def dequantize_speed(repeats: int = 11) -> dict:
    """`FP4Linear`'s per-forward dequantization (`formats.dequantize`: pre-scaled packed-byte table) vs nibble decode.

    On SmolLM2's largest Linear shape (1536 x 576, bf16, NVFP4), and its share of one LoRA-free forward+backward of a
    batch of 8 x 330 tokens (a demo micro-batch) through that layer.
    """
    from qerl_repro.quantization import formats
    from qerl_repro.quantization.linear import FP4Linear

    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(576, 1536, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(0.02 * torch.randn(linear.weight.shape, generator=generator))
    layer = FP4Linear.from_linear(linear, "nvfp4")
    q = layer.quantized

    def nibble_path():
        values = formats.e2m1_decode(formats.unpack_fp4(q.packed)).reshape(1536, 576 // 16, 16)
        return formats._nvfp4_dequantize_values(values, q.block_scale, q.per_tensor_scale).to(q.dtype).reshape(q.shape)

    table_s, table_out = _median_seconds(lambda: formats.dequantize(q), repeats)
    nibble_s, nibble_out = _median_seconds(nibble_path, repeats)
    x = torch.randn(8 * 330, 576, generator=generator).to(torch.bfloat16).requires_grad_()

    def forward_backward():
        layer(x).sum().backward()
        return x.grad

    step_s, _ = _median_seconds(forward_backward, max(3, repeats // 2))
    return {
        "shape": [1536, 576],
        "dtype": "bfloat16",
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "byte_table_median_s": table_s,
        "nibble_decode_median_s": nibble_s,
        "speed_ratio_table_vs_nibble": nibble_s / table_s,
        "outputs_bit_identical": bool(torch.equal(table_out, nibble_out)),
        "fp4_forward_backward_median_s": step_s,
        "dequant_share_of_forward_backward": 2 * table_s / step_s,  # forward and backward each dequantize once
        "checks": {"table>=nibble": nibble_s >= table_s},
    }


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def _flatten(prefix: str, value, rows: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, rows)
    elif isinstance(value, float):
        rows.append((prefix, f"{value:.6g}"))
    else:
        rows.append((prefix, json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)))


def format_table(results: dict[str, dict]) -> str:
    rows: list[tuple[str, str]] = []
    for name, result in results.items():
        _flatten(name, result, rows)
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def merge_results(path: str, new: dict[str, dict]) -> dict:
    """Merge `new` into the JSON file at `path` by bench name (other benches' entries are kept); returns the merge."""
    merged: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            try:
                merged = json.load(f)
            except json.JSONDecodeError:
                merged = {}
    merged.update(new)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(merged, f, indent=2)
    os.replace(tmp, path)
    return merged


def registered_benches() -> dict[str, Callable[[], dict]]:
    """All benches: this module's and those of `BENCH_MODULES` (imported here).

    Under `python -m qerl_repro.bench` this file runs as `__main__`, while other modules register into the imported
    `qerl_repro.bench`: read that module's registry so both kinds are found.
    """
    module = importlib.import_module("qerl_repro.bench")
    for name in BENCH_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    return module.BENCHES


@dataclass
class BenchArguments:
    """Arguments of `python -m qerl_repro.bench`."""

    output: str | None = field(default="results/bench.json", metadata={"help": "JSON file to merge results into."})
    only: str | None = field(default=None, metadata={"help": "Comma-separated bench names (default: all)."})


def main(argv: list[str] | None = None) -> dict[str, dict]:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses(args=argv)
    benches = registered_benches()
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(benches)
    unknown = [n for n in names if n not in benches]
    if unknown:
        raise ValueError(f"Unknown bench(es) {unknown}; registered: {', '.join(benches)}.")
    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    results = {}
    for name in names:
        start = time.perf_counter()
        result = benches[name]()
        result["meta"] = {**meta, "seconds": round(time.perf_counter() - start, 1)}
        results[name] = result
        print(format_table({name: result}), flush=True)
    if args.output:
        merge_results(args.output, results)
        print(f"results merged into {args.output}")
    return results


if __name__ == "__main__":
    main()
