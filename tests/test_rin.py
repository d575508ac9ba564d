# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""RIN (`qerl_repro.rin`): per-block AQN multipliers from a literal SRDD JSON, their validation in QeRLConfig and the
trainer, `apply_aqn_` with multipliers, and the HF-generate rollout path. The vLLM paths are in test_rin_vllm.py."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qerl_repro import QeRLConfig, QeRLTrainer
from qerl_repro.noise import apply_aqn_, aqn_noise, aqn_sigma, find_norm_weights, snapshot_norm_weights
from qerl_repro.rin import (
    load_srdd,
    norm_block_index,
    norm_multipliers,
    normalised_clamped,
    rin_block_multipliers,
    rin_metrics,
    rin_plan,
)
from qerl_repro.testing import build_tiny_qwen2, tiny_args, tiny_trainer


# A literal SRDD report of a 4-block model: block errors 10 %, 12 %, 9 %, 9 %; block 1 flagged.
SRDD_4 = {
    "version": 1,
    "format": "nvfp4",
    "num_blocks": 4,
    "threshold": 0.11,
    "blocks": [
        {"block": 0, "rel_frobenius": 0.10, "flagged": False},
        {"block": 1, "rel_frobenius": 0.12, "flagged": True},
        {"block": 2, "rel_frobenius": 0.09, "flagged": False},
        {"block": 3, "rel_frobenius": 0.09, "flagged": False},
    ],
    "flagged_blocks": [1],
    "ranking": [1, 0, 2, 3],
}
# The tiny Qwen2 of the trainer tests has 2 blocks: errors 8 % and 12 %, block 1 flagged.
SRDD_2 = {
    "num_blocks": 2,
    "format": "nvfp4",
    "blocks": [{"block": 0, "rel_frobenius": 0.08}, {"block": 1, "rel_frobenius": 0.12}],
    "flagged_blocks": [1],
    "ranking": [1, 0],
}


def write_json(tmp_path, data, name="srdd.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    "mode, options, expected",
    [
        ("targeted", {}, [0, 1, 0, 0]),  # the SRDD's flagged blocks
        ("targeted", {"blocks": [3, 0]}, [1, 0, 0, 1]),  # an explicit list wins
        ("targeted", {"top_k": 2}, [1, 1, 0, 0]),  # the 2 worst blocks of the ranking
        ("variable", {}, [1.0, 1.2, 0.9, 0.9]),  # error / mean error (mean 10 %)
        # max 1.1 binds block 1; the others share 4 - 1.1 = 2.9 in proportion: c = 2.9 / 0.28.
        ("variable", {"max_multiplier": 1.1}, [0.10 * 2.9 / 0.28, 1.1, 0.09 * 2.9 / 0.28, 0.09 * 2.9 / 0.28]),
        # min 0.95 binds blocks 2 and 3; blocks 0 and 1 share 4 - 1.9 = 2.1: c = 2.1 / 0.22.
        ("variable", {"min_multiplier": 0.95}, [0.10 * 2.1 / 0.22, 0.12 * 2.1 / 0.22, 0.95, 0.95]),
        ("variable", {"min_multiplier": 1.0}, [1.0, 1.0, 1.0, 1.0]),  # min 1 forces plain AQN
    ],
)
def test_block_multipliers_from_a_literal_srdd(mode, options, expected):
    multipliers = rin_block_multipliers(SRDD_4, mode, **options)
    assert multipliers == pytest.approx(expected, rel=1e-12)
    if mode == "variable":
        assert math.fsum(multipliers) / len(multipliers) == pytest.approx(1.0, rel=1e-14)


@pytest.mark.parametrize(
    "mode, options, match",
    [
        ("none", {}, "need a mode"),
        ("cosine", {}, "need a mode"),
        ("targeted", {"blocks": [4]}, r"blocks \[4\] do not exist; the model has blocks 0..3"),
        ("targeted", {"blocks": [1, 1]}, "lists a block twice"),
        ("targeted", {"blocks": []}, "selects no block"),
        ("targeted", {"blocks": [0], "top_k": 1}, "not both"),
        ("targeted", {"top_k": 0}, "aqn_rin_top_k=0 must be an integer in 1..4"),
        ("targeted", {"top_k": 5}, "aqn_rin_top_k=5"),
        ("targeted", {"max_multiplier": 2.0}, "apply to aqn_rin='variable' only"),
        ("variable", {"blocks": [0]}, "apply to aqn_rin='targeted' only"),
        ("variable", {"min_multiplier": 1.2}, "0 <= min <= 1 <= max"),
        ("variable", {"max_multiplier": 0.9}, "0 <= min <= 1 <= max"),
    ],
)
def test_block_multiplier_errors(mode, options, match):
    with pytest.raises(ValueError, match=match):
        rin_block_multipliers(SRDD_4, mode, **options)


