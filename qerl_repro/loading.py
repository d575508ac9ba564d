# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Loading the policy a training run produced: a base model in a 4-bit format, plus its LoRA adapter.

One loader for everything that rebuilds a trained policy outside the trainer (GSM8K evaluation, merged export in
`qerl_repro.hub`):

- `resolve_model_and_adapter`: a model path, Hub id, `"smollm2"`, or a training `output_dir` (an adapter folder whose
  `base_model_name_or_path` is the base); a path that does not exist is a `UserError` saying so.
- `recorded_base_format` / `resolve_base_format`: the base format (`quant_format`) the adapter was trained on, read
  from what the trainer saved next to it (`training_args.bin`, without unpickling code), checked against a requested one.
- `load_dequantized_base`: the base as the training rollouts saw it, every 4-bit Linear (NVFP4 / MXFP4 `FP4Linear`,
  bitsandbytes NF4) replaced by a plain `nn.Linear` holding its dequantized weight; an ordinary transformers model.
- `load_policy`: that base with the adapter applied (PEFT, unmerged), for transformers `generate`.
- `save_servable_model`: that base (with the adapter merged in fp32 if asked) saved as a checkpoint vLLM can serve.
- `inspect_adapter`: facts about an adapter folder (rank, targets, hash, whether vLLM's LoRA can serve it).
"""

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass

import torch

from qerl_repro.errors import UserError
from qerl_repro.quantization.base import QUANT_FORMATS


logger = logging.getLogger(__name__)

__all__ = [
    "QUANT_FORMATS",
    "RecordedBase",
    "inspect_adapter",
    "is_adapter_dir",
    "load_dequantized_base",
    "load_policy",
    "load_tokenizer",
    "recorded_base_format",
    "resolve_base_format",
    "resolve_dtype",
    "resolve_model_and_adapter",
    "save_servable_model",
]


def is_adapter_dir(path: str) -> bool:
    """Whether `path` is a PEFT adapter folder (it holds `adapter_config.json`)."""
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def resolve_model_and_adapter(model: str, adapter: str | None = None) -> tuple[str, str | None]:
    """`(base model path, adapter folder or None)`; `"smollm2"` is resolved to the local checkpoint.

    A `model` folder holding a PEFT adapter (`adapter_config.json`, e.g. a training `output_dir`) is taken as the
    adapter, and its `base_model_name_or_path` as the model.
    """
    from qerl_repro.models import resolve_model_path

    if adapter is None and os.path.isdir(model) and is_adapter_dir(model):
        with open(os.path.join(model, "adapter_config.json")) as f:
            base = json.load(f).get("base_model_name_or_path")
        if not base:
            raise UserError(
                f"{model} holds a PEFT adapter without base_model_name_or_path: pass --model and --adapter"
            )
        logger.info("%s is a PEFT adapter: evaluating it on its base model %s", model, base)
        model, adapter = base, model
    if adapter is not None and not is_adapter_dir(adapter):
        what = (
            "no such folder" if not os.path.exists(adapter) else "not a PEFT adapter folder (no adapter_config.json)"
        )
        raise UserError(f"--adapter {adapter}: {what}")
    return resolve_model_path(model), adapter


@dataclass(frozen=True)
class RecordedBase:
    """The base a training run trained its adapter on, as recorded in its output folder (`recorded_base_format`)."""

    quant_format: str
    mxfp4_scale_mode: str | None
    source: str  # the file it was read from


class _Recorded:
    """Stands in for every class a pickle names: unpickling builds these and runs no code of the pickled classes."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        if isinstance(state, tuple):  # (__dict__, __slots__ state)
            state = {k: v for part in state if isinstance(part, dict) for k, v in part.items()}
        if isinstance(state, dict):
            self.__dict__.update(state)


class _RecordUnpickler(pickle.Unpickler):
    _SAFE = {("builtins", n) for n in ("set", "frozenset", "dict", "list", "tuple", "object", "slice", "complex")}
    _SAFE |= {("collections", "OrderedDict"), ("copyreg", "_reconstructor")}

    def find_class(self, module, name):
        if (module, name) in self._SAFE:
            return super().find_class(module, name)
        return type(name, (_Recorded,), {"__module__": module})

    def persistent_load(self, pid):  # torch storages: not needed to read the arguments
        return None


def _read_training_args(path: str):
    """The `TrainingArguments` a `Trainer` saved with `torch.save` (`training_args.bin`), read without running code.

    `torch.load` would unpickle, i.e. run whatever the file names; here every class is replaced by a plain record of
    its attributes, so a folder downloaded from somewhere cannot execute anything. Returns None if unreadable.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                return None
            return _RecordUnpickler(io.BytesIO(archive.read(name))).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError):
        return None


def recorded_base_format(adapter_dir: str) -> RecordedBase | None:
    """The base format (`quant_format`) the run that trained `adapter_dir` used, or None if the folder does not say.

    Read from `training_args.bin` (the `QeRLConfig` that `Trainer.save_model` stores next to the adapter, and in each
    `checkpoint-*`), else from the recipe copy `recipe.yaml` that `qerl_repro.grpo` stores (only if it sets
    `quant_format`; command-line overrides are not in it).
    """
    args_path = os.path.join(adapter_dir, "training_args.bin")
    if os.path.isfile(args_path):
        args = _read_training_args(args_path)
        quant_format = getattr(args, "quant_format", None)
        if isinstance(quant_format, str) and quant_format in QUANT_FORMATS:
            scale_mode = getattr(args, "mxfp4_scale_mode", None)
            return RecordedBase(quant_format, scale_mode if isinstance(scale_mode, str) else None, args_path)
    recipe_path = os.path.join(adapter_dir, "recipe.yaml")
    if os.path.isfile(recipe_path):
        import yaml

        with contextlib.suppress(OSError, yaml.YAMLError):
            with open(recipe_path) as f:
                recipe = yaml.safe_load(f)
            quant_format = recipe.get("quant_format") if isinstance(recipe, dict) else None
            if quant_format in QUANT_FORMATS:
                scale_mode = recipe.get("mxfp4_scale_mode")
                return RecordedBase(quant_format, scale_mode if isinstance(scale_mode, str) else None, recipe_path)
    return None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inspect_adapter(adapter_dir: str) -> dict:
    """Facts about a PEFT LoRA adapter folder, recorded in the eval JSON and used to pick how it is applied.

    Returns `path`, `sha256` (of the weights file), `r`, `lora_alpha`, `target_modules`, `modules_to_save`,
    `use_dora`, `num_lora_tensors`, `lora_B_abs_sum` (0 means the adapter cannot change the model: an untrained LoRA)
    and `vllm_lora_unsupported` (why vLLM's LoRA path cannot serve it, or None).
    """
    from safetensors import safe_open

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{adapter_dir} has no adapter_model.safetensors")
    num_lora, b_abs_sum = 0, 0.0
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
            if "lora_" in key:
                num_lora += 1
                if "lora_B" in key:
                    b_abs_sum += float(f.get_tensor(key).float().abs().sum())
    if config.get("peft_type", "LORA") != "LORA":
        unsupported = f"peft_type {config.get('peft_type')}"
    elif config.get("modules_to_save"):
        unsupported = f"modules_to_save {config['modules_to_save']}"
    elif config.get("use_dora"):
        unsupported = "DoRA"
    elif config.get("rank_pattern") or config.get("alpha_pattern"):
        unsupported = "rank_pattern / alpha_pattern (vLLM scales every module by lora_alpha / r)"
    elif config.get("bias", "none") != "none":
        unsupported = f"LoRA bias={config['bias']!r}"
    elif config.get("trainable_token_indices") or config.get("target_parameters"):
        unsupported = "trainable_token_indices / target_parameters"
    else:
        unsupported = None
    return {
        "path": os.path.abspath(adapter_dir),
        "sha256": _sha256(weights),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        "modules_to_save": config.get("modules_to_save"),
        "use_dora": bool(config.get("use_dora")),
        "num_lora_tensors": num_lora,
        "lora_B_abs_sum": b_abs_sum,
        "vllm_lora_unsupported": unsupported,
    }


def resolve_dtype(dtype: str | torch.dtype, model_path: str | None = None) -> torch.dtype:
    """A `torch.dtype` from a name (`"bfloat16"`, `"bf16"`, `"fp32"`, ...); `"auto"`: the checkpoint's (fp32 if none)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        from transformers import AutoConfig

        config_dtype = getattr(AutoConfig.from_pretrained(model_path), "dtype", None) if model_path else None
        if isinstance(config_dtype, str):
            config_dtype = getattr(torch, config_dtype, None)
        return config_dtype if isinstance(config_dtype, torch.dtype) else torch.float32
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    return getattr(torch, aliases.get(dtype, dtype))


def load_dequantized_base(
    model_path: str,
    quant_format: str = "none",
    dtype: torch.dtype = torch.float32,
    *,
    mxfp4_scale_mode: str | None = None,
):
    """The base model as the training rollouts saw it: every Linear the trainer quantizes replaced by a plain
    `nn.Linear` holding its dequantized 4-bit weight (`"nvfp4"`, `"mxfp4"`, `"nf4"`), or the model as is (`"none"`).

    Uses `qerl_repro.quantization.base.load_base_model` (same formats, skipped modules and scales as the trainer) and
    `dequantized_weight`. The result is an ordinary transformers model: save it, merge a LoRA into it, serve it.
    `mxfp4_scale_mode` is the trainer's `QeRLConfig.mxfp4_scale_mode` (None: its default).
    """
    from torch import nn
    from transformers import AutoModelForCausalLM

    if quant_format not in QUANT_FORMATS:
        raise ValueError(f"quant_format={quant_format!r} is not one of {list(QUANT_FORMATS)}")
    if quant_format == "none":
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    from qerl_repro.quantization.base import load_base_model
    from qerl_repro.quantization.linear import dequantized_weight, is_quantized_linear

    scale_kwargs = {"mxfp4_scale_mode": mxfp4_scale_mode} if mxfp4_scale_mode else {}
    model = load_base_model(model_path, quant_format, dtype=dtype, **scale_kwargs)
    replaced = 0
    for name, module in list(model.named_modules()):
        if not is_quantized_linear(module):
            continue
        weight = dequantized_weight(module).to(dtype)
        bias = getattr(module, "bias", None)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias.detach().to(dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        replaced += 1
    if replaced == 0:
        raise RuntimeError(f"quant_format={quant_format!r} quantized no Linear layer of {model_path}")
    # NF4 went through transformers' bitsandbytes quantizer, which marks the model as quantized (`.to(dtype)` and
    # `save_pretrained` then refuse it); every 4-bit layer is gone now, so undo the marks the way transformers does.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        model.__dict__.pop(attr, None)
    model.hf_quantizer = None
    for attr in ("quantization_config", "qerl_quant_format", "qerl_mxfp4_scale_mode"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config.qerl_eval_base = f"dequantized {quant_format}"
    logger.info(
        "Base %s: %d Linear layers replaced by their dequantized %s weights", model_path, replaced, quant_format
    )
    return model


def save_servable_model(
    model_path: str,
    output_dir: str,
    *,
    quant_format: str = "none",
    adapter: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer=None,
    mxfp4_scale_mode: str | None = None,
) -> str:
    """Save a checkpoint vLLM can serve: the (dequantized 4-bit) base, with the adapter merged in fp32 if given, cast
    to `dtype`, plus `tokenizer`. Returns `output_dir`."""
    model = load_dequantized_base(model_path, quant_format, dtype=torch.float32, mxfp4_scale_mode=mxfp4_scale_mode)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.to(dtype).save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return output_dir


def load_policy(
    model_path: str,
    quant_format: str = "none",
    adapter: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    mxfp4_scale_mode: str | None = None,
):
    """The policy to evaluate as a transformers model: the (dequantized 4-bit) base in `dtype`, with the PEFT adapter
    applied (a `PeftModel`, not merged) when given. A quantized base is built from fp32 weights, then cast once."""
    load_dtype = dtype if quant_format == "none" else torch.float32
    model = load_dequantized_base(model_path, quant_format, dtype=load_dtype, mxfp4_scale_mode=mxfp4_scale_mode)
    model = model.to(dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model


def load_tokenizer(model_path: str):
    """The model's tokenizer; a name that is no local folder and fails to load from the Hub is a `UserError`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except OSError as exc:
        if os.path.isdir(model_path):
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"no such model folder: {model_path} (and as a Hugging Face Hub id: {reason})") from exc


def resolve_base_format(
    adapter: str | None,
    quant_format: str | None,
    allow_mismatch: bool,
    *,
    format_option: str = "--quant_format",
    override_option: str = "--allow_quant_format_mismatch",
    action: str = "evaluate",
) -> tuple[str, str | None]:
    """`(quant_format, mxfp4_scale_mode)` of the base to load under `adapter`: the given format, checked against the one
    the adapter's training run recorded (`recorded_base_format`), or the recorded one when `quant_format` is None (an
    adapter trained on NVFP4 must not be scored on the bf16 base by default); `"none"` when nothing is given or
    recorded. A given format that contradicts the record is a `UserError` naming both, or a warning when
    `allow_mismatch`; the message names the caller's options (`format_option`, `override_option`) and `action`."""
    recorded = recorded_base_format(adapter) if adapter is not None else None
    if recorded is None:
        return quant_format or "none", None
    if quant_format is None:
        logger.info(
            "The adapter was trained on a %s base (%s): evaluating on that base",
            recorded.quant_format,
            recorded.source,
        )
        return recorded.quant_format, recorded.mxfp4_scale_mode
    if quant_format != recorded.quant_format:
        message = (
            f"the adapter {adapter} was trained on a {recorded.quant_format} base ({recorded.source}), but "
            f"{format_option} {quant_format} was given"
        )
        if not allow_mismatch:
            raise UserError(
                f"{message}: omit {format_option} (or pass {format_option} {recorded.quant_format}) to {action} the "
                f"policy that was trained, or add {override_option} to {action} it on the {quant_format} base anyway"
            )
        logger.warning("%s: using the %s base anyway (%s)", message, quant_format, override_option)
        return quant_format, None
    return quant_format, recorded.mxfp4_scale_mode
