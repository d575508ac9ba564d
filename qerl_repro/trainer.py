# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""`QeRLTrainer`: TRL's `GRPOTrainer` on a 4-bit base with Adaptive Quantization Noise in the rollout engine.

What it adds to `GRPOTrainer` (everything else is TRL's):
- the base is quantized by the trainer when `args.quant_format != "none"` (NVFP4 / MXFP4 packed, or NF4 via bnb);
- every vLLM weight sync sends `dequant(W_q) + LoRA delta` computed out of place in fp32 (`weight_sync.py`), so the
  frozen base stays bit-identical, and on vLLM's CPU backend the packed GEMMs are refreshed (`vllm_cpu.py`);
- right after every sync (all of TRL's call sites go through `VLLMGeneration.sync_weights`), AQN sets the engine's
  targeted RMSNorm weights to `clean + N(0, sigma(step)^2)`; with HF `generate` the noise lives only during generation;
- `aqn/sigma`, `aqn/stage` and `aqn/num_noised_modules` are added to every training log.
"""

import functools
import json
import logging
import textwrap
from contextlib import contextmanager, nullcontext

import torch
import trl.trainer.grpo_trainer as grpo_trainer_module
from accelerate.utils import is_peft_model
from trl import GRPOTrainer
from trl.generation.vllm_generation import VLLMGeneration

from qerl_repro.config import QeRLConfig
from qerl_repro.noise import aqn_noised, aqn_sigma, aqn_stage, find_norm_weights, require_norm_targets
from qerl_repro.weight_sync import iter_rollout_weights


logger = logging.getLogger(__name__)


def _has_quantized_linear(model: torch.nn.Module) -> bool:
    from qerl_repro.quantization.linear import is_quantized_linear

    return any(is_quantized_linear(module) for module in model.modules())


@contextmanager
def _engine_build_overrides(enforce_eager: bool):
    """Adjust the `LLM(...)` that TRL's `VLLMGeneration._init_vllm` builds, for the duration of the call:

    - vLLM loads the high-precision checkpoint and receives dequantized weights, so TRL must not ask it for in-flight
      bitsandbytes quantization when the training base is NF4;
    - `enforce_eager` (TRL has no option for it): on vLLM's CPU backend the compiled graph recompiles as shapes change
      and was about 2x slower than eager in our measurements.
    """
    import trl.generation.vllm_generation as module

    original_bnb, original_llm = module.is_bitsandbytes_available, module.LLM
    module.is_bitsandbytes_available = lambda: False
    if enforce_eager:
        module.LLM = functools.partial(original_llm, enforce_eager=True)
    try:
        yield
    finally:
        module.is_bitsandbytes_available, module.LLM = original_bnb, original_llm


class QeRLVLLMGeneration(VLLMGeneration):
    """TRL's vLLM backend with the out-of-place LoRA merge, the vLLM-CPU repack and a post-sync hook."""

    post_sync_hook = None  # set by QeRLTrainer: called on every rank after every sync
    enforce_eager = None  # set by QeRLTrainer from `vllm_enforce_eager` (None: eager on CPU only)

    def _init_vllm(self):
        enforce_eager = False
        if self.mode == "colocate":
            from qerl_repro.vllm_cpu import is_vllm_cpu_platform, keep_cpu_linear_weights

            keep_cpu_linear_weights()
            enforce_eager = is_vllm_cpu_platform() if self.enforce_eager is None else self.enforce_eager
        with _engine_build_overrides(enforce_eager):
            super()._init_vllm()

    @property
    def engine_model(self) -> torch.nn.Module:
        """The in-process vLLM model (colocate mode), the object TRL's own sync writes into."""
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    def _iter_named_params(self):
        if self._dist.is_fsdp:
            if _has_quantized_linear(self.model):
                raise NotImplementedError("FSDP with a quantized base is not supported; use DeepSpeed ZeRO or DDP.")
            yield from super()._iter_named_params()
            return
        if not is_peft_model(self.model) and not _has_quantized_linear(self.model):
            yield from super()._iter_named_params()
            return
        with self._dist.gather_params(list(self.model.parameters())):
            yield from iter_rollout_weights(self.model)

    def sync_weights(self):
        super().sync_weights()
        if self.mode == "colocate":
            from qerl_repro.vllm_cpu import is_vllm_cpu_platform, repack_cpu_linear_weights

            if is_vllm_cpu_platform():
                repack_cpu_linear_weights(self.engine_model)
        if self.post_sync_hook is not None:
            self.post_sync_hook()


def ddp_ignore_quantized_buffers_(model: torch.nn.Module) -> list[str]:
    """Exclude the packed 4-bit base buffers from DDP's start-up broadcast (gloo cannot send float8 scales, and the
    frozen base is quantized identically on every rank). Returns the ignored names."""
    from qerl_repro.quantization.linear import is_quantized_linear

    names = [
        f"{module_name}.{buffer_name}"
        for module_name, module in model.named_modules()
        if is_quantized_linear(module)
        for buffer_name in module._buffers
    ]
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = existing + [n for n in names if n not in existing]
    return names


@contextmanager
def _vllm_generation_class(cls):
    """GRPOTrainer.__init__ builds `VLLMGeneration` from its module globals: build ours instead."""
    original = grpo_trainer_module.VLLMGeneration
    grpo_trainer_module.VLLMGeneration = cls
    try:
        yield
    finally:
        grpo_trainer_module.VLLMGeneration = original


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextmanager
def _quiet_model_init_kwargs_warning(loaded_here: bool):
    """GRPOTrainer warns that `model_init_kwargs` "will be ignored" when given a model instance. When QeRLTrainer
    loaded the (quantized) base from a path itself, it did use them: drop that one misleading message."""
    if not loaded_here:
        yield
        return
    grpo_logger = logging.getLogger(grpo_trainer_module.__name__)
    message_filter = _DropMessages("You passed `model_init_kwargs` to the `GRPOConfig`, but your model is already")
    grpo_logger.addFilter(message_filter)
    try:
        yield
    finally:
        grpo_logger.removeFilter(message_filter)


def prepare_base_model(model, args: QeRLConfig):
    """Return the model GRPOTrainer should train: quantized to `args.quant_format` unless it already is."""
    if args.quant_format == "none":
        return model
    from qerl_repro.quantization.base import load_base_model, quantize_model_

    if isinstance(model, str):
        init_kwargs = dict(args.model_init_kwargs or {})
        dtype = init_kwargs.pop("dtype", "float32")
        dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        return load_base_model(model, args.quant_format, dtype=dtype, **init_kwargs)
    if _has_quantized_linear(model) or getattr(model, "is_loaded_in_4bit", False):
        return model
    if args.quant_format == "nf4":
        raise ValueError(
            "quant_format='nf4' needs the model path (bitsandbytes quantizes at load time): pass "
            f"model={getattr(model, 'name_or_path', '<path>')!r} as a string."
        )
    quantize_model_(model, args.quant_format, mxfp4_scale_mode=args.mxfp4_scale_mode)
    return model


class QeRLTrainer(GRPOTrainer):
    """GRPO on a 4-bit base with Adaptive Quantization Noise (QeRL). Takes `GRPOTrainer`'s arguments and a
    [`QeRLConfig`]; see the module docstring for what it adds."""

    _tag_names = ["trl", "grpo", "qerl"]
    _name = "QeRL"
    _paper = {
        "title": "QeRL: Beyond Efficiency -- Quantization-enhanced Reinforcement Learning for LLMs",
        "id": "2510.11696",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{huang2025qerl,
                title        = {{QeRL: Beyond Efficiency -- Quantization-enhanced Reinforcement Learning for LLMs}},
                author       = {Wei Huang and Yi Ge and Shuai Yang and Yicheng Xiao and Huizi Mao and Yujun Lin and Hanrong Ye and Sifei Liu and Ka Chun Cheung and Hongxu Yin and Yao Lu and Xiaojuan Qi and Song Han and Yukang Chen},
                year         = 2025,
                eprint       = {arXiv:2510.11696},
            }"""),
    }

    def __init__(self, model, reward_funcs=None, args: QeRLConfig | None = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = QeRLConfig(f"{str(name).split('/')[-1]}-QeRL")
        if not isinstance(args, QeRLConfig):
            raise TypeError(f"QeRLTrainer needs a QeRLConfig, got {type(args).__name__}.")
        loaded_here = isinstance(model, str) and args.quant_format != "none"
        model = prepare_base_model(model, args)
        generation_class = type(
            "QeRLVLLMGeneration", (QeRLVLLMGeneration,), {"enforce_eager": args.vllm_enforce_eager}
        )
        with _vllm_generation_class(generation_class), _quiet_model_init_kwargs_warning(loaded_here):
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        ddp_ignore_quantized_buffers_(self.model)
        self._aqn_last = {"aqn/sigma": 0.0, "aqn/stage": 0, "aqn/num_noised_modules": 0}
        self._rollout_noiser = None
        self._hf_norm_targets = None
        if self.use_vllm:
            self.vllm_generation.post_sync_hook = self._apply_aqn_after_sync

    # ---- schedule -------------------------------------------------------------------------------------------------
    def current_aqn_sigma(self) -> tuple[float, int]:
        """`(sigma, stage)` of the current optimizer step (0 when AQN is off or before training starts)."""
        total_steps = self.state.max_steps
        if not self.args.aqn or total_steps <= 0:
            return 0.0, 0
        step = self.state.global_step
        sigma = aqn_sigma(
            step,
            total_steps,
            sigma_start=self.args.aqn_sigma_start,
            sigma_end=self.args.aqn_sigma_end,
            num_stages=self.args.aqn_num_stages,
            schedule=self.args.aqn_schedule,
        )
        return sigma, aqn_stage(step, total_steps, self.args.aqn_num_stages, schedule=self.args.aqn_schedule)

    def _record_aqn(self, sigma: float, stage: int, num_noised: int) -> None:
        self._aqn_last = {"aqn/sigma": sigma, "aqn/stage": stage, "aqn/num_noised_modules": num_noised}

    # ---- vLLM rollouts: noise after every sync ---------------------------------------------------------------------
    def _apply_aqn_after_sync(self) -> None:
        if not self.args.aqn:
            return
        sigma, stage = self.current_aqn_sigma()
        seed, step = self.args.aqn_noise_seed, self.state.global_step
        if self.vllm_generation.mode == "colocate":
            if self._rollout_noiser is None:
                from qerl_repro.vllm_worker import RolloutNormNoiser

                self._rollout_noiser = RolloutNormNoiser(
                    self.vllm_generation.engine_model,
                    include_final_norm=self.args.aqn_include_final_norm,
                    include_qk_norm=self.args.aqn_include_qk_norm,
                    description="vLLM rollout engine (colocate)",
                )
            num_noised = self._rollout_noiser.apply(sigma, seed=seed, step=step)
            self.vllm_generation.llm.reset_prefix_cache()
        else:
            num_noised = self._apply_aqn_on_server(sigma, seed, step)
        self._record_aqn(sigma, stage, num_noised)

    def _apply_aqn_on_server(self, sigma: float, seed: int, step: int) -> int:
        from qerl_repro.vllm_worker import AQN_RPC_METHOD

        num_noised = 0
        if self.accelerator.is_main_process:
            client = self.vllm_generation.vllm_client
            payload = {
                "sigma": sigma,
                "seed": seed,
                "step": step,
                "include_final_norm": self.args.aqn_include_final_norm,
                "include_qk_norm": self.args.aqn_include_qk_norm,
            }
            response = client.session.post(
                f"{client.base_url}/collective_rpc",
                json={"method": AQN_RPC_METHOD, "args": [json.dumps(payload)], "kwargs": {}, "timeout": None},
            )
            if response.status_code != 200:
                raise RuntimeError(
                    f"AQN on the vLLM server failed ({response.status_code}: {response.text}). Start the server with "
                    "VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls qerl_repro.vllm_worker.QeRLWorkerExtension."
                )
            results = response.json()["results"]
            num_noised = int(results[0]["num_noised_modules"])
            client.reset_prefix_cache()
        return num_noised

    # ---- generation: HF path noise, and noise-free evaluation --------------------------------------------------------
    def _generate_single_turn(self, *args, **kwargs):
        if not self.args.aqn:
            return super()._generate_single_turn(*args, **kwargs)
        if self.use_vllm:
            # Evaluation rollouts at a step boundary reuse the step's synced (noised) engine: run them clean.
            evaluating = not self.model.training and self._rollout_noiser is not None
            with self._rollout_noiser.clean_weights() if evaluating else nullcontext():
                return super()._generate_single_turn(*args, **kwargs)
        if not self.model.training:
            return super()._generate_single_turn(*args, **kwargs)
        # HF generate on the training model: noise only while generating, restored bit-exactly afterwards, so the
        # logprob and training forwards are noise-free.
        if self._hf_norm_targets is None:
            targets = find_norm_weights(
                self.accelerator.unwrap_model(self.model),
                include_final_norm=self.args.aqn_include_final_norm,
                include_qk_norm=self.args.aqn_include_qk_norm,
            )
            require_norm_targets(targets, "policy model (HF generate)")
            self._hf_norm_targets = targets
        sigma, stage = self.current_aqn_sigma()
        seed, step = self.args.aqn_noise_seed, self.state.global_step
        with aqn_noised(self._hf_norm_targets, sigma, seed=seed, step=step) as num_noised:
            output = super()._generate_single_turn(*args, **kwargs)
        self._record_aqn(sigma, stage, num_noised)
        return output

    # ---- logging ---------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.args.aqn and self.model.training and "loss" in logs:
            logs.update(self._aqn_last)
        super().log(logs, start_time)