def test_targeted_without_flagged_blocks_is_an_error_not_a_silent_baseline():
    with pytest.raises(ValueError, match="flagged_blocks=\\[\\] selects no block"):
        rin_block_multipliers({**SRDD_4, "flagged_blocks": []}, "targeted")


def test_normalised_clamped_edge_cases():
    assert normalised_clamped([0.0, 0.0]) == [1.0, 1.0]  # no information: plain AQN
    assert normalised_clamped([0.0, 0.0, 1.0], min_multiplier=0.5) == pytest.approx([0.5, 0.5, 2.0])


@pytest.mark.parametrize(
    "change, match",
    [
        ({"blocks": [{"block": 0, "rel_frobenius": 0.1}]}, r"must list blocks 0..3 in order"),
        ({"num_blocks": 0}, "num_blocks=0 is not a positive integer"),
        ({"blocks": [{"block": i, "rel_frobenius": -1.0} for i in range(4)]}, "rel_frobenius=-1.0"),
        ({"ranking": None, "flagged_blocks": None, "blocks": None, "num_blocks": None}, None),
    ],
)
def test_load_srdd_rejects_malformed_reports(tmp_path, change, match):
    data = {**SRDD_4, **change}
    if match is None:  # keys missing altogether
        data = {"version": 1}
        match = "missing keys"
    with pytest.raises(ValueError, match=match):
        load_srdd(write_json(tmp_path, data))


