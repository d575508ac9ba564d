# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Offline test helpers: a tiny random Qwen2 with a locally trained BPE tokenizer that real vLLM (CPU) can serve.

No network: the tokenizer is trained in-process with `tokenizers` on a small built-in corpus.
"""

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? #### 72",
    "<think> 48 / 2 = 24 and 48 + 24 = 72 </think> <answer> 72 </answer>",
    "Solve the following math problem step by step. The reasoning process and direct answer are enclosed within",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. #### 10",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 100 1,000 3.5 -4 + - * / = ( ) , . ? ! : ; $ %",
    "the a an of to in and is was for on with as by at from that this it be are were",
] * 4


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer trained locally, with a ChatML chat template and `<|im_end|>` as EOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_qwen2(path: str | None = None, *, num_hidden_layers: int = 2, seed: int = 0, dtype=torch.float32):
    """Build (and optionally save to `path`) a tiny random Qwen2ForCausalLM and its tokenizer.

    hidden 64 and head_dim 32 (2 heads, 1 KV head) are the smallest sizes vLLM's CPU attention accepts.
    Returns `(model, tokenizer)`.
    """
    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(dtype)
    # Random, non-unit norm weights so that norm edits (AQN) visibly change the output.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if path is not None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        model.name_or_path = path
        model.config.name_or_path = path
    return model, tokenizer


# Small GRPO settings shared by the trainer tests (TRL's test conventions).
def length_reward(completions, **kwargs):
    """Varies within a group so that advantages, and therefore LoRA updates, are non-zero."""
    return [len(c[0]["content"]) / 10.0 for c in completions]


def tiny_dataset(n=12):
    return Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": f"How many clips did Natalia sell {i}?"}] for i in range(n)]}
    )


def tiny_args(config_cls, tmp_dir, **overrides):
    kwargs = dict(
        output_dir=tmp_dir,
        per_device_train_batch_size=3,  # one GRPO group of 3 per step
        num_generations=3,  # smallest group with a non-trivial advantage
        max_completion_length=8,  # short rollouts keep each step well under a second
        learning_rate=0.1,  # large, so that LoRA weights visibly move in 3 steps
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        max_steps=3,
        save_strategy="no",
        seed=42,
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


def lora_config():
    return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")


def tiny_trainer(trainer_cls, model, tokenizer, args, **kwargs):
    """`trainer_cls` (GRPOTrainer or QeRLTrainer) on `tiny_dataset` with `length_reward` and `lora_config`."""
    return trainer_cls(
        model=model,
        reward_funcs=length_reward,
        args=args,
        train_dataset=tiny_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
        **kwargs,
    )
