# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""QeRLConfig / QeRLTrainer on the HF-generate path (no vLLM): equivalence with GRPOTrainer, AQN during generation
only, resume, config validation. The vLLM rollout tests are in test_trainer_vllm.py."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from qerl_repro import QeRLConfig, QeRLTrainer
from qerl_repro.noise import aqn_noise, aqn_sigma
from qerl_repro.testing import tiny_args, tiny_trainer


def load(tiny_model_dir, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype), AutoTokenizer.from_pretrained(
        tiny_model_dir
    )


TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "step_time", "total_flos")


def _comparable(log_history):
    return [{k: v for k, v in entry.items() if k not in TIMING_KEYS} for entry in log_history]


class TestConfig:
    @pytest.mark.parametrize(
        "overrides, match",
        [
            (dict(quant_format="int4"), "quant_format"),  # unknown format
            (dict(aqn=True), "aqn_allow_unquantized"),  # AQN without a quantized base
            (dict(aqn=True, quant_format="nvfp4", aqn_sigma_start=0.0), "aqn_sigma_start"),  # sigma must be > 0
            (dict(aqn=True, quant_format="nvfp4", aqn_sigma_end=-1e-3), "aqn_sigma_end"),  # negative sigma
            (dict(aqn=True, quant_format="nvfp4", aqn_num_stages=2), "aqn_num_stages"),  # K-2 would be 0
            (dict(aqn_schedule="cosine"), "aqn_schedule"),  # unknown schedule
            (dict(mxfp4_scale_mode="ceil"), "mxfp4_scale_mode"),  # unsupported MXFP4 scale mode
        ],
    )
    def test_invalid_values_raise_naming_the_field(self, tmp_dir, overrides, match):
        with pytest.raises(ValueError, match=match):
            tiny_args(QeRLConfig, tmp_dir, **overrides)

    def test_valid_configs(self, tmp_dir):
        args = tiny_args(QeRLConfig, tmp_dir, aqn=True, quant_format="nvfp4")
        assert args.aqn_noise_seed == 42  # falls back to `seed`
        assert args.vllm_importance_sampling_correction is False  # QeRL had no IS correction
        forced = tiny_args(QeRLConfig, tmp_dir, aqn=True, aqn_allow_unquantized=True, aqn_seed=7)
        assert forced.aqn_noise_seed == 7

    def test_trainer_identity(self):
        assert QeRLTrainer._tag_names == ["trl", "grpo", "qerl"]
        assert QeRLTrainer._paper["id"] == "2510.11696"


class TestEquivalenceWithGRPOTrainer:
    def test_same_logs_and_weights_with_aqn_and_quantization_off(self, tiny_model_dir, tmp_path):
        results = []
        for trainer_cls, config_cls in ((GRPOTrainer, GRPOConfig), (QeRLTrainer, QeRLConfig)):
            model, tokenizer = load(tiny_model_dir)
            args = tiny_args(config_cls, str(tmp_path / trainer_cls.__name__))
            trainer = tiny_trainer(trainer_cls, model, tokenizer, args)
            trainer.train()
            results.append((trainer.state.log_history, dict(trainer.model.named_parameters())))
        (grpo_logs, grpo_params), (qerl_logs, qerl_params) = results
        assert any("loss" in entry for entry in grpo_logs)
        assert _comparable(grpo_logs) == _comparable(qerl_logs)
        assert grpo_params.keys() == qerl_params.keys()
        for name, param in grpo_params.items():
            assert torch.equal(param, qerl_params[name]), name
        # The run trained something: equality above is not two untouched models.
        lora_b = [p for n, p in qerl_params.items() if "lora_B" in n]
        assert any(p.abs().sum() > 0 for p in lora_b)


class NormRecorder:
    """Records the weight a norm module uses in every forward: generation (no grad) vs training/logprob forwards."""

    def __init__(self, module):
        self.calls = []
        module.register_forward_pre_hook(self._hook)
        self.module = module

    def _hook(self, module, inputs):
        self.calls.append((torch.is_grad_enabled(), module.weight.detach().clone()))


