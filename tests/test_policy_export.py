# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""The exports of the policy QeRL actually trained, dequant(W_q) + LoRA delta, loaded back with independent loaders.

A tiny Qwen2 is trained for a few GRPO steps with `QeRLTrainer` on an NVFP4 / MXFP4 base (HF generate, AQN on), so the
adapter's B is non-zero and the delta matters. Then:

- `export_merged(..., base_quant_format=fmt)` (bf16 / fp32): `AutoModelForCausalLM.from_pretrained` gives the trained
  policy's logits; its weights are exactly the live `dequantize_weight() + scaling * B @ A`.
- the folder a GPU run would push (adapter + `engine_base-<fmt>`, the compressed-tensors base `engine_base_export`
  writes): transformers' compressed-tensors quantizer decompresses the base and `PeftModel.from_pretrained` puts the
  adapter on top: bit-identical logits.
- `export_merged(..., fmt=fmt)` (the merged policy re-quantized to FP4): compressed-tensors' decompression gives
  exactly the in-memory re-quantization of the live merge (and that is close to, not equal to, the trained policy).

Each check is also run on a broken export (wrong base, missing merge or adapter, wrong scale) and must fail it.
"""

import json
import os
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

from qerl_repro import QeRLConfig, QeRLTrainer
from qerl_repro.errors import UserError
from qerl_repro.hub import export_merged, upload_file_list
from qerl_repro.quantization.base import load_base_model, quantize_model_
from qerl_repro.quantization.linear import FP4Linear
from qerl_repro.testing import lora_config, tiny_args, tiny_trainer
from qerl_repro.trainer import engine_base_export


FORMATS = ["nvfp4", "mxfp4"]
# fp32 merge vs. the fp32 policy's separate LoRA branch: both are fp32 sums of the same terms in another order
# (measured max |diff| 2.4e-7 at |logits| <= 0.67).
FP32_ATOL = 1e-5
# A bf16 export keeps 8 significant bits: every weight is the fp32 merge rounded once (relative error <= 2^-9, checked
# exactly below), and a bf16 forward rounds every activation too. Measured max |diff| 0.0044 at |logits| <= 0.67; the
# broken exports below move the logits by 0.08-0.09 (merged into the high-precision base) and 0.3-0.4 (no adapter).
BF16_ATOL = 1e-2


def _input_ids(vocab_size):
    return torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model, input_ids):
    return model(input_ids=input_ids).logits.float()


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def _train(base_dir, output_dir, fmt, dtype):
    """QeRLTrainer on `base_dir` quantized to `fmt` (in `dtype`), 2 steps; the GPU run's engine base written first.

    Returns the trainer; the adapter is saved to `output_dir` (`trainer.save_model`, as `qerl_repro.grpo.main` does).
    """
    base = load_base_model(base_dir, fmt, dtype=dtype)  # what QeRLTrainer loads from a path (`prepare_base_model`)
    # The compressed-tensors base a GPU run serves and pushes (`<output_dir>/engine_base-<fmt>`), written by the
    # trainer's own function; vLLM's CPU backend has no FP4 kernel, so it is written only on GPU machines.
    engine_args = QeRLConfig(output_dir=output_dir, use_cpu=True, report_to="none", use_vllm=True, quant_format=fmt)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("qerl_repro.vllm_cpu.is_vllm_cpu_platform", lambda: False)  # as on a GPU machine
        assert engine_base_export(base, engine_args, lora_config(), "unmerged") == os.path.join(
            output_dir, f"engine_base-{fmt}"
        )
    args = tiny_args(
        QeRLConfig,
        output_dir,
        quant_format=fmt,
        learning_rate=1e-2,  # the LoRA delta stays a fraction of W (as in real training) yet moves the logits
        aqn=True,  # noise in the rollouts only: the exported policy must not carry it
        aqn_num_stages=3,  # step 0 noise-free, step 1 noised (sigma 1e-2)
        max_steps=2,
        disable_tqdm=True,
    )
    trainer = tiny_trainer(QeRLTrainer, base, AutoTokenizer.from_pretrained(base_dir), args)
    trainer.train()
    trainer.save_model(output_dir)
    trainer.model.eval()
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # PEFT starts B at 0: training made the delta non-zero
    return trainer


@pytest.fixture(scope="module", params=FORMATS)
def fp32_run(request, tiny_model_dir, tmp_path_factory):
    """(format, trainer, output_dir): trained in fp32, so the policy's own logits are fp32."""
    output_dir = str(tmp_path_factory.mktemp(f"run_fp32_{request.param}"))
    return request.param, _train(tiny_model_dir, output_dir, request.param, torch.float32), output_dir


