# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""The quantization error report (per layer, per block, model-wide) and its CLI."""

import json
import math
import os

import pytest
import torch

from qerl_repro.quantization.base import quantize_model_
from qerl_repro.quantization.formats import deadzone_fraction, fake_quantize, relative_frobenius_error, sqnr_db
from qerl_repro.quantization.report import _block_index, _kind, main, quantization_error_report
from qerl_repro.testing import build_tiny_qwen2


LAYER_KEYS = {"name", "block", "kind", "shape", "numel", "per_tensor_scale", "rel_frobenius", "sqnr_db", "deadzone"}
RAW_SUMS = {"sum_sq_weight", "sum_sq_error", "num_nonzero", "num_zeroed"}


@pytest.mark.parametrize(
    "name,block,kind",
    [
        ("model.layers.3.self_attn.q_proj", 3, "self_attn.q_proj"),  # Llama / Qwen2
        ("transformer.h.11.mlp.c_fc", 11, "mlp.c_fc"),  # GPT-2 style
        ("model.decoder.layers.0.fc1", 0, "fc1"),  # OPT style
        ("lm_head", None, "lm_head"),  # outside the blocks
    ],
)
def test_block_and_kind(name, block, kind):
    assert _block_index(name) == block
    assert _kind(name) == kind


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_report_matches_formats_metrics_and_the_quantized_model(fmt):
    model, _ = build_tiny_qwen2(dtype=torch.bfloat16)
    report = quantization_error_report(model, fmt, top_k=3)

    assert report["format"] == fmt and report["summary"]["num_layers"] == len(report["layers"]) == 14
    assert report["skipped"] == ["lm_head"]
    assert all(set(layer) == LAYER_KEYS | RAW_SUMS for layer in report["layers"])
    assert [b["block"] for b in report["blocks"]] == [0, 1]
    assert set(report["kinds"]) == {f"self_attn.{p}_proj" for p in "qkvo"} | {
        f"mlp.{p}_proj" for p in ("gate", "up", "down")
    }
    assert len(report["summary"]["worst_layers"]) == 3
    assert sorted(report["ranking"]["by_deadzone"]) == sorted(layer["name"] for layer in report["layers"])

    # Per-layer metrics equal formats' metric functions on the weight quantize_model_ actually stores
    # (q/k/v with their shared NVFP4 scale).
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantize_model_(model, fmt)
    for layer in report["layers"]:
        w = weights[layer["name"] + ".weight"]
        w_hat = model.get_submodule(layer["name"]).dequantize_weight()
        assert layer["rel_frobenius"] == pytest.approx(relative_frobenius_error(w, w_hat), rel=1e-12)
        assert layer["sqnr_db"] == pytest.approx(sqnr_db(w, w_hat), rel=1e-12)
        assert layer["deadzone"] == deadzone_fraction(w, w_hat)
    # For NVFP4 the shared scale matters: q_proj's own-scale error differs from the reported one.
    if fmt == "nvfp4":
        q = report["layers"][0]
        assert q["name"] == "model.layers.0.self_attn.q_proj"
        own = fake_quantize(weights[q["name"] + ".weight"], fmt)
        assert q["per_tensor_scale"] == pytest.approx(float(model.get_submodule(q["name"]).per_tensor_scale))
        assert relative_frobenius_error(weights[q["name"] + ".weight"], own) != q["rel_frobenius"]

    # Aggregates are size-weighted: sqrt(sum err^2 / sum w^2) over the layers.
    layers = report["layers"]
    expected = math.sqrt(sum(x["sum_sq_error"] for x in layers) / sum(x["sum_sq_weight"] for x in layers))
    assert report["summary"]["rel_frobenius"] == pytest.approx(expected)
    low, high = (0.08, 0.11) if fmt == "nvfp4" else (0.10, 0.13)  # Gaussian-like random weights
    assert low < report["summary"]["rel_frobenius"] < high
    block0 = [x for x in layers if x["block"] == 0]
    assert report["blocks"][0]["num_zeroed"] == sum(x["num_zeroed"] for x in block0)


def test_cli_writes_json(tiny_model_dir, tmp_dir, capsys):
    output = os.path.join(tmp_dir, "sub", "report.json")
    main(["--model", tiny_model_dir, "--format", "mxfp4", "--mxfp4_scale_mode", "floor", "--output", output])
    with open(output) as f:
        report = json.load(f)
    assert {
        "version",
        "format",
        "mxfp4_scale_mode",
        "summary",
        "layers",
        "blocks",
        "kinds",
        "ranking",
        "model",
    } <= set(report)
    assert report["format"] == "mxfp4" and report["mxfp4_scale_mode"] == "floor"
    assert report["model"] == tiny_model_dir
    assert {"rel_frobenius", "sqnr_db", "deadzone", "worst_layers"} <= set(report["summary"])
    printed = capsys.readouterr().out
    assert "model-wide" in printed and "worst 5 layers" in printed


def test_unknown_format():
    model, _ = build_tiny_qwen2(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="valid formats are: nvfp4, mxfp4"):
        quantization_error_report(model, "nf4")


def test_bench_registry_cli_and_merge(tmp_dir, monkeypatch):
    from qerl_repro import bench

    output = os.path.join(tmp_dir, "bench.json")
    with open(output, "w") as f:
        json.dump({"other_bench": {"value": 1}}, f)  # another engineer's entry: kept
    monkeypatch.setitem(bench.registered_benches(), "tiny_gaussian", lambda: bench.gaussian_error(n=256))
    results = bench.main(["--only", "tiny_gaussian", "--output", output])
    with open(output) as f:
        merged = json.load(f)
    assert set(merged) == {"other_bench", "tiny_gaussian"} and merged["other_bench"] == {"value": 1}
    entry = results["tiny_gaussian"]
    assert entry["checks"]["all_invariant_16x"]  # trap 6: the error does not depend on the weight scale
    assert (
        9.0 < entry["nvfp4"]["rel_frobenius_pct"] < 10.0
        and entry["nvfp4"]["rel_frobenius_pct"] < (entry["mxfp4_even"]["rel_frobenius_pct"])
    )
    assert {"gaussian_error", "smollm2_memory", "fake_quantize_speed", "dequantize_speed"} <= set(
        bench.registered_benches()
    )
    with pytest.raises(ValueError, match="Unknown bench"):
        bench.main(["--only", "nope", "--output", output])
