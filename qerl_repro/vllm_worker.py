# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""AQN on the vLLM rollout engine: one stateful helper used in colocate mode and by the server worker extension.

Colocate mode (`vllm_mode="colocate"`): `QeRLTrainer` drives a `RolloutNormNoiser` on the in-process vLLM model.

Server mode (`vllm_mode="server"`): start the server with this module as worker extension, e.g.

    VLLM_SERVER_DEV_MODE=1 trl vllm-serve --model <model> --worker-extension-cls qerl_repro.vllm_worker.QeRLWorkerExtension

(`trl vllm-serve` passes unknown flags on to `vllm serve`; dev mode enables the `/collective_rpc` endpoint). After each
weight sync the trainer calls `qerl_apply_aqn` on every worker through `/collective_rpc`.
"""

import json
from contextlib import contextmanager

import torch

from qerl_repro.noise import apply_aqn_, find_norm_weights, require_norm_targets, snapshot_norm_weights
from qerl_repro.vllm_cpu import is_vllm_cpu_platform, keep_cpu_linear_weights, repack_cpu_linear_weights


AQN_RPC_METHOD = "qerl_apply_aqn"


class RolloutNormNoiser:
    """Keeps the targeted norm weights of a rollout model at `clean + noise(seed, step)`.

    Noise never accumulates: at each `apply`, a weight that still holds the value this noiser wrote (the sync did not
    rewrite it) goes back to its stored clean value; a weight the sync rewrote is its own new clean value.
    """

    def __init__(self, model: torch.nn.Module, *, include_final_norm=False, include_qk_norm=False, description=""):
        self.targets = find_norm_weights(model, include_final_norm=include_final_norm, include_qk_norm=include_qk_norm)
        require_norm_targets(self.targets, description or type(model).__name__)
        self._clean: dict[str, torch.Tensor] | None = None
        self._noised: dict[str, torch.Tensor] | None = None

    def _clean_values(self) -> dict[str, torch.Tensor]:
        if self._clean is None:
            return snapshot_norm_weights(self.targets)
        clean = {}
        for name, weight in self.targets.items():
            untouched = torch.equal(weight.data, self._noised[name])
            clean[name] = self._clean[name] if untouched else weight.detach().clone()
        return clean

    @torch.no_grad()
    def apply(self, sigma: float, *, seed: int, step: int) -> int:
        """Set every target to its clean value plus the noise of `(seed, step)`; returns how many were noised."""
        clean = self._clean_values()
        num_noised = apply_aqn_(self.targets, clean, sigma, seed=seed, step=step)
        self._clean = clean
        self._noised = snapshot_norm_weights(self.targets)
        return num_noised

    @torch.no_grad()
    def write_clean(self) -> None:
        """Put the clean weights of the last `apply` into the model (no-op before the first `apply`)."""
        if self._clean is not None:
            for name, weight in self.targets.items():
                weight.data.copy_(self._clean[name])

    @contextmanager
    @torch.no_grad()
    def clean_weights(self):
        """Temporarily put the clean weights back (e.g. for evaluation rollouts), then the noised ones of the latest
        `apply` (which may have happened inside the block, e.g. a sync at a step boundary)."""
        self.write_clean()
        try:
            yield
        finally:
            if self._noised is not None:
                for name, weight in self.targets.items():
                    weight.data.copy_(self._noised[name])


class QeRLWorkerExtension:
    """vLLM worker extension (`--worker-extension-cls qerl_repro.vllm_worker.QeRLWorkerExtension`) for server mode."""

    def qerl_apply_aqn(self, payload: str) -> dict:
        """Apply AQN after a weight sync. `payload` is JSON: sigma, seed, step, include_final_norm, include_qk_norm."""
        request = json.loads(payload)
        model = self.model_runner.model
        if is_vllm_cpu_platform():
            repack_cpu_linear_weights(model)
        noiser = getattr(self, "_qerl_noiser", None)
        if noiser is None:
            noiser = RolloutNormNoiser(
                model,
                include_final_norm=request.get("include_final_norm", False),
                include_qk_norm=request.get("include_qk_norm", False),
                description="vLLM server worker model",
            )
            self._qerl_noiser = noiser
        num_noised = noiser.apply(float(request["sigma"]), seed=int(request["seed"]), step=int(request["step"]))
        return {"num_noised_modules": num_noised, "num_targets": len(noiser.targets)}


# A server worker imports this module (as its extension) before loading weights: on the CPU backend, keep the Linear
# weights so that synced weights reach the packed GEMMs (see qerl_repro.vllm_cpu).
if is_vllm_cpu_platform():
    keep_cpu_linear_weights()
