# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""W4A4 training: FP4 activations into the frozen 4-bit base GEMMs, with a straight-through estimator.

`QeRLConfig(quant_activations=True)` (NVFP4 / MXFP4 bases only) makes every packed base layer (`FP4Linear`) of the
policy fake-quantize its input to the base's format before the GEMM: the training forward computes
`F.linear(Q(x), W_hat, b)` and the backward `grad_x = grad_y @ W_hat` (the STE: `d Q(x) / dx = I`; the seed studies'
W4A4 trained only after they added one, DESIGN.md trap 4). The base weight stays the frozen packed one. `Q` works one
token at a time (`quantization.ste.fake_quantize_activation`; NVFP4 with a per-token FP32 scale), so a token's
logprob does not depend on what else is in its batch.

The LoRA path keeps high-precision inputs: PEFT's `lora.Linear` calls `base_layer(x)` (quantized here) and
`lora_B(lora_A(x))` on the unquantized `x`. That is what W4A4 hardware runs: the base GEMM takes FP4 activations on the
FP4 tensor cores while the small LoRA matmuls run in bf16 (quantizing LoRA's inputs or weights is the seed studies'
trap 5). `lm_head` and the embeddings are not 4-bit layers and are left alone.

Rollout engine mismatch. vLLM's W4A4 FP4 schemes need Blackwell-class GPUs (reference/vllm_engine_facts.md); on a CPU
(and on older GPUs) the engine runs W4A16: the same dequantized 4-bit weights, high-precision activations. So with
`quant_activations` the rollouts are sampled from a slightly different policy than the one trained.
`activation_quant_logprob_gap` measures that gap on a batch (the trainer's W4A4 logprobs vs W4A16 logprobs of the same
tokens); during training TRL logs the engine-vs-trainer gap itself as `sampling/sampling_logp_difference/{mean,max}`
when `vllm_importance_sampling_correction=True`. `python -m qerl_repro.w4a4` writes the gap of the CPU testbed organism
to a JSON. `vllm_quant_activations=True` emulates W4A4 in the colocated engine instead (`install_engine_activation_quant_`:
the same fake quantization on the inputs of vLLM's Linear layers, with forward pre-hooks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
from torch import nn

from qerl_repro.errors import UserError, run_cli
from qerl_repro.quantization.linear import FP4Linear


__all__ = [
    "activation_quant",
    "activation_quant_logprob_gap",
    "completion_logprobs",
    "install_engine_activation_quant_",
    "set_activation_quant_",
]

W4A4_FORMATS = ("nvfp4", "mxfp4")


def set_activation_quant_(model: nn.Module, enabled: bool = True) -> list[str]:
    """Switch FP4 input quantization (W4A4) on or off in every `FP4Linear` of `model`; return their names.

    Raises a `UserError` when asked to switch it on in a model without any `FP4Linear` (a high-precision or NF4 base:
    W4A4 here means FP4 activations into FP4 GEMMs, which needs an NVFP4 or MXFP4 base).
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, FP4Linear):
            module.quantize_activations = enabled
            names.append(name)
    if enabled and not names:
        raise UserError(
            f"quant_activations needs a packed NVFP4/MXFP4 base (FP4Linear layers); {type(model).__name__} has none. "
            "Set quant_format to 'nvfp4' or 'mxfp4'."
        )
    return names


@contextlib.contextmanager
def activation_quant(model: nn.Module, enabled: bool):
    """Run a block with W4A4 on or off in every `FP4Linear` of `model`, then restore each layer's previous state."""
    layers = [m for m in model.modules() if isinstance(m, FP4Linear)]
    saved = [m.quantize_activations for m in layers]
    try:
        for m in layers:
            m.quantize_activations = enabled
        yield
    finally:
        for m, state in zip(layers, saved, strict=True):
            m.quantize_activations = state


def _quantize_input_hook(fmt: str, mxfp4_scale_mode: str, name: str):
    from qerl_repro.quantization.ste import fake_quantize_activation

    def hook(module, args):
        x, *rest = args
        return (fake_quantize_activation(x, fmt, mxfp4_scale_mode=mxfp4_scale_mode, name=f"{name} input"), *rest)

    return hook


def install_engine_activation_quant_(engine_model: nn.Module, fmt: str, mxfp4_scale_mode: str = "even") -> list[str]:
    """Emulate W4A4 in a colocated vLLM engine: a forward pre-hook on every vLLM `LinearBase` layer (qkv_proj, o_proj,
    gate_up_proj, down_proj; not the LM head, which is an embedding-type layer in vLLM) fake-quantizes its input to
    `fmt`, as `FP4Linear.quantize_activations` does in the trainer. Returns the hooked layer names.

    Fused layers see the same input as their HF parts (q/k/v and gate/up share one), and the quantization is per token
    (`fake_quantize_activation`), so engine and trainer quantize a token alike however they batch it. Hooks only
    run when vLLM calls the module (an eager engine, `enforce_eager`, the CPU default); a LoRA-serving engine
    (`vllm_adapter_sync="unmerged"`) calls its base layers' kernels directly and is refused.
    """
    from vllm.model_executor.layers.linear import LinearBase

    if any(hasattr(module, "lora_a_stacked") for module in engine_model.modules()):
        raise UserError(
            "vllm_quant_activations cannot emulate W4A4 in an engine that serves the LoRA adapter unmerged: its LoRA "
            "layers call the base kernels directly. Use vllm_adapter_sync='merged' (the CPU default)."
        )
    names = []
    for name, module in engine_model.named_modules():
        if isinstance(module, LinearBase):
            module.register_forward_pre_hook(_quantize_input_hook(fmt, mxfp4_scale_mode, name))
            names.append(name)
    if not names:
        raise UserError(f"vllm_quant_activations found no vLLM Linear layer in {type(engine_model).__name__}.")
    return names


@torch.no_grad()
def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_completion_tokens: int):
    """Log-probabilities [B, T] of the last `num_completion_tokens` tokens of `input_ids` under `model` (as TRL's
    `_get_per_token_logps_and_entropies` computes them at temperature 1)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logits = logits[:, -num_completion_tokens - 1 : -1]
    targets = input_ids[:, -num_completion_tokens:]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def logprob_gap_stats(logps_a: torch.Tensor, logps_b: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Summary of `logps_a - logps_b` over the tokens where `mask` is 1: mean and max of the absolute token gap (the
    statistics TRL logs as `sampling/sampling_logp_difference/{mean,max}`), the mean signed gap, the mean absolute
    per-sequence gap (sum over the sequence's tokens) and the sequence-level importance ratios `exp(sum gap)`."""
    mask = mask.bool()
    if not mask.any():
        raise ValueError("logprob_gap_stats: the mask selects no token")
    diff = (logps_a - logps_b).masked_fill(~mask, 0.0)
    token = diff[mask]
    per_sequence = diff.sum(dim=-1)[mask.any(dim=-1)]
    ratio = per_sequence.exp()
    return {
        "num_sequences": int(per_sequence.numel()),
        "num_tokens": int(token.numel()),
        "token_abs_gap_mean": token.abs().mean().item(),
        "token_abs_gap_max": token.abs().max().item(),
        "token_gap_mean": token.mean().item(),
        "sequence_abs_gap_mean": per_sequence.abs().mean().item(),
        "sequence_is_ratio_min": ratio.min().item(),
        "sequence_is_ratio_max": ratio.max().item(),
    }


