# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""`QeRLTrainer`: TRL's `GRPOTrainer` on a 4-bit base with Adaptive Quantization Noise in the rollout engine.

What it adds to `GRPOTrainer` (everything else is TRL's):
- the base is quantized by the trainer when `args.quant_format != "none"` (NVFP4 / MXFP4 packed, or NF4 via bnb);
- the vLLM engine serves the policy being trained (`vllm_adapter_sync`): in colocate mode the LoRA adapter goes in
  unmerged at every sync as a new `LoRARequest` over the dequantized base (on GPUs with an FP4 base, vLLM's FP4 export of
  it), as QeRL served it; or merged (TRL's way) as `dequant(W_q) + LoRA delta` computed out of place in fp32
  (`weight_sync.py`). On vLLM's CPU backend the packed GEMMs are refreshed after weight writes (`vllm_cpu.py`);
- `train_norms` trains the block RMSNorms beside the adapter (QeRL's `--ln`), in fp32, synced at every step;
- right after every sync (all of TRL's call sites go through `VLLMGeneration.sync_weights`), `sync/update_lost_frac`
  is measured from the engine's own tensors (`sync_fidelity.py`), then AQN sets the engine's targeted RMSNorm weights to
  `clean + N(0, sigma(step)^2)`; with HF `generate` the noise lives only during generation;
- `aqn/sigma`, `aqn/stage`, `aqn/num_noised_modules` and `sync/update_lost_frac` are added to every training log;
- RIN (`aqn_rin`, `qerl_repro.rin`): per-block sigma multipliers from an SRDD JSON, computed once (written to
  `<output_dir>/rin_multipliers.json`, `aqn/rin_*` in every training log), applied in every rollout path.
- AQN variants (`aqn_decay`, `aqn_epoch_aware`, `aqn_variant="activation"`: `qerl_repro.activation_noise`) and the
  hardware-error simulation (`hw_error`, `hw_error_where`: `qerl_repro.hardware_noise`, `hw_error/...` metrics).
"""

import logging
import os
import shutil
import textwrap
from contextlib import contextmanager

import torch
import trl.trainer.grpo_trainer as grpo_trainer_module
from accelerate.utils import is_peft_model
from trl import GRPOTrainer
from trl.generation.vllm_generation import VLLMGeneration, empty_cache

from qerl_repro.config import QeRLConfig
from qerl_repro.noise import (
    aqn_epoch_step,
    aqn_noised,
    aqn_sigma,
    aqn_stage,
    find_norm_modules,
    find_norm_weights,
    require_norm_targets,
)
from qerl_repro.quantization.linear import dequantized_weight
from qerl_repro.rin import norm_multipliers, rin_metrics, rin_plan_from_config
from qerl_repro.sync_fidelity import choose_probe_layers, probe_rows, update_lost_frac
from qerl_repro.weight_sync import (
    iter_rollout_weights,
    iter_trained_extra_weights,
    lora_delta_weight,
    lora_layers,
    save_engine_adapter,
    vllm_max_lora_rank,
)


logger = logging.getLogger(__name__)


def _has_quantized_linear(model: torch.nn.Module) -> bool:
    from qerl_repro.quantization.linear import is_quantized_linear

    return any(is_quantized_linear(module) for module in model.modules())


@contextmanager
def _engine_build_overrides(llm_kwargs: dict):
    """Adjust the `LLM(...)` that TRL's `VLLMGeneration._init_vllm` builds, for the duration of the call:

    - vLLM receives dequantized (or FP4-exported) weights from us, so TRL must not ask it for in-flight bitsandbytes
      quantization when the training base is NF4;
    - `llm_kwargs` (TRL has no option for them) override TRL's arguments: `enforce_eager` (on vLLM's CPU backend the
      compiled graph recompiles as shapes change and was about 2x slower than eager in our measurements), the LoRA
      settings of an engine that serves the adapter unmerged, and the FP4 base export to serve on GPUs.
    """
    import trl.generation.vllm_generation as module

    original_bnb, original_llm = module.is_bitsandbytes_available, module.LLM

    def build_llm(*args, **kwargs):
        return original_llm(*args, **{**kwargs, **llm_kwargs})

    module.is_bitsandbytes_available = lambda: False
    module.LLM = build_llm
    try:
        yield
    finally:
        module.is_bitsandbytes_available, module.LLM = original_bnb, original_llm


def _adapter_scratch_dir() -> str:
    """A private folder for the adapter files handed to vLLM: in RAM (/dev/shm) when the machine has it."""
    import tempfile

    root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="qerl_repro-adapter-", dir=root)


class QeRLVLLMGeneration(VLLMGeneration):
    """TRL's vLLM backend, made to serve the policy being trained:

    - `adapter_sync="unmerged"` (QeRL's engine): the engine keeps the base (pushed once, dequantized; or loaded from
      the FP4 export on GPUs) and receives the LoRA adapter at every sync as a new `LoRARequest` (the previous one is
      removed); trained `modules_to_save` (norms) go in with `load_weights`; every `llm.generate` uses the adapter.
    - `adapter_sync="merged"` (TRL's way): `dequant(W_q) + LoRA delta` merged out of place in fp32, cast to the engine
      dtype; on vLLM's CPU backend the packed GEMMs are refreshed (`vllm_cpu.py`).
    - after every sync: `sync/update_lost_frac` is measured from the engine's own tensors (`sync_fidelity.py`), then
      `post_sync_hook` (AQN) runs.
    """

    post_sync_hook = None  # set by QeRLTrainer: called on every rank after every sync
    enforce_eager = None  # `vllm_enforce_eager` (None: eager on CPU only)
    adapter_sync = "merged"  # resolved `vllm_adapter_sync`
    engine_base_dir = None  # FP4 compressed-tensors export the engine serves (GPU, unmerged), or None
    fidelity_rows = 64  # `sync_fidelity_rows`
    engine_dtype = None  # `vllm_dtype`

    def _init_vllm(self):
        self.serves_adapter_unmerged = self.adapter_sync == "unmerged" and is_peft_model(self.model)
        self.lora_request = None
        self.last_sync_metrics: dict[str, float] = {}
        self._engine_base_loaded = self.engine_base_dir is not None
        self._adapter_dir = None
        self._num_adapters = 0
        self._probes = None
        self._initial_norms = None
        llm_kwargs = {}
        if self.mode == "colocate":
            from qerl_repro.vllm_cpu import is_vllm_cpu_platform, keep_cpu_linear_weights

            keep_cpu_linear_weights()
            llm_kwargs["enforce_eager"] = is_vllm_cpu_platform() if self.enforce_eager is None else self.enforce_eager
            if self.serves_adapter_unmerged:
                rank = max(config.r for config in self.model.peft_config.values())
                llm_kwargs.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(rank), max_loras=1)
            if self.engine_base_dir is not None:
                llm_kwargs.update(model=self.engine_base_dir, tokenizer=self.model.name_or_path)
            if self.engine_dtype is not None:
                llm_kwargs["dtype"] = self.engine_dtype
        with _engine_build_overrides(llm_kwargs):
            super()._init_vllm()
        if self.mode == "colocate" and self.serves_adapter_unmerged:
            self._adapter_dir = _adapter_scratch_dir()
            self._route_generation_through_adapter()

    def _route_generation_through_adapter(self):
        """Every `self.llm.generate` (TRL's rollouts, its eval rollouts, `policy_eval`) gets the current adapter."""
        generate = self.llm.generate

        def generate_with_policy_adapter(*args, **kwargs):
            if kwargs.get("lora_request") is None:
                kwargs["lora_request"] = self.lora_request
            return generate(*args, **kwargs)

        self.llm.generate = generate_with_policy_adapter

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
        # Colocate: the fp32 merge, rounded once by the engine to its dtype. Server: the base dtype (half the bytes).
        merged_dtype = torch.float32 if self.mode == "colocate" else None
        with self._dist.gather_params(list(self.model.parameters())):
            yield from iter_rollout_weights(self.model, merged_dtype=merged_dtype)

    # ---- sync ------------------------------------------------------------------------------------------------------
    def sync_weights(self):
        if self.serves_adapter_unmerged:
            policy_rows = self._sync_unmerged()
        else:
            super().sync_weights()
            if self.mode == "colocate":
                from qerl_repro.vllm_cpu import is_vllm_cpu_platform, repack_cpu_linear_weights

                if is_vllm_cpu_platform():
                    repack_cpu_linear_weights(self.engine_model)
            with self._dist.gather_params(list(self.model.parameters())):
                policy_rows = self._policy_probe_rows()
        self.last_sync_metrics = self._measure_fidelity(policy_rows)
        if self.post_sync_hook is not None:
            self.post_sync_hook()

    def _sync_unmerged(self):
        from vllm.lora.request import LoRARequest

        from qerl_repro.vllm_cpu import is_vllm_cpu_platform, repack_cpu_linear_weights

        if self.enable_sleep_mode:  # level-2 sleep discarded the weights: the base must go in again
            empty_cache()
            self.llm.wake_up(tags=["weights"])
            self._llm_weights_sleeping = False
            self._engine_base_loaded = self.engine_base_dir is not None
        engine = self.engine_model
        self._num_adapters += 1
        folder = os.path.join(self._adapter_dir, f"policy-{self._num_adapters}")
        with self._dist.gather_params(list(self.model.parameters())):
            if not self._engine_base_loaded:
                for name, tensor in iter_rollout_weights(self.model, merge_lora=False):
                    engine.load_weights([(name, tensor)])
                if is_vllm_cpu_platform():
                    repack_cpu_linear_weights(engine)
                self._engine_base_loaded = True
            for name, tensor in iter_trained_extra_weights(self.model):
                engine.load_weights([(name, tensor)])
            save_engine_adapter(self.model, folder)
            policy_rows = self._policy_probe_rows()
        request = LoRARequest(f"qerl-policy-{self._num_adapters}", self._num_adapters, folder)
        self.llm.llm_engine.add_lora(request)
        previous, self.lora_request = self.lora_request, request
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        self.llm.reset_prefix_cache()
        return policy_rows

    def __del__(self):  # the adapter scratch folder lives in RAM: free it with the engine
        if getattr(self, "_adapter_dir", None) is not None:
            shutil.rmtree(self._adapter_dir, ignore_errors=True)

    # ---- sync fidelity ---------------------------------------------------------------------------------------------
    def _policy_probe_rows(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`{layer: (rows, base_rows, delta_rows)}` of the probed LoRA layers (call with the parameters gathered)."""
        if self.fidelity_rows <= 0 or not is_peft_model(self.model):
            return {}
        layers = lora_layers(self.model)
        if self._probes is None:
            names = choose_probe_layers(list(layers))
            if not names:
                logger.warning(
                    "sync/update_lost_frac is not logged: it probes LoRA on o_proj / down_proj (unfused in vLLM), and "
                    "this adapter targets neither."
                )
            self._probes = {
                name: probe_rows(layers[name].get_base_layer().out_features, self.fidelity_rows, seed=index)
                for index, name in enumerate(names)
            }
        result = {}
        for name, rows in self._probes.items():
            layer = layers[name]
            base = dequantized_weight(layer)[rows]
            delta = lora_delta_weight(layer)
            delta = torch.zeros(base.shape) if delta is None else delta[rows].cpu()
            result[name] = (rows, base.cpu(), delta)
        return result

    def _engine_probe_rows(self, name: str, rows: torch.Tensor, base_rows: torch.Tensor, delta_rows: torch.Tensor):
        """The engine's effective weight on `rows` of layer `name`, in fp32."""
        if self.mode != "colocate":
            # Server: the engine holds what was sent, `base_dtype(base + delta)` (a lower bound on the loss when the
            # server's dtype is coarser than the training base's).
            return (base_rows.float() + delta_rows).to(base_rows.dtype).float()
        if self.serves_adapter_unmerged and self.engine_base_dir is not None:
            engine_base = base_rows.float()  # packed FP4 in the engine; the export is checked by its own tests
        else:
            module = self.engine_model.get_submodule(name)
            base_layer = module._modules.get("base_layer", module)
            engine_base = base_layer.weight[rows.to(base_layer.weight.device)].float().cpu()
        if not self.serves_adapter_unmerged:
            return engine_base  # the merged weight
        adapter = self._engine_adapter()
        lora = adapter.get_lora(name) if adapter is not None else None
        if lora is None:
            return engine_base
        scaling = getattr(lora, "scaling", 1.0)  # vLLM folds it into B when loading (then 1)
        b_rows = lora.lora_b[rows.to(lora.lora_b.device)].float().cpu()
        return engine_base + (b_rows @ lora.lora_a.float().cpu()) * scaling

    def _engine_adapter(self):
        """The LoRA model vLLM loaded for the current request (what its slots are filled from)."""
        if self.lora_request is None:
            return None
        manager = self.llm.llm_engine.model_executor.driver_worker.model_runner.lora_manager
        return manager._adapter_manager.get_adapter(self.lora_request.lora_int_id)

    @torch.no_grad()
    def _measure_fidelity(self, policy_rows) -> dict[str, float]:
        metrics = {}
        if policy_rows:
            lost = [
                update_lost_frac(self._engine_probe_rows(name, rows, base, delta), base, delta)
                for name, (rows, base, delta) in policy_rows.items()
            ]
            metrics["sync/update_lost_frac"] = max(lost)
        trained_norms = self._trained_norm_values() if self.mode == "colocate" else {}
        if trained_norms:
            engine = dict(self.engine_model.named_parameters())
            if self._initial_norms is None:
                self._initial_norms = {name: value.clone() for name, value in trained_norms.items()}
            names = [name for name in trained_norms if name in engine]
            current = torch.cat([trained_norms[n] for n in names])
            initial = torch.cat([self._initial_norms[n] for n in names])
            served = torch.cat([engine[n].detach().float().cpu() for n in names])
            metrics["sync/norm_update_lost_frac"] = update_lost_frac(served, initial, current - initial)
        return metrics

    def _trained_norm_values(self) -> dict[str, torch.Tensor]:
        return {
            name: tensor.detach().float().cpu().flatten()
            for name, tensor in iter_trained_extra_weights(self.model)
            if name.endswith("norm.weight")
        }


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
        return load_base_model(
            model, args.quant_format, dtype=dtype, mxfp4_scale_mode=args.mxfp4_scale_mode, **init_kwargs
        )
    if _has_quantized_linear(model) or getattr(model, "is_loaded_in_4bit", False):
        return model
    if args.quant_format == "nf4":
        raise ValueError(
            "quant_format='nf4' needs the model path (bitsandbytes quantizes at load time): pass "
            f"model={getattr(model, 'name_or_path', '<path>')!r} as a string."
        )
    quantize_model_(model, args.quant_format, mxfp4_scale_mode=args.mxfp4_scale_mode)
    return model


def _num_blocks(model) -> int | None:
    """`config.num_hidden_layers` of a model object or checkpoint path (None when it has none)."""
    config = getattr(model, "config", None)
    if config is None and isinstance(model, str):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
    config = getattr(config, "text_config", None) or config
    return getattr(config, "num_hidden_layers", None)


def write_rin_multipliers(rin, output_dir: str, is_main_process: bool) -> None:
    """Log the RIN plan and write it to `<output_dir>/rin_multipliers.json` (main process)."""
    logger.info(
        "RIN %s from %s: per-block AQN sigma multipliers %s (final norm %s)",
        rin.mode,
        rin.srdd,
        [round(value, 4) for value in rin.block_multipliers],
        rin.final_norm_multiplier,
    )
    if is_main_process:
        import json

        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "rin_multipliers.json"), "w") as f:
            json.dump(rin.to_json(), f, indent=2)


def resolve_rollout_engine(args: QeRLConfig, on_vllm_cpu: bool) -> tuple[str, str | None]:
    """`(adapter_sync, engine_dtype)` of the colocated rollout engine, `vllm_adapter_sync="auto"` resolved by measurement
    (`make bench`, `adapter_sync_modes` on SmolLM2-135M): on GPUs and in colocate mode the adapter goes in unmerged
    (QeRL's engine: FP4 kernels, no update lost); on vLLM's CPU backend, where serving LoRA made rollouts 3.2-3.5x and
    steps 1.4-1.5x slower, it is merged into a float32 engine, which holds the fp32 merge up to fp32 rounding; in server mode it is
    merged (TRL's server client has no LoRA path). An explicit `vllm_adapter_sync` / `vllm_dtype` is kept."""
    if args.vllm_adapter_sync != "auto":
        return args.vllm_adapter_sync, args.vllm_dtype
    if args.vllm_mode != "colocate":
        return "merged", args.vllm_dtype
    if on_vllm_cpu:
        return "merged", args.vllm_dtype or "float32"
    return "unmerged", args.vllm_dtype


def add_norms_to_modules_to_save(model, peft_config):
    """QeRL's `--ln True`: add the decoder blocks' norm names (those AQN targets) to the LoRA config's
    `modules_to_save`, so PEFT trains a copy of them. Returns the (copied) config."""
    import copy

    if peft_config is None:
        raise ValueError("train_norms=True trains the norms beside a LoRA adapter: pass a `peft_config`.")
    if isinstance(model, str):  # GRPOTrainer loads it later: the module structure is all we need here
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name in find_norm_modules(model)})
    require_norm_targets(dict.fromkeys(leaf_names), "the model to train (train_norms)")
    peft_config = copy.deepcopy(peft_config)
    existing = list(peft_config.modules_to_save or [])
    peft_config.modules_to_save = existing + [name for name in leaf_names if name not in existing]
    return peft_config


def _cast_output_to_input_dtype(module, args, output):
    return output.to(args[0].dtype) if torch.is_tensor(output) and args and torch.is_tensor(args[0]) else output


def keep_lora_in_fp32_(model) -> int:
    """Give LoRA A/B fp32 parameters on every base (returns how many were cast). TRL casts the trainable parameters of
    a 4-bit (`is_loaded_in_4bit`, our NF4 arm) model to bf16, where AdamW steps at lr 1e-5 mostly round away (17 % of
    `lora_A` elements moved in 5 steps, vs 100 % in fp32); the NVFP4, MXFP4 and BF16-LoRA arms keep PEFT's fp32
    adapters, so without this Table 1's QLoRA row would be handicapped. PEFT casts each LoRA branch's input to the
    adapter's dtype and its output back, so the frozen base computes as before."""
    count = 0
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_" in name and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
            count += 1
    return count


def keep_full_finetune_params_in_fp32_(model) -> int:
    """Full fine-tuning keeps fp32 master weights (returns how many parameters were cast). A model loaded in bf16 and
    stepped by `adamw_torch` trains pure-bf16 parameters: at lr 1e-6 an AdamW step (~lr) is far below half a bf16 step
    (2^-9 of a weight of magnitude 1), so most weights never move (1.9 % changed in 5 steps), while every LoRA arm trains
    fp32 adapters. The upcast is lossless; with `bf16=True` the forward still computes in bf16 under autocast, as the
    frozen bf16 base of the LoRA arms does (DeepSpeed's bf16 mode keeps fp32 masters the same way)."""
    count = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
            count += 1
    return count


def keep_trained_norms_in_fp32_(model) -> int:
    """Make the trained (`modules_to_save`) norm copies fp32 master weights, as QeRL's `prepare_model_for_kbit_training`
    did, and cast each norm's output back to its input dtype so the rest of a bf16 model runs unchanged. In bf16, a
    norm near 1.0 would ignore every AdamW step below half a bf16 step there (2^-8; the lr 1e-5 regime). Returns the number of norms."""
    count = 0
    for name, module in model.named_modules():
        if name.endswith("modules_to_save.default") and name.split(".")[-3].endswith("norm"):
            module.float()
            if not getattr(module, "_qerl_output_cast", False):
                module.register_forward_hook(_cast_output_to_input_dtype)
                module._qerl_output_cast = True
            count += 1
    if count == 0:
        raise ValueError("train_norms=True but the model has no trained norm copy (`modules_to_save`).")
    return count


def engine_base_export(model, args: QeRLConfig, peft_config, adapter_sync: str | None) -> str | None:
    """The FP4 compressed-tensors export a GPU rollout engine serves in unmerged mode (vLLM's W4A16 FP4 kernels), written
    once into `<output_dir>/engine_base-<format>` by the main process; None when the engine loads the checkpoint
    instead (vLLM's CPU backend has no FP4 kernel; NF4, merged mode, server mode and full fine-tuning)."""
    if not (
        args.use_vllm
        and args.vllm_mode == "colocate"
        and adapter_sync == "unmerged"
        and peft_config is not None
        and args.quant_format in ("nvfp4", "mxfp4")
    ):
        return None
    from qerl_repro.vllm_cpu import is_vllm_cpu_platform

    if is_vllm_cpu_platform():
        return None
    if args.vllm_enable_sleep_mode:
        logger.warning(
            "vllm_enable_sleep_mode discards the engine's weights at every step, and an FP4 base cannot be pushed back "
            "from the trainer: the engine serves the dequantized bf16 base instead of the %s export.",
            args.quant_format,
        )
        return None
    from accelerate import PartialState

    from qerl_repro.quantization.export import save_compressed_tensors

    folder = os.path.join(args.output_dir, f"engine_base-{args.quant_format}")
    state = PartialState()
    if state.is_main_process:
        save_compressed_tensors(model, folder)
    state.wait_for_everyone()
    return folder


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
        rin = rin_plan_from_config(args, num_blocks=_num_blocks(model))  # RIN: None unless aqn_rin is set
        if args.quant_activations:
            from qerl_repro.w4a4 import set_activation_quant_

            # W4A4: FP4 inputs into the base GEMMs (LoRA inputs stay high precision)
            set_activation_quant_(model, True)
        if args.train_norms:
            kwargs["peft_config"] = add_norms_to_modules_to_save(model, kwargs.get("peft_config"))
        adapter_sync, engine_dtype = (None, None)
        if args.use_vllm:
            from qerl_repro.vllm_cpu import is_vllm_cpu_platform

            adapter_sync, engine_dtype = resolve_rollout_engine(args, on_vllm_cpu=is_vllm_cpu_platform())
        generation_class = type(
            "QeRLVLLMGeneration",
            (QeRLVLLMGeneration,),
            {
                # forward hooks on the engine (activation AQN, rollout hardware error) need an eager engine
                "enforce_eager": True if args.rollout_engine_hooks else args.vllm_enforce_eager,
                "adapter_sync": adapter_sync,
                "engine_base_dir": engine_base_export(model, args, kwargs.get("peft_config"), adapter_sync),
                "fidelity_rows": args.sync_fidelity_rows,
                "engine_dtype": engine_dtype,
            },
        )
        with _vllm_generation_class(generation_class), _quiet_model_init_kwargs_warning(loaded_here):
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        if is_peft_model(self.model):
            keep_lora_in_fp32_(self.model)
        elif not self.is_deepspeed_enabled:  # DeepSpeed's bf16 optimizer keeps its own fp32 master weights
            keep_full_finetune_params_in_fp32_(self.model)
        if args.train_norms:
            keep_trained_norms_in_fp32_(self.model)
        ddp_ignore_quantized_buffers_(self.model)
        self._aqn_last = {"aqn/sigma": 0.0, "aqn/stage": 0, "aqn/num_noised_modules": 0}
        self._rollout_noiser = None
        self._evaluation_rollout = False
        self._hf_norm_targets = None
        self._rin, self._rin_logged = rin, False
        if rin is not None:
            write_rin_multipliers(rin, args.output_dir, self.accelerator.is_main_process)
        self._init_noise_variants()
        if self.use_vllm:
            self.vllm_generation.post_sync_hook = self._after_sync
        if args.vllm_quant_activations:
            from qerl_repro.w4a4 import install_engine_activation_quant_

            install_engine_activation_quant_(
                self.vllm_generation.engine_model, args.quant_format, mxfp4_scale_mode=args.mxfp4_scale_mode
            )

    # ---- AQN variants and hardware-error simulation (qerl_repro.activation_noise, qerl_repro.hardware_noise) -------
    def _init_noise_variants(self) -> None:
        self._steps_per_epoch = None  # the Trainer's num_update_steps_per_epoch, set when training starts
        self._activation_noise = None  # activation AQN hooks on the colocated engine
        self._engine_hw_error = None  # hardware-error hooks on the colocated engine
        self._policy_hw_error = None  # hardware-error hooks on the policy (training forwards; HF-generate rollouts)
        where = self.args.hw_error_where
        if self.args.hw_error > 0 and (where in ("train", "both") or not self.use_vllm):
            from qerl_repro.hardware_noise import HardwareErrorNoise

            self._policy_hw_error = HardwareErrorNoise(
                self.accelerator.unwrap_model(self.model),
                kind="hw_error_train",
                only_in_training_mode=True,
                description="policy model",
            )
            self._policy_hw_error.enabled = where in ("train", "both")

    def set_initial_training_values(self, args, dataloader):
        """Transformers' step counts; keeps `num_update_steps_per_epoch` for the epoch-aware AQN schedule."""
        values = super().set_initial_training_values(args, dataloader)
        self._steps_per_epoch = values[1]
        return values

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._policy_hw_error is not None:  # a new draw sequence at each optimizer step
            self._policy_hw_error.begin_step(self.args.hw_error, seed=self.args.seed, step=self.state.global_step)
        return super().training_step(model, inputs, num_items_in_batch)

    def _after_sync(self) -> None:
        """After every weight sync: AQN (weight or activation variant), the engine's hardware error, and for an
        evaluation rollout the clean engine."""
        self._apply_aqn_after_sync()
        if self.args.hw_error > 0 and self.args.hw_error_where in ("rollout", "both"):
            if self.vllm_generation.mode == "colocate":  # server mode is refused by QeRLConfig
                if self._engine_hw_error is None:
                    from qerl_repro.hardware_noise import HardwareErrorNoise

                    self._engine_hw_error = HardwareErrorNoise(
                        self.vllm_generation.engine_model, kind="hw_error_rollout", description="vLLM rollout engine"
                    )
                self._engine_hw_error.set_step(self.args.hw_error, seed=self.args.seed, step=self.state.global_step)
                self.vllm_generation.llm.reset_prefix_cache()
        if self._evaluation_rollout:
            self._write_engine_norms(clean=True)

    @contextmanager
    def _policy_hw_error_in_generation(self):
        """The policy's hardware-error hooks during a generation: on for HF-generate rollouts when `hw_error_where`
        includes the rollout, off otherwise (vLLM generates elsewhere; `"train"` keeps rollouts clean)."""
        hooks = self._policy_hw_error
        if hooks is None:
            yield
            return
        hooks.begin_step(self.args.hw_error, seed=self.args.seed, step=self.state.global_step)
        with hooks.switched(not self.use_vllm and self.args.hw_error_where in ("rollout", "both")):
            yield

    # ---- schedule -------------------------------------------------------------------------------------------------
    def current_aqn_sigma(self) -> tuple[float, int]:
        """`(sigma, stage)` of the current optimizer step (0 when AQN is off or before training starts); with
        `aqn_epoch_aware` the step within its epoch against the epoch's length (`aqn_epoch_step`)."""
        total_steps = self.state.max_steps
        if not self.args.aqn or total_steps <= 0:
            return 0.0, 0
        step = self.state.global_step
        if self.args.aqn_epoch_aware and self._steps_per_epoch:
            step, total_steps = aqn_epoch_step(step, total_steps, self._steps_per_epoch)
        sigma = aqn_sigma(
            step,
            total_steps,
            sigma_start=self.args.aqn_sigma_start,
            sigma_end=self.args.aqn_sigma_end,
            num_stages=self.args.aqn_num_stages,
            schedule=self.args.aqn_schedule,
            decay=self.args.aqn_decay,
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
        if self.args.aqn_variant == "activation":  # colocate only (QeRLConfig)
            if self._activation_noise is None:
                from qerl_repro.activation_noise import ActivationNoise

                self._activation_noise = ActivationNoise(
                    self.vllm_generation.engine_model,
                    include_final_norm=self.args.aqn_include_final_norm,
                    include_qk_norm=self.args.aqn_include_qk_norm,
                    description="vLLM rollout engine (colocate)",
                )
            num_noised = self._activation_noise.set_step(sigma, seed=seed, step=step)
            self.vllm_generation.llm.reset_prefix_cache()  # cached KV blocks hold the previous step's noise
        elif self.vllm_generation.mode == "colocate":
            if self._rollout_noiser is None:
                from qerl_repro.vllm_worker import RolloutNormNoiser

                self._rollout_noiser = RolloutNormNoiser(
                    self.vllm_generation.engine_model,
                    include_final_norm=self.args.aqn_include_final_norm,
                    include_qk_norm=self.args.aqn_include_qk_norm,
                    description="vLLM rollout engine (colocate)",
                    rin_block_multipliers=None if self._rin is None else self._rin.block_multipliers,
                    rin_final_norm_multiplier=1.0 if self._rin is None else self._rin.final_norm_multiplier,
                )
            num_noised = self._rollout_noiser.apply(sigma, seed=seed, step=step)
            self.vllm_generation.llm.reset_prefix_cache()
        else:
            num_noised = self._apply_aqn_on_server(sigma, seed, step)
        self._record_aqn(sigma, stage, num_noised)

    def _apply_aqn_on_server(self, sigma: float, seed: int, step: int) -> int:
        """AQN on every worker of the vLLM server (`QeRLWorkerExtension.qerl_apply_aqn`), from the main process."""
        from qerl_repro.vllm_worker import apply_aqn_on_server

        if not self.accelerator.is_main_process:
            return 0
        return apply_aqn_on_server(
            self.vllm_generation.vllm_client,
            sigma,
            seed=seed,
            step=step,
            include_final_norm=self.args.aqn_include_final_norm,
            include_qk_norm=self.args.aqn_include_qk_norm,
            rin=self._rin,
        )

    def _write_engine_norms(self, *, clean: bool) -> None:
        """Put the clean norm weights (AQN off) or the noised ones of the latest draw into the rollout engine; the
        engine's noise hooks (activation AQN, hardware error) off or on."""
        if self.vllm_generation.mode == "colocate":
            hooks = [h for h in (self._activation_noise, self._engine_hw_error) if h is not None]
            for hook in hooks:
                hook.enabled = not clean
            if self._rollout_noiser is not None:
                if clean:
                    self._rollout_noiser.write_clean()
                else:
                    self._rollout_noiser.write_noised()
            if self._rollout_noiser is not None or hooks:
                self.vllm_generation.llm.reset_prefix_cache()
        elif self.accelerator.is_main_process:
            from qerl_repro.vllm_worker import write_server_norms

            write_server_norms(self.vllm_generation.vllm_client, clean=clean)

    @contextmanager
    def clean_rollout_engine(self):
        """AQN and the rollout hardware error off in the vLLM rollout engine inside the block (evaluation rollouts,
        colocate or server); the latest noise is back afterwards, also when a sync inside the block (a step boundary)
        drew new noise."""
        if not (self.use_vllm and (self.args.aqn or self.args.rollout_engine_hooks)):
            yield
            return
        self._evaluation_rollout = True
        self._write_engine_norms(clean=True)
        try:
            yield
        finally:
            self._evaluation_rollout = False
            self._write_engine_norms(clean=False)

    # ---- generation: HF path noise, and noise-free evaluation --------------------------------------------------------
    def _generate_single_turn(self, *args, **kwargs):
        with self._policy_hw_error_in_generation():
            return self._generate_single_turn_with_aqn(*args, **kwargs)

    def _generate_single_turn_with_aqn(self, *args, **kwargs):
        if not self.args.aqn:
            if self.use_vllm and self.args.rollout_engine_hooks and not self.model.training:
                with self.clean_rollout_engine():  # evaluation rollouts without the hardware error
                    return super()._generate_single_turn(*args, **kwargs)
            return super()._generate_single_turn(*args, **kwargs)
        if self.use_vllm:
            if self.model.training:
                return super()._generate_single_turn(*args, **kwargs)
            # Evaluation rollouts run on the clean engine. TRL may sync (and our hook noise) inside this call when the
            # step changed: the hook then writes the clean weights back, and the step's noise is restored afterwards
            # for the training rollouts of that step (which will not sync again).
            with self.clean_rollout_engine():
                return super()._generate_single_turn(*args, **kwargs)
        if not self.model.training:
            return super()._generate_single_turn(*args, **kwargs)
        # HF generate on the training model: noise only while generating, restored bit-exactly afterwards, so the
        # logprob and training forwards are noise-free.
        sigma, stage = self.current_aqn_sigma()
        seed, step = self.args.aqn_noise_seed, self.state.global_step
        if self.args.aqn_variant == "activation":  # hooks on the policy for this generation only
            from qerl_repro.activation_noise import activation_noised

            with activation_noised(
                self.accelerator.unwrap_model(self.model),
                sigma,
                seed=seed,
                step=step,
                include_final_norm=self.args.aqn_include_final_norm,
                include_qk_norm=self.args.aqn_include_qk_norm,
                description="policy model (HF generate)",
            ) as noise:
                output = super()._generate_single_turn(*args, **kwargs)
            self._record_aqn(sigma, stage, len(noise.targets) if sigma > 0 else 0)
            self._aqn_last["aqn/activation_noised_calls"] = noise.num_noised_calls
            return output
        if self._hf_norm_targets is None:
            targets = find_norm_weights(
                self.accelerator.unwrap_model(self.model),
                include_final_norm=self.args.aqn_include_final_norm,
                include_qk_norm=self.args.aqn_include_qk_norm,
            )
            require_norm_targets(targets, "policy model (HF generate)")
            self._hf_norm_targets = targets
            self._hf_rin_multipliers = (
                None
                if self._rin is None
                else norm_multipliers(
                    targets, self._rin.block_multipliers, final_norm_multiplier=self._rin.final_norm_multiplier
                )
            )
        sigma, stage = self.current_aqn_sigma()
        seed, step = self.args.aqn_noise_seed, self.state.global_step
        with aqn_noised(
            self._hf_norm_targets, sigma, seed=seed, step=step, multipliers=self._hf_rin_multipliers
        ) as num_noised:
            output = super()._generate_single_turn(*args, **kwargs)
        self._record_aqn(sigma, stage, num_noised)
        return output

    # ---- logging ---------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            if self.args.aqn:
                logs.update(self._aqn_last)
            if self._rin is not None:  # RIN: the per-block multipliers once, at the first training log
                logs.update(rin_metrics(self._rin, per_block=not self._rin_logged))
                self._rin_logged = True
            self._log_noise_hooks(logs)
            if self.use_vllm:
                logs.update(self.vllm_generation.last_sync_metrics)
        super().log(logs, start_time)

    def _log_noise_hooks(self, logs: dict[str, float]) -> None:
        """`aqn/activation_noised_calls` and `hw_error/{eps, policy_layers, policy_noised_calls, engine_layers,
        engine_noised_calls}` (policy: the trainer's model, i.e. its forwards and HF-generate rollouts; engine: the vLLM
        rollout engine; calls: perturbed module calls since the step's draw). Raises when hooks that should have
        perturbed this step never ran (DESIGN.md trap 1: a run that silently has no noise)."""
        if self._activation_noise is not None:
            logs["aqn/activation_noised_calls"] = self._activation_noise.num_noised_calls
        if self.args.hw_error > 0:
            logs["hw_error/eps"] = self.args.hw_error
            for where, hooks in (("policy", self._policy_hw_error), ("engine", self._engine_hw_error)):
                if hooks is not None:
                    logs[f"hw_error/{where}_layers"] = len(hooks.targets)
                    logs[f"hw_error/{where}_noised_calls"] = hooks.num_noised_calls
        silent = [
            key for key in ("hw_error/policy_noised_calls", "hw_error/engine_noised_calls") if logs.get(key) == 0
        ]
        if logs.get("aqn/num_noised_modules", 0) > 0 and logs.get("aqn/activation_noised_calls") == 0:
            silent.append("aqn/activation_noised_calls")
        if silent:
            raise RuntimeError(
                f"{', '.join(silent)} = 0: noise hooks were set for this step but never ran, so the run would silently "
                "have no noise. The engine must run eagerly (vllm_enforce_eager) and call its modules (forward hooks)."
            )

    # ---- model card ------------------------------------------------------------------------------------------------
    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card, with the names a quantized model object hides from it: TRL links the base model only when
        `config._name_or_path` is not a local folder (ours is the path the base was loaded and quantized from) and
        shows `self.hub_model_id`, which only transformers' own push sets. Here the base is its Hub id
        (`qerl_repro.models.describe_base_model`: the embedded SmolLM2 is HuggingFaceTB/SmolLM2-135M-Instruct; any other
        local folder is said to be one), the quick start loads the repo a push goes to (`hub_model_id`, else the output
        folder's name) and `model_name` defaults to that repo's name."""
        from trl.trainer.utils import get_config_model_id

        from qerl_repro.hub import pushed_repo_id
        from qerl_repro.models import describe_base_model

        config = self.model.config
        hub_id, description = describe_base_model(get_config_model_id(config))
        repo_id = self.hub_model_id or pushed_repo_id(self.args)
        saved = (config._name_or_path, self.hub_model_id)
        config._name_or_path, self.hub_model_id = hub_id or "", repo_id
        try:
            super().create_model_card(
                model_name=model_name or repo_id.split("/")[-1], dataset_name=dataset_name, tags=tags
            )
        finally:
            config._name_or_path, self.hub_model_id = saved
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        with open(path, encoding="utf-8") as f:
            card = f.read()
        link = f"[{hub_id}](https://huggingface.co/{hub_id})"  # TRL's sentence, "[None](...None)" without a Hub id
        with open(path, "w", encoding="utf-8") as f:
            f.write(card.replace(f"fine-tuned version of {link}", f"fine-tuned version of {description}", 1))
