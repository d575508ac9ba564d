# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""The README's memory arithmetic, checked against the parameter counts the Qwen2.5 model cards state."""

import os

import pytest

from qerl_repro.memory import QWEN25_3B, QWEN25_7B, base_weight_bytes, engine_budget, full_finetune_budget, main


@pytest.mark.parametrize(
    "shape, total, non_embedding_b",
    [
        (QWEN25_3B, 3_085_938_688, 2.77),  # Hub safetensors total; model card: 2.77B non-embedding
        (QWEN25_7B, 7_615_616_512, 6.53),  # Hub safetensors total; model card: 6.53B non-embedding
    ],
)
def test_parameter_counts_match_the_published_ones(shape, total, non_embedding_b):
    assert shape.total_params() == total
    assert shape.block_linear_params() / 1e9 == pytest.approx(non_embedding_b, abs=0.005)


def test_kv_cache_bytes_per_token():
    assert QWEN25_3B.kv_bytes_per_token() == 2 * 36 * 2 * 128 * 2  # k and v, 36 layers, 2 KV heads of 128, bf16
    assert QWEN25_7B.kv_bytes_per_token() == 2 * 28 * 4 * 128 * 2


def test_fp4_engine_leaves_more_kv_cache_than_bf16():
    for shape, utilization in ((QWEN25_3B, 0.2), (QWEN25_7B, 0.3)):
        bf16, nvfp4 = engine_budget(shape, "bf16", utilization), engine_budget(shape, "nvfp4", utilization)
        saved = base_weight_bytes(shape, "bf16") - base_weight_bytes(shape, "nvfp4")
        assert nvfp4["kv_cache_gb"] - bf16["kv_cache_gb"] == pytest.approx(saved / 1e9)
        assert nvfp4["kv_tokens"] > bf16["kv_tokens"]


def test_cli_prints_the_readme_table(capsys):
    table = main([])
    assert "Qwen2.5-7B-Instruct | nvfp4 | 0.3" in table and table in capsys.readouterr().out


def test_full_finetune_state_is_16_bytes_per_parameter():
    # fp32 master weight 4 + fp32 gradient 4 + AdamW moments 8
    assert full_finetune_budget(QWEN25_3B)["train_state_gb"] == pytest.approx(3_085_938_688 * 16 / 1e9)
    assert full_finetune_budget(QWEN25_7B)["train_state_gb"] > 80  # one 80 GB GPU cannot hold it


def test_readme_holds_the_cli_output():
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        readme = f.read()
    for line in main([]).splitlines():
        assert line in readme, line


def test_row_plan_by_hand():
    from qerl_repro.memory import row_plan

    # 7B NVFP4 LoRA: 0.3 x 80 GB engine share, the NVFP4 base in the trainer, 600 x 128 x 300 tokens at 2091.8 tok/s
    p = row_plan("Qwen2.5-7B-Instruct", "nvfp4_aqn")
    assert p["gpus"] == 1 and p["engine_gb"] == pytest.approx(24.0)
    assert p["trainer_base_gb"] == pytest.approx(base_weight_bytes(QWEN25_7B, "nvfp4") / 1e9)
    assert p["rollout_gpu_hours"] == pytest.approx(600 * 128 * 300 / 2091.8 / 3600)
    # our NF4 arm serves the dequantized bf16 base: bf16's throughput, not the paper's bitsandbytes engine
    assert row_plan("Qwen2.5-7B-Instruct", "nf4_qlora")["rollout_tokens_per_s"] == 1641.1
    assert row_plan("Qwen2.5-3B-Instruct", "mxfp4_lora")["throughput_source"].startswith("NVFP4's")
    # 7B full FT: 24 + (15.2 + 121.8) / n <= 80 first holds at n = 4 (n = 2 needs 92.5 GB)
    full = row_plan("Qwen2.5-7B-Instruct", "bf16_full")
    assert full["gpus"] == 4 and full["memory_per_gpu_gb"] <= 80


@pytest.mark.parametrize("model", ["Qwen2.5-3B-Instruct", "Qwen2.5-7B-Instruct"])
def test_plan_gpus_agree_with_the_grids_launchers(model):
    """A row the arithmetic puts on several GPUs is exactly a row the grid launches with ZeRO-3."""
    from qerl_repro import table1
    from qerl_repro.memory import PLAN_ROWS, row_plan

    assert set(PLAN_ROWS) == {row for row in table1.ROWS if table1.ROWS[row].trained}
    for row in PLAN_ROWS:
        several = row_plan(model, row)["gpus"] > 1
        assert several == ("zero3" in table1.accelerate_config("gpu", model, row)), row


def test_readme_holds_the_plan():
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        readme = f.read()
    for line in main(["--plan"]).splitlines():
        assert line in readme, line
