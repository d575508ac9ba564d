# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Tests of `qerl_repro.entropy`: the entropy maths on literal distributions, the completion mask on a real tiny
model, AQN draws (sigma 0 bit-identical, sigma > 0 different, weights restored), the grid summary on literal runs,
the whole measurement on a tiny testbed-like organism, and the CLI's errors. No dependence on data/testbed."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from qerl_repro.entropy import (
    CompletionSet,
    aqn_entropy_draws,
    aqn_sigmas,
    completion_entropy,
    difference_in_words,
    draws_vs_reference,
    grid_entropy_table,
    load_grid_runs,
    main,
    masked_entropy_sums,
    measure,
    paired_vs_reference,
    per_prompt_means,
    summarize_grid_entropy,
    token_entropy,
)
from qerl_repro.errors import UserError
from qerl_repro.testing import build_tiny_qwen2


def _entropy_of(probs):
    """Independent reference: -sum p ln p in float64 Python maths."""
    return -sum(p * math.log(p) for p in probs if p > 0)


# ----------------------------------------------------------------------------------------------------------------------
# Maths
# ----------------------------------------------------------------------------------------------------------------------

ENTROPY_CASES = [
    ([0.0, 0.0], 1.0, math.log(2)),  # uniform over 2 tokens
    ([3.0] * 16, 1.0, math.log(16)),  # uniform over the organism's 16 symbols, any constant logit
    ([0.0, -math.inf, -math.inf], 1.0, 0.0),  # one-hot (masked logits)
    ([100.0, 0.0, 0.0, 0.0], 1.0, _entropy_of([1.0])),  # one-hot up to exp(-100)
    ([math.log(0.5), math.log(0.25), math.log(0.25)], 1.0, 1.5 * math.log(2)),  # hand-computed: 1.0397 nats
    ([math.log(0.9), math.log(0.1)], 1.0, 0.3250829733914482),  # -(0.9 ln 0.9 + 0.1 ln 0.1)
    ([2 * math.log(2), 0.0], 2.0, _entropy_of([2 / 3, 1 / 3])),  # T 2 turns odds 4:1 into 2:1: 0.6365 nats
]


@pytest.mark.parametrize(("logits", "temperature", "expected"), ENTROPY_CASES)
def test_token_entropy_literal_cases(logits, temperature, expected):
    got = token_entropy(torch.tensor(logits), temperature)
    assert float(got) == pytest.approx(expected, abs=1e-6)


def test_token_entropy_is_fp32_from_bf16_logits_and_keeps_leading_shape():
    logits = torch.randn(3, 5, 16).to(torch.bfloat16)
    got = token_entropy(logits)
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    probs = torch.softmax(logits.double(), -1)
    expected = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_token_entropy_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(torch.zeros(4), 0.0)


def test_masked_entropy_sums_ignore_logits_outside_the_mask():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 16)
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]])
    sums, counts = masked_entropy_sums(logits, mask)
    changed = logits.clone()
    changed[mask == 0] = torch.randn(int((mask == 0).sum()), 16) * 10  # prompt / padding positions
    sums_changed, counts_changed = masked_entropy_sums(changed, mask)
    assert torch.equal(sums, sums_changed) and counts.tolist() == counts_changed.tolist() == [2, 4]
    # ...while a change at a counted position does change the sum.
    changed[0, 2] = 0.0
    assert masked_entropy_sums(changed, mask)[0][0] != sums[0]
    expected = token_entropy(logits[1, 1:5]).sum()
    torch.testing.assert_close(sums[1], expected)


def test_per_prompt_means_weight_tokens_and_repeats():
    # prompt 0: sequence A (2 tokens, entropy sum 1.0) sampled 3 times, B (1 token, sum 0.2) once; prompt 1: nothing.
    got = per_prompt_means([1.0, 0.2], [2, 1], [0, 0], [3, 1], 2)
    assert got[0] == pytest.approx((3 * 1.0 + 0.2) / (3 * 2 + 1))
    assert math.isnan(got[1])


