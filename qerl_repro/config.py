# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""`QeRLConfig`: TRL's `GRPOConfig` plus the quantization and Adaptive Quantization Noise (AQN) fields of QeRL."""

import logging
from dataclasses import dataclass, field

from trl import GRPOConfig


logger = logging.getLogger(__name__)


QUANT_FORMATS = ("none", "nvfp4", "mxfp4", "nf4")
AQN_SCHEDULES = ("qerl_code", "paper")
AQN_DECAYS = ("exponential", "linear", "cosine")
AQN_VARIANTS = ("weight", "activation")
HW_ERROR_WHERE = ("train", "rollout", "both")
ADAPTER_SYNC_MODES = ("auto", "unmerged", "merged")


@dataclass
class QeRLConfig(GRPOConfig):
    r"""
    Configuration class for [`QeRLTrainer`]: every [`~trl.GRPOConfig`] parameter, plus the fields below. Only the new
    parameters are documented here; see [QeRL](https://huggingface.co/papers/2510.11696) §3.2-3.3.

    New Parameters:

        > Parameters that control quantization

        quant_format (`str`, *optional*, defaults to `"none"`):
            Format of the frozen base model: `"none"` (the model as loaded), `"nvfp4"` (blocks of 16, E4M3 block scale
            and FP32 per-tensor scale), `"mxfp4"` (blocks of 32, E8M0 block scale) or `"nf4"` (bitsandbytes QLoRA). The
            trainer quantizes a high-precision model itself; the weights are stored packed in 4 bits and dequantized
            per forward. `lm_head`, embeddings and norms stay in high precision.
        mxfp4_scale_mode (`str`, *optional*, defaults to `"even"`):
            How MXFP4 picks its E8M0 block scale: `"even"` (compressed-tensors / vLLM checkpoints), `"floor"` (OCP spec)
            or `"rceil"`.

        > Parameters that control W4A4 training

        quant_activations (`bool`, *optional*, defaults to `False`):
            W4A4: also fake-quantize the inputs of the frozen 4-bit base layers to `quant_format` in the training
            forward, with a straight-through estimator (NVFP4 / MXFP4 bases only). LoRA's inputs stay in high precision,
            as on W4A4 hardware. The CPU rollout engine still runs W4A16 (see `qerl_repro.w4a4`).
        vllm_quant_activations (`bool`, *optional*, defaults to `False`):
            With `quant_activations`: emulate W4A4 in the colocated vLLM engine too (the same FP4 fake quantization on
            the inputs of its Linear layers), so rollouts come from the policy being trained. Needs an eager engine
            with the merged sync (the CPU defaults); vLLM's own W4A4 FP4 kernels need Blackwell GPUs.

        > Parameters that control adaptive quantization noise (AQN)

        aqn (`bool`, *optional*, defaults to `False`):
            Whether to add Gaussian noise to the rollout engine's RMSNorm weights after every weight sync (QeRL §3.3).
            Only allowed on a quantized base unless `aqn_allow_unquantized=True`.
        aqn_sigma_start (`float`, *optional*, defaults to `1e-2`):
            Noise standard deviation of the first noisy stage (paper Table 4).
        aqn_sigma_end (`float`, *optional*, defaults to `5e-4`):
            Noise standard deviation of the last stage (paper Table 4).
        aqn_num_stages (`int`, *optional*, defaults to `10`):
            Number of stages K over the total optimizer steps; stage 0 adds no noise.
        aqn_schedule (`str`, *optional*, defaults to `"qerl_code"`):
            `"qerl_code"`: the decay of QeRL's released code (exponent denominator K-2, reaches `aqn_sigma_end`);
            `"paper"`: Eq. 8 of the paper (denominator K-1).
        aqn_seed (`int` or `None`, *optional*, defaults to `None`):
            Seed of the private noise generator (noise is drawn from `(aqn_seed, step)`); `None` uses `seed`.
        aqn_include_final_norm (`bool`, *optional*, defaults to `False`):
            Also perturb the final norm before `lm_head` (QeRL's class filter would have included it).
        aqn_include_qk_norm (`bool`, *optional*, defaults to `False`):
            Also perturb Qwen3-style per-head `q_norm` / `k_norm`.
        aqn_allow_unquantized (`bool`, *optional*, defaults to `False`):
            Allow AQN on a high-precision base (the BF16 + AQN ablation requested in QeRL issue #11).
        train_norms (`bool`, *optional*, defaults to `False`):
            Also train the RMSNorm weights of every decoder block (QeRL's `--ln True`: PEFT `modules_to_save` for
            `input_layernorm` and the MLP-input norm). They are kept in fp32 (the norm's output is cast back to its
            input dtype), synced to the rollout engine at every step, and AQN is added on top of the trained values.

        > Parameters that control RIN (SRDD-guided per-block AQN, `qerl_repro.rin`)

        aqn_rin (`str`, *optional*, defaults to `"none"`):
            `"none"`: plain AQN. `"targeted"`: noise only on chosen blocks (`aqn_rin_blocks`, else the
            `aqn_rin_top_k` worst blocks of the SRDD scan, else the blocks it flagged). `"variable"`: each block's
            sigma times a multiplier proportional to its SRDD error, averaging 1 over the blocks. Needs `aqn=True`.
        aqn_rin_srdd (`str` or `None`, *optional*, defaults to `None`):
            SRDD JSON of the base model (`python -m qerl_repro.srdd --output PATH`); required by RIN (the blocks'
            errors and their number, checked against the model).
        aqn_rin_blocks (`list[int]` or `None`, *optional*, defaults to `None`):
            Targeted RIN: the decoder blocks whose norms get noise.
        aqn_rin_top_k (`int` or `None`, *optional*, defaults to `None`):
            Targeted RIN: noise on the k blocks with the highest SRDD error.
        aqn_rin_min (`float` or `None`, *optional*, defaults to `None`):
            Variable RIN: lowest multiplier (<= 1); the multipliers still average 1.
        aqn_rin_max (`float` or `None`, *optional*, defaults to `None`):
            Variable RIN: highest multiplier (>= 1); the multipliers still average 1.
        > Parameters that control AQN variants and the hardware-error simulation (seed studies, issue 11)

        aqn_decay (`str`, *optional*, defaults to `"exponential"`):
            Curve of sigma through the K stages: `"exponential"` (QeRL), `"linear"` or `"cosine"` (the paper's Fig. 9
            ablation); same stages, 0 in stage 0, `aqn_sigma_start` in stage 1 (`qerl_repro.noise.aqn_sigma`).
        aqn_epoch_aware (`bool`, *optional*, defaults to `False`):
            Run the whole schedule (warm-up stage and decay) once per epoch, over the Trainer's optimizer steps per
            epoch, instead of once over `max_steps` (the seed studies' epoch-aware schedule;
            `qerl_repro.noise.aqn_epoch_step`).
        aqn_variant (`str`, *optional*, defaults to `"weight"`):
            `"weight"`: QeRL's noise on the rollout engine's RMSNorm weights (one draw per step). `"activation"`: the
            seed studies' variant, Gaussian noise added to the hidden state after each targeted RMSNorm, fresh for
            every token and forward pass of the rollouts (`qerl_repro.activation_noise`; needs an eager engine and
            colocate mode).
        hw_error (`float`, *optional*, defaults to `0.0`):
            Relative std `eps` of the simulated hardware error on the decoder blocks' Linear outputs, `y + eps * |y| *
            z` (e.g. `5e-2`, the seed studies' 5 %); 0 disables it (`qerl_repro.hardware_noise`).
        hw_error_where (`str`, *optional*, defaults to `"both"`):
            Where the hardware error acts: `"train"` (the trainer's policy forwards), `"rollout"` (generation) or
            `"both"`.

        > Parameters that control how the rollout engine receives the policy

        vllm_adapter_sync (`str`, *optional*, defaults to `"auto"`):
            `"unmerged"`: the engine keeps the (dequantized, or on GPUs FP4-exported) base and receives the LoRA adapter
            at every sync as a new vLLM `LoRARequest`, as QeRL served it: no update is lost to rounding. `"merged"`:
            TRL's way, `base + B @ A` merged (in fp32, then cast to the engine dtype) into the engine's weights; fast,
            but in a bf16 engine every update element below half a bf16 step of its weight is lost (watch
            `sync/update_lost_frac`). `"auto"`, chosen by measurement: unmerged in colocate mode on GPUs; on vLLM's CPU
            backend (slow LoRA kernels) merged into a float32 engine (`vllm_dtype` defaults to `"float32"` there), which
            holds the fp32 merge exactly; merged in server mode (TRL's server client has no LoRA path).
        vllm_dtype (`str` or `None`, *optional*, defaults to `None`):
            dtype of the colocated vLLM engine (`"bfloat16"`, `"float32"`, ...); `None` keeps vLLM's choice (the
            checkpoint's dtype). A float32 engine makes the merged sync lossless, at the cost of fp32 kernels.
        sync_fidelity_rows (`int`, *optional*, defaults to `64`):
            Rows sampled per probed layer (o_proj and down_proj of the first, middle and last blocks) for the
            `sync/update_lost_frac` metric logged at every step; 0 disables it.
        vllm_enforce_eager (`bool` or `None`, *optional*, defaults to `None`):
            Run the colocated vLLM engine eagerly (no torch.compile / CUDA graphs). `None`: eager on vLLM's CPU backend
            (compiled graphs recompiled as shapes changed and ran slower there), compiled elsewhere. Forced eager when
            the engine carries noise hooks (`aqn_variant="activation"`, or `hw_error` on the rollout).
        vllm_importance_sampling_correction (`bool`, *optional*, defaults to `False`):
            Overrides TRL's default (`True`): QeRL trained without a vLLM importance-sampling correction, which would
            partly undo the effect of the rollout noise on the gradient.
    """

    # Parameters that control quantization
    quant_format: str = field(
        default="none",
        metadata={
            "help": "Format of the frozen base model.",
            "choices": list(QUANT_FORMATS),
        },
    )
    mxfp4_scale_mode: str = field(
        default="even",
        metadata={"help": "How MXFP4 picks its E8M0 block scale.", "choices": ["even", "floor", "rceil"]},
    )

    # Parameters that control W4A4 training
    quant_activations: bool = field(
        default=False,
        metadata={
            "help": "W4A4: also fake-quantize the inputs of the frozen 4-bit base layers (STE; NVFP4 / MXFP4 only)."
        },
    )
    vllm_quant_activations: bool = field(
        default=False,
        metadata={
            "help": "With quant_activations: emulate W4A4 in the colocated vLLM engine too (eager, merged sync)."
        },
    )

    # Parameters that control adaptive quantization noise (AQN)
    aqn: bool = field(
        default=False,
        metadata={"help": "Whether to add Gaussian noise to the rollout engine's RMSNorm weights after every sync."},
    )
    aqn_sigma_start: float = field(
        default=1e-2, metadata={"help": "Noise standard deviation of the first noisy stage."}
    )
    aqn_sigma_end: float = field(default=5e-4, metadata={"help": "Noise standard deviation of the last stage."})
    aqn_num_stages: int = field(default=10, metadata={"help": "Number of stages K; stage 0 adds no noise."})
    aqn_schedule: str = field(
        default="qerl_code",
        metadata={"help": "Decay of QeRL's code (K-2) or of the paper's Eq. 8 (K-1).", "choices": list(AQN_SCHEDULES)},
    )
    aqn_seed: int | None = field(
        default=None, metadata={"help": "Seed of the private noise generator; `None` uses `seed`."}
    )
    aqn_include_final_norm: bool = field(default=False, metadata={"help": "Also perturb the final norm."})
    aqn_include_qk_norm: bool = field(default=False, metadata={"help": "Also perturb Qwen3-style q_norm / k_norm."})
    aqn_allow_unquantized: bool = field(
        default=False, metadata={"help": "Allow AQN on a high-precision base (BF16 + AQN ablation)."}
    )
    train_norms: bool = field(
        default=False,
        metadata={"help": "Also train the decoder blocks' RMSNorm weights (QeRL's --ln), kept in fp32."},
    )

    # RIN: SRDD-guided per-block AQN multipliers (qerl_repro.rin)
    aqn_rin: str = field(
        default="none",
        metadata={
            "help": "RIN mode: none (plain AQN), targeted or variable.",
            "choices": ["none", "targeted", "variable"],
        },
    )
    aqn_rin_srdd: str | None = field(
        default=None, metadata={"help": "SRDD JSON of the base model (python -m qerl_repro.srdd --output PATH)."}
    )
    aqn_rin_blocks: list[int] | None = field(
        default=None, metadata={"help": "Targeted RIN: the decoder blocks whose norms get noise."}
    )
    aqn_rin_top_k: int | None = field(
        default=None, metadata={"help": "Targeted RIN: noise on the k blocks with the highest SRDD error."}
    )
    aqn_rin_min: float | None = field(
        default=None, metadata={"help": "Variable RIN: lowest multiplier (<= 1); the multipliers still average 1."}
    )
    aqn_rin_max: float | None = field(
        default=None, metadata={"help": "Variable RIN: highest multiplier (>= 1); the multipliers still average 1."}
    )

    # Parameters that control AQN variants and the hardware-error simulation (seed studies, issue 11)
    aqn_decay: str = field(
        default="exponential",
        metadata={"help": "Curve of sigma through the K stages.", "choices": list(AQN_DECAYS)},
    )
    aqn_epoch_aware: bool = field(
        default=False, metadata={"help": "Run the whole AQN schedule once per epoch instead of once over max_steps."}
    )
    aqn_variant: str = field(
        default="weight",
        metadata={
            "help": "Noise on the rollout engine's RMSNorm weights (QeRL) or on the hidden state after them (seeds).",
            "choices": list(AQN_VARIANTS),
        },
    )
    hw_error: float = field(
        default=0.0,
        metadata={"help": "Relative std of the simulated hardware error on Linear outputs; 0 disables it."},
    )
    hw_error_where: str = field(
        default="both",
        metadata={"help": "Where the hardware error acts.", "choices": list(HW_ERROR_WHERE)},
    )

    # Parameters that control how the rollout engine receives the policy
    vllm_adapter_sync: str = field(
        default="auto",
        metadata={
            "help": "How the vLLM engine gets the LoRA policy: unmerged adapter (QeRL), merged weights (TRL), or auto "
            "(unmerged in colocate mode on GPUs, merged into a float32 engine on vLLM's CPU backend, merged in server "
            "mode).",
            "choices": list(ADAPTER_SYNC_MODES),
        },
    )
    vllm_dtype: str | None = field(
        default=None, metadata={"help": "dtype of the colocated vLLM engine; None: vLLM's choice (checkpoint dtype)."}
    )
    sync_fidelity_rows: int = field(
        default=64, metadata={"help": "Rows sampled per probed layer for sync/update_lost_frac; 0 disables it."}
    )
    vllm_enforce_eager: bool | None = field(
        default=None, metadata={"help": "Run the colocated vLLM engine eagerly; None: eager on CPU only."}
    )
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={"help": "Whether to apply TRL's vLLM importance-sampling correction (QeRL had none)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.quant_format not in QUANT_FORMATS:
            raise ValueError(f"quant_format={self.quant_format!r} is not one of {list(QUANT_FORMATS)}.")
        if self.mxfp4_scale_mode not in ("even", "floor", "rceil"):
            raise ValueError(f"mxfp4_scale_mode={self.mxfp4_scale_mode!r} is not one of ['even', 'floor', 'rceil'].")
        if self.quant_activations and self.quant_format not in ("nvfp4", "mxfp4"):
            raise ValueError(
                f"quant_activations=True needs quant_format 'nvfp4' or 'mxfp4' (FP4 activations into FP4 GEMMs), got "
                f"quant_format={self.quant_format!r}."
            )
        if self.vllm_quant_activations and not (
            self.quant_activations and self.use_vllm and self.vllm_mode == "colocate"
        ):
            raise ValueError(
                "vllm_quant_activations=True emulates W4A4 in the colocated vLLM engine: it needs quant_activations=True, "
                "use_vllm=True and vllm_mode='colocate'."
            )
        if self.aqn_schedule not in AQN_SCHEDULES:
            raise ValueError(f"aqn_schedule={self.aqn_schedule!r} is not one of {list(AQN_SCHEDULES)}.")
        for name in ("aqn_sigma_start", "aqn_sigma_end"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name}={value!r} must be a positive float (a noise standard deviation).")
        if self.aqn_num_stages < 3:
            raise ValueError(
                f"aqn_num_stages={self.aqn_num_stages} must be >= 3 (one noise-free stage and a decay over K-2 steps)."
            )
        self._check_noise_variants()
        if self.vllm_adapter_sync not in ADAPTER_SYNC_MODES:
            raise ValueError(f"vllm_adapter_sync={self.vllm_adapter_sync!r} is not one of {list(ADAPTER_SYNC_MODES)}.")
        if self.vllm_adapter_sync == "unmerged" and self.use_vllm and self.vllm_mode != "colocate":
            raise ValueError(
                "vllm_adapter_sync='unmerged' needs vllm_mode='colocate' (TRL's vLLM server client has no LoRA "
                "path); use 'merged' or 'auto' in server mode."
            )
        if self.sync_fidelity_rows < 0:
            raise ValueError(f"sync_fidelity_rows={self.sync_fidelity_rows} must be >= 0 (0 disables the metric).")
        if self.aqn and self.quant_format == "none" and not self.aqn_allow_unquantized:
            raise ValueError(
                "aqn=True with quant_format='none': QeRL adds noise only on a quantized base. Pick a quant_format "
                "('nvfp4', 'mxfp4', 'nf4') or set aqn_allow_unquantized=True for the BF16 + AQN ablation."
            )
        self._validate_rin()
        from transformers.integrations import is_deepspeed_zero3_enabled

        problem = zero3_incompatibility(self, zero3=is_deepspeed_zero3_enabled())
        if problem:
            raise ValueError(problem)

    def _validate_rin(self) -> None:
        """RIN: a known mode, on top of AQN, with options that fit the mode and an SRDD JSON that loads and yields
        multipliers (the same pure computation the trainer repeats; the block count is checked against the model
        there)."""
        from qerl_repro.rin import RIN_MODES, rin_plan_from_config

        if self.aqn_rin not in RIN_MODES:
            raise ValueError(f"aqn_rin={self.aqn_rin!r} is not one of {list(RIN_MODES)}.")
        options = ("aqn_rin_srdd", "aqn_rin_blocks", "aqn_rin_top_k", "aqn_rin_min", "aqn_rin_max")
        if self.aqn_rin == "none":
            stray = [name for name in options if getattr(self, name) is not None]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} set but aqn_rin='none': choose aqn_rin='targeted' or 'variable'."
                )
            return
        if not self.aqn:
            raise ValueError(f"aqn_rin={self.aqn_rin!r} scales AQN's noise per block: it needs aqn=True.")
        if self.aqn_rin_srdd is None:
            raise ValueError(
                f"aqn_rin={self.aqn_rin!r} needs aqn_rin_srdd, the base model's SRDD JSON (python -m qerl_repro.srdd "
                "--model <model> --format <format> --output PATH): it gives the blocks' errors and their number."
            )
        plan = rin_plan_from_config(self)
        if plan.srdd_format is not None and self.quant_format not in ("none", plan.srdd_format):
            logger.warning(
                "aqn_rin_srdd=%s scanned %s, but quant_format=%r: the multipliers follow the other format's errors.",
                self.aqn_rin_srdd,
                plan.srdd_format,
                self.quant_format,
            )

    def _check_noise_variants(self) -> None:
        if self.aqn_decay not in AQN_DECAYS:
            raise ValueError(f"aqn_decay={self.aqn_decay!r} is not one of {list(AQN_DECAYS)}.")
        if self.aqn_variant not in AQN_VARIANTS:
            raise ValueError(f"aqn_variant={self.aqn_variant!r} is not one of {list(AQN_VARIANTS)}.")
        if self.hw_error_where not in HW_ERROR_WHERE:
            raise ValueError(f"hw_error_where={self.hw_error_where!r} is not one of {list(HW_ERROR_WHERE)}.")
        if isinstance(self.hw_error, bool) or not (0.0 <= self.hw_error < float("inf")):
            raise ValueError(f"hw_error={self.hw_error!r} must be a finite float >= 0 (0 disables it).")
        hooks = []
        if self.aqn and self.aqn_variant == "activation":
            hooks.append("aqn_variant='activation'")
        if self.hw_error > 0 and self.hw_error_where in ("rollout", "both"):
            hooks.append(f"hw_error with hw_error_where={self.hw_error_where!r}")
        if hooks and self.use_vllm and self.vllm_mode != "colocate":
            raise ValueError(
                f"{' and '.join(hooks)} put forward hooks on the rollout engine's modules, which only a colocated engine "
                "exposes: use vllm_mode='colocate' (the vLLM server's worker extension supports the weight variant only)."
            )
        if hooks and self.use_vllm and self.vllm_enforce_eager is False:
            raise ValueError(
                f"{' and '.join(hooks)} need an eager vLLM engine (forward hooks are not run inside compiled graphs or "
                "CUDA graphs): leave vllm_enforce_eager unset (None) or set it to True."
            )

    @property
    def rollout_engine_hooks(self) -> bool:
        """Whether the rollout engine carries forward hooks (activation AQN or rollout hardware error): it runs eager."""
        return (self.aqn and self.aqn_variant == "activation") or (
            self.hw_error > 0 and self.hw_error_where in ("rollout", "both")
        )

    @property
    def aqn_noise_seed(self) -> int:
        return self.seed if self.aqn_seed is None else self.aqn_seed