@pytest.fixture(scope="module", params=FORMATS)
def bf16_run(request, tiny_bf16_model_dir, tmp_path_factory):
    """(format, trainer, output_dir): trained in bf16, the dtype of the GPU runs whose FP4 base is pushed."""
    output_dir = str(tmp_path_factory.mktemp(f"run_bf16_{request.param}"))
    return request.param, _train(tiny_bf16_model_dir, output_dir, request.param, torch.bfloat16), output_dir


@torch.no_grad()
def _live_merged_weights(policy) -> dict[str, torch.Tensor]:
    """`{linear name: dequant(W_q) + scaling * B @ A}` in fp32, from the trained policy's own modules (no PEFT merge)."""
    merged = {}
    for name, module in policy.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            base_layer = module.get_base_layer()
            assert isinstance(base_layer, FP4Linear), name
            lora_a, lora_b = module.lora_A["default"].weight, module.lora_B["default"].weight
            delta = (lora_b.float() @ lora_a.float()) * module.scaling["default"]
            key = name.removeprefix("base_model.model.")
            merged[key] = base_layer.dequantize_weight(torch.float32) + delta
    assert len(merged) == 14  # 7 Linear layers x 2 blocks; lm_head is neither quantized nor a LoRA target
    return merged


def test_merged_export_is_the_trained_policy(fp32_run, tiny_model_dir, tmp_dir):
    fmt, trainer, output_dir = fp32_run
    policy = trainer.model
    input_ids = _input_ids(policy.config.vocab_size)
    reference = _logits(policy, input_ids)

    # The base format is read from the run (training_args.bin beside the adapter): nothing to pass
    fp32_dir = export_merged(output_dir, None, os.path.join(tmp_dir, "fp32"), fmt="fp32")
    with open(os.path.join(fp32_dir, "qerl_export.json")) as f:
        assert json.load(f)["base_quant_format"] == fmt
    merged = AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.float32)
    assert not any(isinstance(m, FP4Linear) or hasattr(m, "lora_A") for m in merged.modules())  # a plain model
    state = merged.state_dict()
    for name, weight in _live_merged_weights(policy).items():
        # PEFT's merge_and_unload in export_merged computes W + (B @ A) * scaling, as here: bit-identical.
        assert torch.equal(state[f"{name}.weight"], weight), name
    fp32_diff = _max_diff(_logits(merged, input_ids), reference)
    assert fp32_diff <= FP32_ATOL, fp32_diff

    bf16_dir = export_merged(output_dir, tiny_model_dir, os.path.join(tmp_dir, "bf16"), base_quant_format=fmt)
    merged_bf16 = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16)
    for name, tensor in merged_bf16.state_dict().items():
        assert torch.equal(tensor, state[name].to(torch.bfloat16)), name  # the fp32 merge rounded once
    bf16_diff = _max_diff(_logits(merged_bf16, input_ids), reference)
    assert bf16_diff <= BF16_ATOL, bf16_diff

    # Broken exports fail the same checks: the adapter merged into the high-precision base (the pre-fix default
    # `base_quant_format="none"`, now an error unless forced), and the dequantized base without the merge.
    with pytest.raises(UserError, match=f"trained on a {fmt} base"):
        export_merged(output_dir, None, os.path.join(tmp_dir, "refused"), fmt="fp32", base_quant_format="none")
    wrong_base = export_merged(
        output_dir,
        None,
        os.path.join(tmp_dir, "wrong_base"),
        fmt="fp32",
        base_quant_format="none",
        allow_quant_format_mismatch=True,
    )
    wrong_base_diff = _max_diff(_logits(AutoModelForCausalLM.from_pretrained(wrong_base), input_ids), reference)
    assert wrong_base_diff > 5 * BF16_ATOL, wrong_base_diff
    with policy.disable_adapter():
        no_merge_diff = _max_diff(_logits(policy, input_ids), reference)
    assert no_merge_diff > 10 * BF16_ATOL, no_merge_diff