def test_paired_vs_reference_numbers_and_words():
    ref = [0.40, 0.50, 0.60, 0.70]
    other = [0.41, 0.52, 0.61, 0.72]  # differences 0.01, 0.02, 0.01, 0.02
    out = paired_vs_reference(ref, other, "BF16", "NVFP4")
    assert out["difference"] == pytest.approx(0.015)
    assert out["ci"][0] > 0 and out["p_value"] < 0.05
    assert out["relative"] == pytest.approx(0.015 / 0.55)
    assert out["words"].startswith("NVFP4 is higher than BF16 by 0.0150 nats per token")
    same = paired_vs_reference(ref, [0.41, 0.49, 0.61, 0.69], "BF16", "NF4")
    assert "not distinguishable at this sample size" in same["words"]


def test_difference_in_words_bootstrap_floor():
    assert "(p < 0.0002)" in difference_in_words("A", "B", -0.01, 0.0, p_floor=1 / 5000)
    assert difference_in_words("A", "B", -0.01, 0.0, p_floor=1 / 5000).startswith("B is lower than A by 0.0100")


def test_draws_vs_reference_includes_draw_variation():
    ref = [0.5] * 50
    # Every prompt moves by the draw's shift: +0.02 in one draw, -0.02 in the other (a pure draw effect).
    draws = [[0.52] * 50, [0.48] * 50]
    out = draws_vs_reference(ref, draws, "NVFP4", "AQN", num_resamples=500)
    assert out["difference"] == pytest.approx(0.0)
    assert out["per_draw"] == pytest.approx([0.02, -0.02])
    assert out["draw_std"] == pytest.approx(math.sqrt(2) * 0.02)
    # Resampling prompts alone would give a zero-width interval here; the draws make it wide.
    assert out["ci"][0] <= -0.019 and out["ci"][1] >= 0.019
    assert out["mean_abs_difference"] == pytest.approx(0.02)
    level = draws_vs_reference(None, draws, "", "AQN", num_resamples=500)
    assert level["mean"] == pytest.approx(0.5) and "p_value" not in level


def test_aqn_sigmas_of_the_testbed_recipe():
    rows = aqn_sigmas(250, 1e-2, 5e-4, 10)
    assert [r["stages"] for r in rows] == [[0], [1], [2], [3], [4], [5], [6], [7], [8], [9]]
    assert rows[0]["sigma"] == 0.0 and rows[1]["sigma"] == pytest.approx(1e-2) and rows[-1]["sigma"] == 5e-4
    assert [r["first_step"] for r in rows] == [0, 25, 50, 75, 100, 125, 150, 175, 200, 225]


# ----------------------------------------------------------------------------------------------------------------------
# The model forward and AQN on a tiny real model
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny_qwen2(seed=3)
    return model.eval(), tokenizer