def activation_quant_logprob_gap(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> dict[str, float]:
    """How far the W4A4 policy (FP4 activations, what `quant_activations` trains) is from the W4A16 policy (the same
    4-bit weights with high-precision activations, what vLLM serves without Blackwell FP4 kernels), on the completion
    tokens of a batch: `logprob_gap_stats(W4A4 logprobs, W4A16 logprobs, completion_mask)`.

    Args:
        model: a model with `FP4Linear` base layers (LoRA may be attached); its W4A4 state is restored afterwards.
        input_ids, attention_mask: prompt + completion, [B, L] (left-padded prompts).
        completion_mask: [B, T], 1 for the completion tokens to score (the last T positions of `input_ids`).
    """
    if not any(isinstance(m, FP4Linear) for m in model.modules()):
        raise UserError("activation_quant_logprob_gap needs a model with packed NVFP4/MXFP4 (FP4Linear) layers.")
    num_completion_tokens = completion_mask.shape[1]
    was_training = model.training
    model.eval()
    try:
        with activation_quant(model, True):
            w4a4 = completion_logprobs(model, input_ids, attention_mask, num_completion_tokens)
        with activation_quant(model, False):
            w4a16 = completion_logprobs(model, input_ids, attention_mask, num_completion_tokens)
    finally:
        model.train(was_training)
    return logprob_gap_stats(w4a4, w4a16, completion_mask)


# ---------------------------------------------------------------------------------------------------------------------
# CLI: the gap on the CPU testbed organism
# ---------------------------------------------------------------------------------------------------------------------


def testbed_logprob_gap(
    model_dir: str, quant_format: str, *, num_prompts: int = 64, num_samples: int = 8, seed: int = 0
) -> dict:
    """The W4A4-vs-W4A16 logprob gap of the testbed organism quantized to `quant_format`, on completions sampled at
    T 1.0 (the rollout setting) from the W4A16 model (the policy the CPU engine serves) for the first `num_prompts`
    test questions, `num_samples` each."""
    from transformers import AutoTokenizer

    from qerl_repro.quantization.base import load_base_model
    from qerl_repro.testbed import MAX_NEW_TOKENS, load_split

    if quant_format not in W4A4_FORMATS:
        raise UserError(f"--quant_format {quant_format!r}: W4A4 needs one of {list(W4A4_FORMATS)}.")
    if not os.path.isdir(model_dir):
        raise UserError(f"--model {model_dir!r} is not a folder (build the organism with `make testbed`).")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_base_model(model_dir, quant_format, dtype=torch.float32).eval()
    prompts = list(load_split("test", limit=num_prompts)["prompt"])
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad(), activation_quant(model, False):
        out = model.generate(
            **batch,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            num_return_sequences=num_samples,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    prompt_len = batch["input_ids"].shape[1]
    completion = out[:, prompt_len:]
    # Completion tokens up to and including the first EOS (as TRL's completion_mask).
    is_eos = completion == tokenizer.eos_token_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], completion.shape[1]))
    completion_mask = (torch.arange(completion.shape[1]).unsqueeze(0) <= first_eos.unsqueeze(1)).long()
    prompt_mask = batch["attention_mask"].repeat_interleave(num_samples, dim=0)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    stats = activation_quant_logprob_gap(model, out, attention_mask, completion_mask)
    return {
        "model": model_dir,
        "quant_format": quant_format,
        "compared": "W4A4 (FP4 activations, the trainer with quant_activations) vs W4A16 (bf16/fp32 activations, "
        "the CPU rollout engine's numerics), fp32 compute, same sampled tokens",
        "num_prompts": num_prompts,
        "num_samples": num_samples,
        "temperature": 1.0,
        "seed": seed,
        **stats,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="data/testbed/adder3", help="the testbed organism folder")
    parser.add_argument("--quant_format", default="nvfp4", choices=list(W4A4_FORMATS))
    parser.add_argument("--num_prompts", type=int, default=64)
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the result JSON here")
    args = parser.parse_args(argv)
    result = testbed_logprob_gap(
        args.model, args.quant_format, num_prompts=args.num_prompts, num_samples=args.num_samples, seed=args.seed
    )
    text = json.dumps(result, indent=2)
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text + "\n")
    sys.stdout.write(text + "\n")
    return result


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