def test_load_srdd_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist; write one with `python -m qerl_repro.srdd"):
        load_srdd(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_srdd(str(bad))


@pytest.mark.parametrize(
    "name, block",
    [
        ("model.layers.3.input_layernorm.weight", 3),  # HF / vLLM Llama, Qwen2 (canonical names)
        ("model.layers.12.post_attention_layernorm.weight", 12),
        ("model.layers.0.pre_feedforward_layernorm.weight", 0),  # Gemma2/3 MLP-input norm
        ("model.layers.5.self_attn.q_norm.weight", 5),  # Qwen3 q_norm
        ("base_model.model.model.layers.7.input_layernorm.weight", 7),  # an un-stripped PEFT name
        ("model.language_model.layers.2.input_layernorm.weight", 2),  # multimodal wrapper
        ("model.norm.weight", None),  # the final norm: no block
        ("model.final_layernorm.weight", None),
    ],
)
def test_norm_block_index(name, block):
    assert norm_block_index(name) == block


def test_norm_multipliers_map_names_to_blocks_and_reject_a_mismatch():
    names = [
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
    ]
    assert norm_multipliers(names, [0.5, 1.5], final_norm_multiplier=0.0) == {
        names[0]: 0.5,
        names[1]: 0.5,
        names[2]: 1.5,
        names[3]: 1.5,
        names[4]: 0.0,
    }
    with pytest.raises(ValueError, match="multipliers for 4 blocks but the model's norms span 2 blocks"):
        norm_multipliers(names, [1.0] * 4, final_norm_multiplier=1.0)


def test_plan_and_metrics(tmp_path):
    path = write_json(tmp_path, SRDD_4)
    targeted = rin_plan("targeted", srdd_path=path, top_k=1)
    assert targeted.block_multipliers == (0.0, 1.0, 0.0, 0.0) and targeted.final_norm_multiplier == 0.0
    assert targeted.srdd_format == "nvfp4" and json.loads(json.dumps(targeted.to_json()))["srdd"] == path
    variable = rin_plan("variable", srdd_path=path)
    assert variable.final_norm_multiplier == 1.0  # the final norm keeps plain AQN's sigma (the mean multiplier)
    assert rin_metrics(variable) == pytest.approx(
        {
            "aqn/rin_num_noised_blocks": 4,
            "aqn/rin_multiplier_min": 0.9,
            "aqn/rin_multiplier_max": 1.2,
            "aqn/rin_multiplier_mean": 1.0,
        }
    )
    assert rin_metrics(targeted, per_block=True)["aqn/rin_multiplier/block_1"] == 1.0
    assert rin_plan("none") is None
    with pytest.raises(ValueError, match="describes a model with 4 blocks, but the model has 2"):
        rin_plan("variable", srdd_path=path, num_blocks=2)


# ---- apply_aqn_ with multipliers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_aqn_scales_each_draw_by_its_multiplier(dtype):
    model = build_tiny_qwen2(dtype=dtype)[0]
    targets = find_norm_weights(model, include_final_norm=True)
    clean = snapshot_norm_weights(targets)
    multipliers = norm_multipliers(targets, [0.0, 1.7], final_norm_multiplier=0.5)
    assert apply_aqn_(targets, clean, 0.05, seed=3, step=4, multipliers=multipliers) == 3  # block 0's norms skipped
    for index, (name, weight) in enumerate(targets.items()):
        noise = aqn_noise(weight.shape, 0.05, seed=3, step=4, index=index)
        assert torch.equal(weight, (clean[name].float() + multipliers[name] * noise).to(dtype)), name
    with pytest.raises(ValueError, match="No RIN multiplier"):
        apply_aqn_(targets, clean, 0.05, seed=3, step=4, multipliers={})


# ---- QeRLConfig validation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(aqn_rin="cosine"), "aqn_rin='cosine' is not one of"),
        (dict(aqn=False, aqn_rin="targeted"), "needs aqn=True"),
        (dict(aqn_rin="variable"), "needs aqn_rin_srdd"),
        (dict(aqn_rin="none", aqn_rin_top_k=2), "aqn_rin_top_k set but aqn_rin='none'"),
        (dict(aqn_rin="variable", aqn_rin_srdd="/nonexistent/srdd.json"), "does not exist"),
        (dict(aqn_rin="targeted", aqn_rin_srdd="SRDD", aqn_rin_blocks=[2]), r"blocks \[2\] do not exist"),
        (dict(aqn_rin="variable", aqn_rin_srdd="SRDD", aqn_rin_max=0.5), "0 <= min <= 1 <= max"),
    ],
)
def test_config_errors(tmp_path, overrides, match):
    path = write_json(tmp_path, SRDD_2)
    overrides = {key: path if value == "SRDD" else value for key, value in overrides.items()}
    settings = dict(quant_format="nvfp4", aqn=True) | overrides
    with pytest.raises(ValueError, match=match):
        tiny_args(QeRLConfig, str(tmp_path), **settings)


def test_trainer_rejects_an_srdd_of_another_model(tiny_model_dir, tmp_path):
    args = tiny_args(
        QeRLConfig,
        str(tmp_path),
        quant_format="nvfp4",
        aqn=True,
        aqn_rin="variable",
        aqn_rin_srdd=write_json(tmp_path, SRDD_4),  # 4 blocks; the tiny model has 2
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="describes a model with 4 blocks, but the model has 2"):
        tiny_trainer(QeRLTrainer, model, AutoTokenizer.from_pretrained(tiny_model_dir), args)


# ---- HF generate rollouts --------------------------------------------------------------------------------------------
class NormRecorder:
    """What each norm computes with in every forward without grad (generation), by step."""

    def __init__(self, trainer, names):
        self.calls = {}
        peft_root = trainer.model.base_model.model
        for name in names:
            module = peft_root.get_submodule(name.removesuffix(".weight"))
            module.register_forward_pre_hook(self._hook(trainer, name))

    def _hook(self, trainer, name):
        def hook(module, args):
            if not torch.is_grad_enabled():
                step = trainer.state.global_step
                self.calls.setdefault(step, {}).setdefault(name, module.weight.detach().clone())

        return hook


@pytest.mark.parametrize(
    "mode, options, block_multipliers",
    [
        ("targeted", {"aqn_rin_blocks": [1]}, [0.0, 1.0]),
        ("variable", {}, [0.8, 1.2]),  # 8 % and 12 %, mean 10 %
    ],
)
def test_hf_generate_rollouts_get_each_blocks_share_of_the_noise(
    tiny_model_dir, tmp_path, mode, options, block_multipliers
):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    clean = {name: weight.detach().clone() for name, weight in find_norm_weights(model).items()}
    args = tiny_args(
        QeRLConfig,
        str(tmp_path),
        quant_format="nvfp4",
        aqn=True,
        aqn_sigma_start=0.1,
        aqn_sigma_end=0.05,
        max_steps=3,
        aqn_rin=mode,
        aqn_rin_srdd=write_json(tmp_path, SRDD_2),
        **options,
    )
    trainer = tiny_trainer(QeRLTrainer, model, AutoTokenizer.from_pretrained(tiny_model_dir), args)
    recorder = NormRecorder(trainer, list(clean))
    trainer.train()

    noised_steps = 0
    for step, norms in recorder.calls.items():
        sigma = aqn_sigma(step, 3, sigma_start=0.1, sigma_end=0.05, num_stages=10)
        noised_steps += sigma > 0
        for index, name in enumerate(clean):
            multiplier = block_multipliers[norm_block_index(name)]
            noise = aqn_noise(clean[name].shape, sigma, seed=42, step=step, index=index)
            assert torch.equal(norms[name], clean[name] + multiplier * noise), (step, name)
    assert noised_steps >= 1
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    expected_noised = 2 * sum(1 for value in block_multipliers if value > 0)
    for entry in logged:
        assert entry["aqn/num_noised_modules"] in (0, expected_noised)
        assert entry["aqn/rin_multiplier_max"] == pytest.approx(max(block_multipliers))
    assert [entry["aqn/rin_multiplier/block_1"] for entry in logged if "aqn/rin_multiplier/block_1" in entry] == [
        pytest.approx(block_multipliers[1])
    ]  # per-block values once, at the first training log
    with open(tmp_path / "rin_multipliers.json") as f:
        assert json.load(f)["block_multipliers"] == pytest.approx(block_multipliers)
