# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Memory arithmetic of the paper-scale runs: rollout-engine weights and KV cache at QeRL's `vllm_gpu_memory_utilization`
(0.2 for 3B, 0.3 for 7B), and the trainer's weights, for a bf16 vs a 4-bit base; and, per Table 1 row, the GPUs, the
memory per GPU and the rollout GPU-hours of a paper-scale run at the paper's own measured rollout throughput.

    python -m qerl_repro.memory            # the README table (80 GB GPU)
    python -m qerl_repro.memory --plan     # per Table 1 row: GPUs, memory per GPU, rollout GPU-hours

Pure arithmetic from the models' config values (no download). What it leaves out, and says so: activation memory of
training (batch and checkpointing dependent), vLLM's activation/profiling reserve (an assumed 2 GB), CUDA context and
CUDA graphs.
"""

import argparse
from dataclasses import dataclass


GB = 1e9
FORMAT_BITS = {"bf16": 16.0, "nvfp4": 4.0 + 8.0 / 16, "mxfp4": 4.0 + 8.0 / 32, "nf4": 4.0 + 32.0 / 64}
"""Bits per base Linear weight: codes plus block scales (NVFP4: E4M3 per 16; MXFP4: E8M0 per 32; NF4: an absmax per
64, bitsandbytes' double quantization not counted)."""


@dataclass(frozen=True)
class DecoderShape:
    """The config values that set a Qwen2/Llama decoder's parameter count and KV-cache size."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = True  # Qwen2: q/k/v have biases

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def linear_shapes(self) -> list[tuple[int, int]]:
        """`(in, out)` of every Linear of one decoder block (q, k, v, o, gate, up, down)."""
        h, kv, i = self.hidden_size, self.num_key_value_heads * self.head_dim, self.intermediate_size
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    def block_linear_params(self) -> int:
        return self.num_hidden_layers * sum(a * b for a, b in self.linear_shapes())

    def other_params(self) -> int:
        """Embeddings, lm_head (unless tied), norms and q/k/v biases: kept in high precision."""
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        norms = (2 * self.num_hidden_layers + 1) * self.hidden_size
        kv = self.num_key_value_heads * self.head_dim
        biases = self.num_hidden_layers * (self.hidden_size + 2 * kv) if self.attention_bias else 0
        return embed + norms + biases

    def total_params(self) -> int:
        return self.block_linear_params() + self.other_params()

    def lora_params(self, rank: int) -> int:
        """LoRA A and B of rank `rank` on every block Linear (`target_modules="all-linear"`)."""
        return self.num_hidden_layers * sum(rank * (a + b) for a, b in self.linear_shapes())

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes


# Values of the models' config.json on the Hub (Qwen/Qwen2.5-3B-Instruct, Qwen/Qwen2.5-7B-Instruct).
QWEN25_3B = DecoderShape("Qwen2.5-3B-Instruct", 2048, 11008, 36, 16, 2, 151936, tie_word_embeddings=True)
QWEN25_7B = DecoderShape("Qwen2.5-7B-Instruct", 3584, 18944, 28, 28, 4, 152064, tie_word_embeddings=False)


def base_weight_bytes(shape: DecoderShape, base_format: str) -> float:
    """Bytes of the base weights: block Linears in `base_format`, everything else in bf16."""
    return shape.block_linear_params() * FORMAT_BITS[base_format] / 8 + shape.other_params() * 2


def engine_budget(
    shape: DecoderShape,
    base_format: str,
    utilization: float,
    gpu_gb: float = 80.0,
    lora_rank: int = 32,
    reserve_gb: float = 2.0,
) -> dict:
    """Rollout-engine memory at `vllm_gpu_memory_utilization`: weights, the unmerged LoRA slot (bf16, one adapter),
    and what is left for the KV cache, in GB and in cached tokens."""
    weights = base_weight_bytes(shape, base_format)
    lora = shape.lora_params(lora_rank) * 2
    kv = utilization * gpu_gb * GB - weights - lora - reserve_gb * GB
    return {
        "model": shape.name,
        "base": base_format,
        "utilization": utilization,
        "engine_weights_gb": weights / GB,
        "lora_slot_gb": lora / GB,
        "kv_cache_gb": kv / GB,
        "kv_tokens": max(0, int(kv // shape.kv_bytes_per_token())),
    }


def trainer_budget(shape: DecoderShape, base_format: str, lora_rank: int = 32, optimizer_bytes: float = 2.0) -> dict:
    """Trainer-side weights: the frozen base in `base_format`, fp32 LoRA parameters and gradients, optimizer states
    (`optimizer_bytes` per parameter: 2 for `adamw_8bit`, 8 for fp32 AdamW). Activations not included."""
    lora = shape.lora_params(lora_rank)
    return {
        "model": shape.name,
        "base": base_format,
        "base_gb": base_weight_bytes(shape, base_format) / GB,
        "lora_params_m": lora / 1e6,
        "lora_train_state_gb": lora * (4 + 4 + optimizer_bytes) / GB,
    }


def full_finetune_budget(shape: DecoderShape, optimizer_bytes: float = 8.0) -> dict:
    """Trainer-side state of full fine-tuning with fp32 master weights (what `QeRLTrainer` and DeepSpeed's bf16 mode
    keep): fp32 weights, fp32 gradients and `optimizer_bytes` per parameter (8: AdamW's two fp32 moments). Under
    DeepSpeed ZeRO-3 on N GPUs each holds 1/N of it. Activations and the vLLM engine not included."""
    params = shape.total_params()
    return {"model": shape.name, "params_b": params / 1e9, "train_state_gb": params * (4 + 4 + optimizer_bytes) / GB}


ENGINE_FORMAT = {"bf16": "bf16", "nvfp4": "nvfp4", "mxfp4": "mxfp4", "nf4": "bf16"}
"""What our unmerged rollout engine holds for each training base on a GPU: the FP4 bases as compressed-tensors exports
(vLLM's W4A16 kernels), NF4 dequantized to bf16 (QeRL's QLoRA rollouts used vLLM's in-flight bitsandbytes instead)."""


def readme_table(gpu_gb: float = 80.0) -> str:
    rows = [
        "| model | base | vLLM util. | engine weights | LoRA slot | KV cache (tokens) | trainer base | LoRA + grads + adamw_8bit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape, utilization in ((QWEN25_3B, 0.2), (QWEN25_7B, 0.3)):
        for base in ("bf16", "nvfp4", "mxfp4", "nf4"):
            engine = engine_budget(shape, ENGINE_FORMAT[base], utilization, gpu_gb)
            trainer = trainer_budget(shape, base)
            rows.append(
                f"| {shape.name} | {base} | {utilization} | {engine['engine_weights_gb']:.2f} GB | "
                f"{engine['lora_slot_gb']:.2f} GB | {engine['kv_cache_gb']:.1f} GB ({engine['kv_tokens'] / 1e3:.0f}k) | "
                f"{trainer['base_gb']:.2f} GB | {trainer['lora_train_state_gb']:.2f} GB |"
            )
    full = [full_finetune_budget(shape) for shape in (QWEN25_3B, QWEN25_7B)]
    rows.append("")
    rows.append(
        "BF16 full fine-tuning (fp32 master weights and gradients, AdamW): "
        + ", ".join(f"{f['model']} {f['train_state_gb']:.1f} GB" for f in full)
        + " of trainer state before activations and the engine (1/N of it per GPU under ZeRO-3); the 7B one does not fit"
        + f" on one {gpu_gb:.0f} GB GPU."
    )
    return "\n".join(rows)


# QeRL Appendix J, Tables 5 and 6 (reference/qerl.md): rollout tokens/s on one H100 with the LoRA served unmerged, at
# "batch 8", input 256 tokens, up to 2048 generated. No value was published for an MXFP4 engine: NVFP4's stands in.
PAPER_ROLLOUT_TOKENS_PER_S = {
    ("Qwen2.5-3B-Instruct", "bf16"): 2226.3,
    ("Qwen2.5-3B-Instruct", "nvfp4"): 2271.4,
    ("Qwen2.5-7B-Instruct", "bf16"): 1641.1,
    ("Qwen2.5-7B-Instruct", "nvfp4"): 2091.8,
}


def rollout_tokens_per_s(model: str, engine_format: str) -> tuple[float, str]:
    """The paper's rollout throughput for `model` with an `engine_format` engine, and where it comes from."""
    if (model, engine_format) in PAPER_ROLLOUT_TOKENS_PER_S:
        return PAPER_ROLLOUT_TOKENS_PER_S[model, engine_format], "paper"
    return PAPER_ROLLOUT_TOKENS_PER_S[model, "nvfp4"], "NVFP4's: none published"


def rollout_gpu_hours(
    steps: int, completions_per_step: int, mean_completion_tokens: float, tokens_per_s: float
) -> float:
    """GPU-hours of generation for a run: every step samples `completions_per_step` completions. At the paper's
    batch-8 throughput this is an upper bound: a step's 128 completions decode together, which runs faster per token."""
    return steps * completions_per_step * mean_completion_tokens / tokens_per_s / 3600


SHAPES = {shape.name: shape for shape in (QWEN25_3B, QWEN25_7B)}
UTILIZATION = {"Qwen2.5-3B-Instruct": 0.2, "Qwen2.5-7B-Instruct": 0.3}
PLAN_ROWS = {  # Table 1 training row -> (trainer base, LoRA?, AQN?)
    "bf16_full": ("bf16", False),
    "bf16_lora": ("bf16", True),
    "nf4_qlora": ("nf4", True),
    "mxfp4_lora": ("mxfp4", True),
    "nvfp4_lora": ("nvfp4", True),
    "nvfp4_aqn": ("nvfp4", True),
    "bf16_aqn": ("bf16", True),
}


def row_plan(
    model: str,
    row: str,
    *,
    steps: int = 600,
    completions_per_step: int = 128,
    mean_completion_tokens: float = 300.0,
    gpu_gb: float = 80.0,
) -> dict:
    """One paper-scale Table 1 row: GPUs it needs, memory per GPU before training activations (the engine's whole
    `vllm_gpu_memory_utilization` share, the trainer's base, and the trained state: LoRA + grads + adamw_8bit, or full
    fine-tuning's weights and fp32 state split over the fewest GPUs that hold them under ZeRO-3), what is left for
    training activations, and
    rollout GPU-hours at the paper's throughput for the engine the row serves (`ENGINE_FORMAT`: NF4 serves bf16)."""
    shape, utilization = SHAPES[model], UTILIZATION[model]
    base, lora = PLAN_ROWS[row]
    engine_gb = utilization * gpu_gb
    if lora:
        trained_gb = trainer_budget(shape, base)["lora_train_state_gb"]
        trainer_base_gb = base_weight_bytes(shape, base) / GB
        gpus = 1
    else:
        state = full_finetune_budget(shape)["train_state_gb"]
        bf16_copy = base_weight_bytes(shape, "bf16") / GB  # the bf16 compute copy
        gpus = 1
        # ZeRO-3 splits the bf16 copy and the fp32 state over the GPUs (one GPU: no split)
        while engine_gb + (bf16_copy + state) / gpus > gpu_gb:
            gpus *= 2
        trainer_base_gb, trained_gb = bf16_copy / gpus, state / gpus
    tokens_per_s, source = rollout_tokens_per_s(model, ENGINE_FORMAT[base])
    return {
        "model": model,
        "row": row,
        "gpus": gpus,
        "memory_per_gpu_gb": engine_gb + trainer_base_gb + trained_gb,
        "free_for_activations_gb": gpu_gb - engine_gb - trainer_base_gb - trained_gb,
        "engine_gb": engine_gb,
        "trainer_base_gb": trainer_base_gb,
        "trained_state_gb": trained_gb,
        "rollout_tokens_per_s": tokens_per_s,
        "throughput_source": source,
        "rollout_gpu_hours": rollout_gpu_hours(steps, completions_per_step, mean_completion_tokens, tokens_per_s),
    }


def plan_table(mean_completion_tokens: float = 300.0, gpu_gb: float = 80.0) -> str:
    lines = [
        f"Per Table 1 row at the paper's settings (600 steps x 128 completions, a mean of {mean_completion_tokens:.0f} "
        f"generated tokens per completion assumed, {gpu_gb:.0f} GB GPUs). Memory per GPU before training activations; "
        "full fine-tuning spreads over the fewest GPUs that hold it (ZeRO-3); rollout GPU-hours "
        "at the paper's one-H100 batch-8 throughput for the engine the row serves (an upper bound for 128 completions "
        "decoded together; our NF4 arm serves the dequantized bf16 base); training passes are not estimated (the paper "
        "publishes only relative end-to-end speedups). Arithmetic, never run.",
        "",
        "| model | row | GPUs | memory per GPU (engine + trainer base + trained state) | left for activations | "
        "rollout tokens/s | rollout GPU-hours |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in SHAPES:
        for row in PLAN_ROWS:
            p = row_plan(model, row, mean_completion_tokens=mean_completion_tokens, gpu_gb=gpu_gb)
            source = "" if p["throughput_source"] == "paper" else f" ({p['throughput_source']})"
            lines.append(
                f"| {model} | {row} | {p['gpus']} | {p['memory_per_gpu_gb']:.1f} GB ({p['engine_gb']:.0f} + "
                f"{p['trainer_base_gb']:.1f} + {p['trained_state_gb']:.1f}) | {p['free_for_activations_gb']:.1f} GB | "
                f"{p['rollout_tokens_per_s']:.0f}{source} | "
                f"{p['rollout_gpu_hours']:.1f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m qerl_repro.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu_gb", type=float, default=80.0, help="GPU memory in GB (H100: 80)")
    parser.add_argument("--plan", action="store_true", help="per Table 1 row: GPUs, memory per GPU, rollout GPU-hours")
    parser.add_argument(
        "--mean_completion_tokens", type=float, default=300.0, help="assumed mean completion length (--plan)"
    )
    args = parser.parse_args(argv)
    table = plan_table(args.mean_completion_tokens, args.gpu_gb) if args.plan else readme_table(args.gpu_gb)
    print(table)  # noqa: T201
    return table


if __name__ == "__main__":
    main()