def zero3_incompatibility(args: QeRLConfig, *, zero3: bool) -> str | None:
    """Why `args` cannot run under DeepSpeed ZeRO-3 (None if it can). ZeRO-3 partitions every weight across the ranks
    (with `zero3_init_flag`, already while the model loads): a 4-bit base would be quantized from empty shards, and AQN
    on HF generate would write into one rank's shard while reporting every norm noised. The vLLM engine holds whole
    weights, so full fine-tuning and BF16 LoRA with vLLM rollouts (AQN included) are fine."""
    if not zero3:
        return None
    if args.quant_format != "none":
        return (
            f"quant_format={args.quant_format!r} cannot run under DeepSpeed ZeRO-3: it partitions the weights while the "
            "model loads, so the base would be quantized from empty shards. Use accelerate_configs/deepspeed_zero2.yaml "
            "(the frozen 4-bit base is replicated; ZeRO-2 partitions the optimizer state and gradients) or multi_gpu.yaml."
        )
    if args.aqn and not args.use_vllm:
        return (
            "AQN with HF generate (use_vllm=False) cannot run under DeepSpeed ZeRO-3: each rank holds a shard of every "
            "norm, so the noise would land on shards only. Use vLLM rollouts (use_vllm=True) or ZeRO-2."
        )
    return None
