# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""DDP (gloo, CPU) wraps a PEFT model on a packed NVFP4 base: the float8 scales are not broadcast (gloo cannot)."""

import subprocess
import sys
import textwrap


def test_ddp_wraps_a_quantized_peft_model_on_gloo():
    script = textwrap.dedent("""
        import os, torch, torch.distributed as dist
        from peft import LoraConfig, get_peft_model
        from qerl_repro.quantization.base import quantize_model_
        from qerl_repro.testing import build_tiny_qwen2
        from qerl_repro.trainer import ddp_ignore_quantized_buffers_
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
        dist.init_process_group("gloo", rank=0, world_size=1)
        model, _ = build_tiny_qwen2()
        quantize_model_(model, "nvfp4")
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        try:
            torch.nn.parallel.DistributedDataParallel(model)
            raise SystemExit("DDP accepted float8 buffers on gloo: the ignore list is no longer needed")
        except RuntimeError as exc:
            assert "Invalid scalar type" in str(exc), exc
        ignored = ddp_ignore_quantized_buffers_(model)
        assert any(name.endswith("weight_scale") for name in ignored)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ddp(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
        print("DDP_OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "DDP_OK" in proc.stdout, proc.stderr[-3000:]