def _reference_entropy(model, prompt, completion):
    """Independent: forward of the unpadded sequence alone, float64 softmax at the positions predicting the completion."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    probs = torch.softmax(logits, -1)
    per_position = -(probs * probs.log()).sum(-1)
    return float(per_position[len(prompt) - 1 : len(prompt) - 1 + len(completion)].mean())


def test_completion_entropy_scores_completion_positions_only(tiny):
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    completions = [[((20, 21), 1)], [((30,), 1)]]
    got = completion_entropy(model, CompletionSet("x", prompts, completions), pad_id=pad, batch_size=8)
    assert got[0] == pytest.approx(_reference_entropy(model, [5, 6, 7], [20, 21]), abs=1e-5)
    assert got[1] == pytest.approx(_reference_entropy(model, [8, 9, 10, 11, 12, 13], [30]), abs=1e-5)
    # Changing a prompt token changes the context, not which positions count; changing only a token *after* the
    # completion's last predicted position (the completion's final token is input to no counted position) does not.
    tail = completion_entropy(model, CompletionSet("x", prompts, [[((20, 22), 1)], [((31,), 1)]]), pad_id=pad)
    assert tail == pytest.approx(got, abs=1e-6)
    # Padding (here: batched with a longer sequence, or alone) does not change a sequence's value.
    alone = completion_entropy(model, CompletionSet("x", prompts[:1], completions[:1]), pad_id=pad)
    assert alone[0] == pytest.approx(got[0], abs=1e-6)


def test_completion_entropy_weights_repeated_samples(tiny):
    model, tokenizer = tiny
    prompts = [[5, 6, 7]]
    a, b = (20, 21, 22), (40,)
    got = completion_entropy(model, CompletionSet("x", prompts, [[(a, 3), (b, 1)]]), pad_id=tokenizer.pad_token_id)
    ha, hb = _reference_entropy(model, prompts[0], list(a)), _reference_entropy(model, prompts[0], list(b))
    assert got[0] == pytest.approx((3 * 3 * ha + 1 * hb) / (3 * 3 + 1), abs=1e-5)


def test_aqn_draws_sigma_zero_is_clean_sigma_positive_differs_and_weights_restored(tiny):
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    data = CompletionSet("x", [[5, 6, 7], [8, 9]], [[((20, 21), 2), ((22,), 1)], [((30, 31, 32), 1)]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clean = completion_entropy(model, data, pad_id=pad)
    zero, num_zero = aqn_entropy_draws(model, data, 0.0, seed=42, steps=[0, 1], pad_id=pad)
    assert num_zero == 0
    assert zero == [clean, clean]  # bit-identical floats
    noisy, num_noised = aqn_entropy_draws(model, data, 0.05, seed=42, steps=[25, 26], pad_id=pad)
    assert num_noised == 2 * model.config.num_hidden_layers  # input and post-attention norm of every block
    assert noisy[0] != clean and noisy[1] != clean and noisy[0] != noisy[1]  # noise changes it, each draw its own
    again, _ = aqn_entropy_draws(model, data, 0.05, seed=42, steps=[25], pad_id=pad)
    assert again[0] == noisy[0]  # the draw is the trainer's deterministic (seed, step) noise
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # clean weights restored bit-exactly
    assert completion_entropy(model, data, pad_id=pad) == clean


# ----------------------------------------------------------------------------------------------------------------------
# The Table 1 grid's logged entropy
# ----------------------------------------------------------------------------------------------------------------------


def _run(row, seed, values):
    return {
        "row": row,
        "seed": seed,
        "metrics": {"entropy": {"steps": list(range(1, len(values) + 1)), "values": values}},
    }


def test_summarize_grid_entropy_literal_runs():
    rows = {
        "bf16": [{"row": "bf16", "seed": None, "metrics": {"test_after": {}}}],  # a base row: no curve, skipped
        "bf16_lora": [_run("bf16_lora", 42, [1.0, 2.0, 3.0, 4.0]), _run("bf16_lora", 43, [3.0, 4.0, 5.0, 6.0])],
        "nvfp4_lora": [_run("nvfp4_lora", 42, [2.0, 2.0, 8.0, 8.0]), _run("nvfp4_lora", 43, [4.0, 4.0, 6.0, 6.0])],
        "nvfp4_aqn": [_run("nvfp4_aqn", 42, [0.5, 1.5, 2.5, 3.5])],
    }
    out = summarize_grid_entropy(rows, first_steps=2)
    assert list(out) == ["bf16_lora", "nvfp4_lora", "nvfp4_aqn"]
    lora = out["bf16_lora"]
    assert [s["first"] for s in lora["per_seed"]] == [1.5, 3.5]
    assert [s["all"] for s in lora["per_seed"]] == [2.5, 4.5]
    assert [s["last"] for s in lora["per_seed"]] == [3.5, 5.5]
    assert lora["first"]["mean"] == pytest.approx(2.5) and lora["first"]["std"] == pytest.approx(math.sqrt(2))
    half = 12.706204736 * math.sqrt(2) / math.sqrt(2)  # t(0.975, df 1) * std / sqrt(n)
    assert lora["first"]["ci"] == pytest.approx([2.5 - half, 2.5 + half], rel=1e-6)
    assert out["nvfp4_lora"]["all"]["mean"] == pytest.approx(5.0)
    assert out["nvfp4_lora"]["vs_reference"]["all"]["difference"] == pytest.approx(5.0 - 3.5)
    one = out["nvfp4_aqn"]
    assert one["num_seeds"] == 1 and one["all"]["ci"] is None and "vs_reference" not in one
    table = grid_entropy_table(out)
    assert "| nvfp4_aqn | 42 | 1.0000 | 2.0000 | 3.0000 | - |" in table
    assert "| nvfp4_lora | 42, 43 | 3.0000 ± 1.4142" in table and "| +1.5000 [" in table


def test_load_grid_runs_skips_half_written_and_foreign_files(tmp_path):
    from qerl_repro.table1 import SCHEMA as RUN_SCHEMA

    for seed in (43, 42):
        run = {**_run("nvfp4_lora", seed, [0.5, 0.4]), "schema": RUN_SCHEMA}
        (tmp_path / f"nvfp4_lora-seed{seed}.json").write_text(json.dumps(run))
    (tmp_path / "bf16_lora-seed44.json").write_text(
        '{"schema": "qerl_repro.table1.run/v1", "row": "bf16_l'
    )  # the grid is writing it
    (tmp_path / "entropy.json").write_text(json.dumps({"schema": "qerl_repro.entropy/v1"}))  # not a grid run
    rows = load_grid_runs(str(tmp_path))
    assert list(rows) == ["nvfp4_lora"]
    assert [r["seed"] for r in rows["nvfp4_lora"]] == [42, 43]
    assert rows["nvfp4_lora"][0]["_file"] == "nvfp4_lora-seed42.json"


# ----------------------------------------------------------------------------------------------------------------------
# The whole measurement on a tiny organism, and the CLI
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_organism(tmp_path_factory):
    """A randomly initialised organism-shaped Llama (the testbed's tokenizer and architecture, hidden 64), saved."""
    from qerl_repro.testbed import OrganismConfig, build_model, build_tokenizer

    path = str(tmp_path_factory.mktemp("tiny_organism"))
    tokenizer = build_tokenizer()
    config = OrganismConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    model = build_model(config, tokenizer)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_measure_end_to_end_on_a_tiny_organism(tiny_organism, tmp_path):
    result = measure(
        tiny_organism,
        bases=("none", "nvfp4"),
        num_samples=2,
        limit=6,
        aqn_total_steps=10,
        aqn_num_stages=3,
        num_draws=2,
        num_resamples=200,
    )
    sets = result["sets"]
    assert list(sets) == ["bf16_samples", "reference", "own_samples"]
    assert sets["bf16_samples"]["num_sequences"] == 12 and sets["reference"]["num_sequences"] == 6
    # BF16 on its own samples is BF16 on the BF16 samples.
    assert sets["own_samples"]["bases"]["none"]["per_prompt"] == sets["bf16_samples"]["bases"]["none"]["per_prompt"]
    # The NVFP4 base is not the BF16 base.
    assert sets["reference"]["bases"]["nvfp4"]["per_prompt"] != sets["reference"]["bases"]["none"]["per_prompt"]
    assert [row["sigma"] for row in result["aqn"]] == pytest.approx([0.0, 1e-2, 5e-4])
    zero = result["aqn"][0]
    assert zero["level"]["mean"] == sets["bf16_samples"]["bases"]["nvfp4"]["level"]["mean"]
    first_step = aqn_sigmas(10, 1e-2, 5e-4, 3)[1]["first_step"]  # 4: stage = int(step // (10 / 3))
    assert result["aqn"][1]["num_noised_modules"] == 4 and result["aqn"][1]["noise_steps"] == [
        first_step,
        first_step + 1,
    ]
    path = tmp_path / "entropy.json"
    path.write_text(json.dumps(result))
    main(["report", "--input", str(path)])
    md = (tmp_path / "entropy.md").read_text()
    assert "| bf16_samples | NVFP4 |" in md and "AQN across the schedule" in md
    assert (tmp_path / "entropy.png").stat().st_size > 10_000


def test_cli_missing_model_dir_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "no_model")
    with pytest.raises(UserError, match="no such folder"):
        main(["measure", "--model", missing, "--output", str(tmp_path / "e.json")])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "qerl_repro.entropy", "measure", "--model", missing],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --model {missing}: no such folder (build the testbed organism first: `make testbed`)"]


def test_cli_other_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        main(["grid", "--grid_dir", str(tmp_path / "nothing")])
    with pytest.raises(UserError, match="no table1 run JSON"):
        main(["grid", "--grid_dir", str(tmp_path)])
    with pytest.raises(UserError, match="no such file"):
        main(["report", "--input", str(tmp_path / "missing.json")])