class TestAQNOnHFGenerate:
    def test_noise_only_during_generation_and_restored(self, tiny_model_dir, tmp_dir):
        model, tokenizer = load(tiny_model_dir)
        clean = model.model.layers[0].input_layernorm.weight.detach().clone()
        args = tiny_args(
            QeRLConfig, tmp_dir, quant_format="nvfp4", aqn=True, aqn_sigma_start=0.1, aqn_sigma_end=0.01, max_steps=4
        )
        trainer = tiny_trainer(QeRLTrainer, model, tokenizer, args)
        norm = trainer.model.base_model.model.model.layers[0].input_layernorm
        recorder = NormRecorder(norm)
        trainer.train()

        generation = [w for grad, w in recorder.calls if not grad]
        training = [w for grad, w in recorder.calls if grad]
        assert generation and training
        for weight in training:  # the logprob / training forwards never see noise
            assert torch.equal(weight, clean)
        assert torch.equal(norm.weight, clean)  # restored bit-exactly after the last rollout
        noisy = [w for w in generation if not torch.equal(w, clean)]
        assert noisy, "no generation forward saw AQN noise"
        # Each logged step carries the schedule's sigma and the number of noised modules (2 per block x 2 blocks).
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert len(logged) == 4
        for entry in logged:
            step = entry["step"] - 1  # the rollouts of logged step s were generated at global_step s - 1
            expected = aqn_sigma(step, 4, sigma_start=0.1, sigma_end=0.01, num_stages=10)
            assert math.isclose(entry["aqn/sigma"], expected)
            assert entry["aqn/num_noised_modules"] == (4 if expected > 0 else 0)

    def test_noise_matches_seed_and_step(self, tiny_model_dir, tmp_dir):
        model, tokenizer = load(tiny_model_dir)
        clean = model.model.layers[1].post_attention_layernorm.weight.detach().clone()
        args = tiny_args(QeRLConfig, tmp_dir, quant_format="nvfp4", aqn=True, max_steps=2, aqn_seed=123)
        trainer = tiny_trainer(QeRLTrainer, model, tokenizer, args)
        norm = trainer.model.base_model.model.model.layers[1].post_attention_layernorm
        recorder = NormRecorder(norm)
        trainer.train()
        # max_steps=2, K=10: step 1 is stage 5. Targets sorted: layers.0.{input,post}, layers.1.{input,post} -> index 3.
        sigma = aqn_sigma(1, 2, sigma_start=1e-2, sigma_end=5e-4, num_stages=10)
        expected = clean + aqn_noise(clean.shape, sigma, seed=123, step=1, index=3)
        generation = [w for grad, w in recorder.calls if not grad]
        assert any(torch.equal(w, expected) for w in generation)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class TestResume:
    def test_resume_continues_schedule_and_noise(self, tiny_model_dir, tmp_path):
        def run(output_dir, callbacks=(), resume=None):
            model, tokenizer = load(tiny_model_dir)
            args = tiny_args(
                QeRLConfig,
                str(output_dir),
                quant_format="nvfp4",
                aqn=True,
                aqn_sigma_start=0.1,
                max_steps=4,
                save_strategy="steps",
                save_steps=2,
            )
            trainer = tiny_trainer(QeRLTrainer, model, tokenizer, args, callbacks=list(callbacks))
            norm = trainer.model.base_model.model.model.layers[0].input_layernorm
            recorder = NormRecorder(norm)
            trainer.train(resume_from_checkpoint=resume)
            noisy = [w for grad, w in recorder.calls if not grad]
            return trainer.state.log_history, noisy

        full_logs, full_noise = run(tmp_path / "full")
        run(tmp_path / "interrupted", callbacks=[StopAt(2)])
        checkpoint = tmp_path / "interrupted" / "checkpoint-2"
        assert checkpoint.is_dir()
        resumed_logs, resumed_noise = run(tmp_path / "interrupted", resume=str(checkpoint))

        def by_step(logs):
            return {e["step"]: e for e in logs if "loss" in e}

        full, resumed = by_step(full_logs), by_step(resumed_logs)
        assert sorted(resumed) == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's trainer_state.json
        for step in (3, 4):
            for key in ("aqn/sigma", "aqn/stage", "aqn/num_noised_modules", "loss", "reward"):
                assert resumed[step][key] == full[step][key], (step, key)
        # The rollouts of steps 3 and 4 saw the same noised norm as the uninterrupted run (one generate per step).
        assert len(resumed_noise) == 2 * len(full_noise) // 4
        for a, b in zip(resumed_noise, full_noise[len(full_noise) // 2 :]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("loaded_here", [True, False])
def test_model_init_kwargs_warning_dropped_only_when_we_loaded_the_base(loaded_here, caplog):
    # GRPOTrainer warns that model_init_kwargs "will be ignored" for a model instance; QeRLTrainer used them to load
    # and quantize the base, so it drops that one message, and only then.
    import logging

    import trl.trainer.grpo_trainer as grpo_trainer_module

    from qerl_repro.trainer import _quiet_model_init_kwargs_warning

    grpo_logger = logging.getLogger(grpo_trainer_module.__name__)
    misleading = "You passed `model_init_kwargs` to the `GRPOConfig`, but your model is already instantiated."
    with caplog.at_level(logging.WARNING, logger=grpo_logger.name), _quiet_model_init_kwargs_warning(loaded_here):
        grpo_logger.warning(misleading)
        grpo_logger.warning("another warning")
    messages = [record.getMessage() for record in caplog.records]
    assert "another warning" in messages
    assert (misleading in messages) is not loaded_here
    assert not grpo_logger.filters  # the filter is removed afterwards


@pytest.mark.parametrize("quant_format", ["nf4", "nvfp4", "none"])
def test_lora_is_fp32_and_moves_at_the_paper_lr_on_every_base(quant_format, tiny_bf16_model_dir, tmp_dir):
    """Trap 10: TRL casts a 4-bit (NF4) model's adapter to bf16, where most AdamW steps at lr 1e-5 round away."""
    args = tiny_args(QeRLConfig, tmp_dir, quant_format=quant_format, learning_rate=1e-5, max_steps=5)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bf16_model_dir)
    model = tiny_bf16_model_dir if quant_format == "nf4" else AutoModelForCausalLM.from_pretrained(tiny_bf16_model_dir)
    trainer = tiny_trainer(QeRLTrainer, model, tokenizer, args)
    lora = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    before = {n: p.detach().clone() for n, p in lora.items() if "lora_A" in n}
    trainer.train()
    moved = sum((lora[n] != b).sum().item() for n, b in before.items())
    total = sum(b.numel() for b in before.values())
    assert moved / total >= 0.99, moved / total


ZERO3 = {
    "zero_optimization": {"stage": 3},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
}


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(quant_format="nvfp4"), "quantized from empty shards"),
        (dict(quant_format="nf4"), "quantized from empty shards"),
        (dict(aqn=True, aqn_allow_unquantized=True, use_vllm=False), "noise would land on shards only"),
        (dict(), None),  # full fine-tuning / BF16 LoRA on HF generate
        (dict(aqn=True, aqn_allow_unquantized=True, use_vllm=True), None),  # the engine holds whole weights
    ],
)
def test_deepspeed_zero3_refuses_what_it_would_break(tmp_dir, overrides, match):
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    try:
        if match is None:
            args = QeRLConfig(tmp_dir, deepspeed=ZERO3, use_cpu=True, report_to="none", **overrides)
            assert is_deepspeed_zero3_enabled() and args.hf_deepspeed_config.is_zero3()  # the check ran with ZeRO-3 on
        else:
            with pytest.raises(ValueError, match=match):
                QeRLConfig(tmp_dir, deepspeed=ZERO3, use_cpu=True, report_to="none", **overrides)
    finally:
        unset_hf_deepspeed_config()
    assert not is_deepspeed_zero3_enabled()
    QeRLConfig(tmp_dir, use_cpu=True, report_to="none", **overrides)  # without ZeRO-3 every one of them is valid


@pytest.mark.parametrize("mode", ["floor", "rceil"])
def test_trainer_quantizes_a_model_path_with_the_configured_mxfp4_scale_mode(mode, tiny_model_dir, tmp_dir):
    from qerl_repro.quantization import fake_quantize
    from qerl_repro.quantization.linear import dequantized_weight
    from qerl_repro.testing import length_reward, lora_config, tiny_dataset

    args = tiny_args(QeRLConfig, tmp_dir, quant_format="mxfp4", mxfp4_scale_mode=mode, max_steps=0)
    trainer = QeRLTrainer(
        model=tiny_model_dir,
        reward_funcs=length_reward,
        args=args,
        train_dataset=tiny_dataset(),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        peft_config=lora_config(),
    )
    assert trainer.model.config.qerl_mxfp4_scale_mode == mode
    layer = trainer.model.get_base_model().model.layers[0].mlp.down_proj.get_base_layer()
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.layers[0].mlp.down_proj.weight
    expected = fake_quantize(original.detach(), "mxfp4", mxfp4_scale_mode=mode)
    assert torch.equal(dequantized_weight(layer).float(), expected.float())
    assert not torch.equal(expected, fake_quantize(original.detach(), "mxfp4"))  # the mode matters for this layer
