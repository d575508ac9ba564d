# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""SRDD (`qerl_repro.srdd`): per-block scan of the 4-bit weight error, threshold, recommendation, NF4 via
bitsandbytes, the seeds' element-wise metric, CLI (JSON + PNG)."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from qerl_repro.errors import UserError
from qerl_repro.quantization.base import load_base_model
from qerl_repro.quantization.report import quantization_error_report
from qerl_repro.srdd import (
    elementwise_relative_error_sums,
    gaussian_reference_error,
    main,
    nf4_fake_quantize,
    recommendation,
    srdd_scan,
)


@pytest.fixture(scope="module")
def tiny_bf16(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)


def test_elementwise_metric_on_a_literal_tensor():
    weight = torch.tensor([1.0, 0.5, -0.25, 0.0, 0.01])
    weight_hat = torch.tensor(
        [
            1.0,  # exact: ratio 0
            0.0,  # deadzone: ratio 1 (100 %)
            -0.5,  # doubled: ratio 1
            0.0,  # zero weight: not counted
            0.5,  # a tiny weight rounded up to a level: ratio 49, however little it matters
        ]
    )
    sums = elementwise_relative_error_sums(weight, weight_hat)
    assert sums["num_nonzero"] == 4
    assert sums["sum_elementwise_rel"] == pytest.approx(0 + 1 + 1 + 49)


@pytest.mark.parametrize(
    "fmt, expected",
    [
        ("nvfp4", 0.0951),  # reference/fp4_formats.md 5.2: 9.51-9.52 % on Gaussian weights
        ("mxfp4", 0.1122),  # MXFP4 EVEN (the default scale mode): 11.22 %
        ("nf4", 0.092),  # bitsandbytes NF4, blocks of 64, double quantization (measured here: 9.2 %)
    ],
)
def test_gaussian_reference_error_matches_the_formats_reference(fmt, expected):
    assert gaussian_reference_error(fmt) == pytest.approx(expected, abs=0.001)


def test_nf4_scan_uses_the_weights_bitsandbytes_stores(tiny_model_dir, tiny_bf16):
    """The NF4 error is computed against what `load_base_model(..., "nf4")` (bnb Linear4bit) holds."""
    import bitsandbytes.functional as bnb_functional

    quantized = load_base_model(tiny_model_dir, "nf4", dtype=torch.bfloat16)
    report = srdd_scan(tiny_bf16, "nf4")
    assert len(report["layers"]) == 14 and report["skipped"] == ["lm_head"]
    for layer in report["layers"]:
        module = quantized.get_submodule(layer["name"])
        stored = bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        original = tiny_bf16.get_submodule(layer["name"]).weight
        assert torch.equal(nf4_fake_quantize(original), stored), layer["name"]
        relative = ((original.double() - stored.double()).norm() / original.double().norm()).item()
        assert layer["rel_frobenius"] == pytest.approx(relative, rel=1e-9)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_blocks_match_the_quantization_report_and_the_threshold_splits_them(tiny_bf16, fmt):
    reference = quantization_error_report(tiny_bf16, fmt)
    first = srdd_scan(tiny_bf16, fmt)
    assert first["num_blocks"] == 2 and [entry["block"] for entry in first["blocks"]] == [0, 1]
    for entry, expected in zip(first["blocks"], reference["blocks"]):
        for key in ("rel_frobenius", "sqnr_db", "deadzone", "num_params"):
            assert entry[key] == pytest.approx(expected[key], rel=1e-12), key
    errors = [entry["rel_frobenius"] for entry in first["blocks"]]
    worst = max(range(2), key=lambda block: errors[block])
    # A threshold between the two blocks flags exactly the worse one; ranks follow the error.
    report = srdd_scan(tiny_bf16, fmt, threshold=sum(errors) / 2)
    assert report["flagged_blocks"] == [worst] and report["ranking"] == [worst, 1 - worst]
    assert [entry["rank"] for entry in report["blocks"]] == [1 if block == worst else 2 for block in (0, 1)]
    assert report["threshold_source"] == "user"
    # The default threshold is 1.05 x the Gaussian reference; a random tiny model is Gaussian-like: nothing flagged.
    assert first["threshold"] == pytest.approx(1.05 * gaussian_reference_error(fmt))
    assert first["flagged_blocks"] == [] and "No block exceeds" in first["recommendation"]
    # The element-wise metric is larger than the Frobenius one (small weights inflate it).
    assert all(entry["elementwise_rel"] > 1.5 * entry["rel_frobenius"] for entry in first["blocks"])


@pytest.mark.parametrize(
    "errors, threshold, expected",
    [
        ([0.12, 0.13, 0.125], 0.10, "Every block (3) exceeds 10.00 %"),  # all flagged: suggest a better format
        ([0.09, 0.091, 0.092], 0.10, "No block exceeds 10.00 %"),  # none flagged
        ([0.09, 0.12, 0.095], 0.10, "Blocks [1] exceed 10.00 %"),  # some flagged: targeted RIN candidates
    ],
)
def test_recommendation(errors, threshold, expected):
    blocks = [{"block": i, "rel_frobenius": e, "flagged": e > threshold} for i, e in enumerate(errors)]
    text = recommendation("mxfp4", blocks, threshold)
    assert text.startswith(expected)
    if "Every block" in text:
        assert "NVFP4" in text  # the higher-precision suggestion for MXFP4
    assert f"worst/best = {max(errors) / min(errors):.3f}" in text


def test_cli_writes_json_and_plot(tiny_model_dir, tmp_path, capsys):
    output = str(tmp_path / "srdd.json")
    main(["--model", tiny_model_dir, "--format", "nvfp4", "--output", output])
    with open(output) as f:
        report = json.load(f)
    assert report["format"] == "nvfp4" and len(report["blocks"]) == 2 and "elementwise_note" in report
    assert os.path.getsize(str(tmp_path / "srdd.png")) > 10_000
    assert "SRDD nvfp4: 2 blocks, 14 layers" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--format", "int4"], "not one of: nvfp4, mxfp4, nf4"),
        (["--format", "nvfp4", "--threshold", "-0.1"], "threshold=-0.1 must be a positive"),
    ],
)
def test_cli_errors(tiny_model_dir, argv, match):
    with pytest.raises(UserError, match=match):
        main(["--model", tiny_model_dir, *argv])