def _remote_copy(folder, remote):
    """Exactly the files `push_folder_to_hub(folder, ...)` would upload, laid out as the Hub repo would hold them."""
    files = upload_file_list(folder)
    for name in files:
        os.makedirs(os.path.dirname(os.path.join(remote, name)), exist_ok=True)
        shutil.copy(os.path.join(folder, name), os.path.join(remote, name))
    return files


def _load_fp4_base(folder):
    """transformers' compressed-tensors quantizer: decompress the checkpoint to bf16 `nn.Linear` weights."""
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True)
    )


def test_pushed_fp4_base_and_adapter_give_the_trained_policy(bf16_run, tmp_dir):
    fmt, trainer, output_dir = bf16_run
    policy = trainer.model
    input_ids = _input_ids(policy.config.vocab_size)
    reference = _logits(policy, input_ids)

    remote = os.path.join(tmp_dir, "remote")
    files = _remote_copy(output_dir, remote)
    base_folder = f"engine_base-{fmt}"
    assert {"adapter_model.safetensors", "adapter_config.json", f"{base_folder}/config.json"} <= set(files)
    base = _load_fp4_base(os.path.join(remote, base_folder))
    assert not any(isinstance(m, FP4Linear) for m in base.modules())  # decompressed by compressed-tensors, not us
    loaded = PeftModel.from_pretrained(base, remote).eval()
    assert torch.equal(_logits(loaded, input_ids), reference)  # same bf16 base values, same fp32 LoRA branch

    # Broken: the base without the adapter, and a base whose block / global scales are off by a factor of 2.
    with loaded.disable_adapter():
        assert _max_diff(_logits(loaded, input_ids), reference) > 10 * BF16_ATOL
    weights = os.path.join(remote, base_folder, "model.safetensors")
    tensors = load_file(weights)
    for name in list(tensors):
        if fmt == "nvfp4" and name.endswith("weight_global_scale"):
            tensors[name] = tensors[name] / 2  # compressed-tensors divides by it: every weight x 2
        elif fmt == "mxfp4" and name.endswith("weight_scale"):
            tensors[name] = tensors[name] + 1  # E8M0 biased exponent + 1: every weight x 2
    save_file(tensors, weights, metadata={"format": "pt"})
    broken = PeftModel.from_pretrained(_load_fp4_base(os.path.join(remote, base_folder)), remote).eval()
    assert _max_diff(_logits(broken, input_ids), reference) > 10 * BF16_ATOL


def test_fp4_merged_export_loads_back_through_compressed_tensors(fp32_run, tiny_model_dir, tmp_dir):
    fmt, trainer, output_dir = fp32_run
    policy = trainer.model
    input_ids = _input_ids(policy.config.vocab_size)
    out_dir = export_merged(output_dir, tiny_model_dir, os.path.join(tmp_dir, fmt), fmt=fmt, base_quant_format=fmt)
    loaded = _load_fp4_base(out_dir)

    # Independent reference: the live merge, rounded once to bf16 and quantized in memory. (Loaded in bf16, not cast
    # with `.to(torch.bfloat16)`, which would also round the rotary `inv_freq` buffer the checkpoint does not hold.)
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, weight in _live_merged_weights(policy).items():
            expected.get_submodule(name).weight.copy_(weight)  # rounded to bf16 once
    quantize_model_(expected, fmt)
    assert torch.equal(_logits(loaded, input_ids), _logits(expected, input_ids))

    # Re-quantizing W + BA is close to, not equal to, the trained policy (the quantization error of the merge).
    requantized_diff = _max_diff(_logits(loaded, input_ids), _logits(policy, input_ids))
    assert 0 < requantized_diff < 0.5, requantized_diff
    # Broken: the merge skipped (the plain base re-quantized) does not match the reference.
    unmerged = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    quantize_model_(unmerged, fmt)
    assert _max_diff(_logits(unmerged, input_ids), _logits(expected, input_ids)) > 10 * BF16_ATOL
