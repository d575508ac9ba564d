# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""AQN on the vLLM rollout engine: one stateful helper used in colocate mode and by the server worker extension.

Colocate mode (`vllm_mode="colocate"`): `QeRLTrainer` drives a `RolloutNormNoiser` on the in-process vLLM model.

Server mode (`vllm_mode="server"`): start the server with this module as worker extension, e.g.

    VLLM_SERVER_DEV_MODE=1 trl vllm-serve --model <model> --worker-extension-cls qerl_repro.vllm_worker.QeRLWorkerExtension

(`trl vllm-serve` runs `vllm serve` with the flags TRL's client needs and passes unknown flags on; dev mode enables the
`/collective_rpc` endpoint). After each weight sync the trainer calls `qerl_apply_aqn` on every worker through
`/collective_rpc` (`apply_aqn_on_server`); evaluation rollouts run between `qerl_write_clean_norms` and
`qerl_write_noised_norms` (`server_clean_norms`), as colocate mode uses `RolloutNormNoiser.clean_weights()`.
"""

import json
from contextlib import contextmanager

import torch

from qerl_repro.noise import apply_aqn_, find_norm_weights, require_norm_targets, snapshot_norm_weights
from qerl_repro.rin import norm_multipliers
from qerl_repro.vllm_cpu import is_vllm_cpu_platform, keep_cpu_linear_weights, repack_cpu_linear_weights


AQN_RPC_METHOD = "qerl_apply_aqn"
SERVER_HINT = (
    "Start the server with VLLM_SERVER_DEV_MODE=1 and "
    "--worker-extension-cls qerl_repro.vllm_worker.QeRLWorkerExtension."
)


class RolloutNormNoiser:
    """Keeps the targeted norm weights of a rollout model at `clean + noise(seed, step)`.

    Noise never accumulates: at each `apply`, a weight that still holds the value this noiser wrote (the sync did not
    rewrite it) goes back to its stored clean value; a weight the sync rewrote is its own new clean value.

    RIN (`qerl_repro.rin`): with `rin_block_multipliers` (one per decoder block), each norm's noise is scaled by its
    block's multiplier (`rin_final_norm_multiplier` for the final norm); `self.multipliers` holds the per-norm values.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        include_final_norm=False,
        include_qk_norm=False,
        description="",
        rin_block_multipliers=None,
        rin_final_norm_multiplier=1.0,
    ):
        self.targets = find_norm_weights(model, include_final_norm=include_final_norm, include_qk_norm=include_qk_norm)
        require_norm_targets(self.targets, description or type(model).__name__)
        self._clean: dict[str, torch.Tensor] | None = None
        self._noised: dict[str, torch.Tensor] | None = None
        self.multipliers: dict[str, float] | None = None
        self.set_rin(rin_block_multipliers, rin_final_norm_multiplier)

    def set_rin(self, block_multipliers, final_norm_multiplier: float = 1.0) -> None:
        """Scale each norm's noise by its block's RIN multiplier from the next `apply` on (None: plain AQN)."""
        self.multipliers = (
            None
            if block_multipliers is None
            else norm_multipliers(self.targets, block_multipliers, final_norm_multiplier=final_norm_multiplier)
        )

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
        num_noised = apply_aqn_(self.targets, clean, sigma, seed=seed, step=step, multipliers=self.multipliers)
        self._clean = clean
        self._noised = snapshot_norm_weights(self.targets)
        return num_noised

    @torch.no_grad()
    def write_clean(self) -> None:
        """Put the clean weights of the last `apply` into the model (no-op before the first `apply`)."""
        if self._clean is not None:
            for name, weight in self.targets.items():
                weight.data.copy_(self._clean[name])

    @torch.no_grad()
    def write_noised(self) -> None:
        """Put the noised weights of the last `apply` back into the model (no-op before the first `apply`)."""
        if self._noised is not None:
            for name, weight in self.targets.items():
                weight.data.copy_(self._noised[name])

    @contextmanager
    def clean_weights(self):
        """Temporarily put the clean weights back (e.g. for evaluation rollouts), then the noised ones of the latest
        `apply` (which may have happened inside the block, e.g. a sync at a step boundary)."""
        self.write_clean()
        try:
            yield
        finally:
            self.write_noised()


class QeRLWorkerExtension:
    """vLLM worker extension (`--worker-extension-cls qerl_repro.vllm_worker.QeRLWorkerExtension`) for server mode.

    Each worker keeps one `RolloutNormNoiser` on its model, so the noise is the colocate engine's for the same
    `(seed, step)` and identical on every tensor-parallel rank. The methods take and return JSON-friendly values
    (vLLM's `/collective_rpc` passes string arguments only and returns dicts and lists as JSON).
    """

    def qerl_apply_aqn(self, payload: str) -> dict:
        """Apply AQN after a weight sync. `payload` is JSON: sigma, seed, step, include_final_norm, include_qk_norm, and
        for RIN `rin_block_multipliers` (one per block) and `rin_final_norm_multiplier`; with RIN the result also
        holds the per-norm multipliers the worker used (`rin_multipliers`)."""
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
        noiser.set_rin(request.get("rin_block_multipliers"), float(request.get("rin_final_norm_multiplier", 1.0)))
        num_noised = noiser.apply(float(request["sigma"]), seed=int(request["seed"]), step=int(request["step"]))
        result = {"num_noised_modules": num_noised, "num_targets": len(noiser.targets)}
        if noiser.multipliers is not None:
            result["rin_multipliers"] = noiser.multipliers
        return result

    def qerl_write_clean_norms(self) -> dict:
        """Put the clean norm weights back (AQN off, e.g. for evaluation rollouts); no-op before the first AQN."""
        noiser = getattr(self, "_qerl_noiser", None)
        if noiser is not None:
            noiser.write_clean()
        return {"num_written": 0 if noiser is None else len(noiser.targets)}

    def qerl_write_noised_norms(self) -> dict:
        """Put the noised norm weights of the latest `qerl_apply_aqn` back; no-op before the first AQN."""
        noiser = getattr(self, "_qerl_noiser", None)
        if noiser is not None:
            noiser.write_noised()
        return {"num_written": 0 if noiser is None else len(noiser.targets)}

    @torch.no_grad()
    def qerl_norm_weights(self) -> dict:
        """`{name: values}` of every norm weight the worker's model holds (AQN targets, final and q/k norms), as read
        from the model itself: lets a client check what the engine computes with."""
        weights = find_norm_weights(self.model_runner.model, include_final_norm=True, include_qk_norm=True)
        return {name: weight.detach().float().cpu().flatten().tolist() for name, weight in weights.items()}


# ---- the trainer's side of server mode: HTTP calls to `/collective_rpc` (VLLM_SERVER_DEV_MODE=1) -------------------
def server_collective_rpc(client, method: str, payload: dict | None = None) -> list:
    """Call `method` of the worker extension on every worker of the vLLM server behind `client` (TRL's `VLLMClient`),
    with `payload` as its one JSON argument; returns the per-worker results."""
    import requests

    body = {"method": method, "args": [] if payload is None else [json.dumps(payload)], "kwargs": {}, "timeout": None}
    try:  # TRL's session retries server errors (500, 502, 503) a few times, then raises RetryError
        response = client.session.post(f"{client.base_url}/collective_rpc", json=body)
    except requests.exceptions.RetryError as error:
        raise RuntimeError(f"`{method}` on the vLLM server failed ({error}). {SERVER_HINT}") from error
    if response.status_code != 200:
        raise RuntimeError(
            f"`{method}` on the vLLM server failed ({response.status_code}: {response.text}). {SERVER_HINT}"
        )
    results = response.json()["results"]
    if not results or not all(isinstance(result, dict) for result in results):
        raise RuntimeError(
            f"`{method}` on the vLLM server returned {results!r}, not one dict per worker. {SERVER_HINT}"
        )
    return results


def apply_aqn_on_server(
    client,
    sigma: float,
    *,
    seed: int,
    step: int,
    include_final_norm: bool = False,
    include_qk_norm: bool = False,
    rin=None,
) -> int:
    """`qerl_apply_aqn` on every server worker, then a prefix-cache reset; returns how many norms were noised. `rin`
    (a `qerl_repro.rin.RINPlan` or None) sends the per-block RIN multipliers with the request."""
    payload = {
        "sigma": sigma,
        "seed": seed,
        "step": step,
        "include_final_norm": include_final_norm,
        "include_qk_norm": include_qk_norm,
    }
    if rin is not None:
        payload["rin_block_multipliers"] = list(rin.block_multipliers)
        payload["rin_final_norm_multiplier"] = rin.final_norm_multiplier
    results = server_collective_rpc(client, AQN_RPC_METHOD, payload)
    client.reset_prefix_cache()  # cached KV blocks were computed with the previous norms
    return int(results[0]["num_noised_modules"])


def write_server_norms(client, *, clean: bool) -> None:
    """Put the clean (`clean=True`) or the latest noised norm weights into every server worker."""
    server_collective_rpc(client, "qerl_write_clean_norms" if clean else "qerl_write_noised_norms")
    client.reset_prefix_cache()


@contextmanager
def server_clean_norms(client):
    """The server's `RolloutNormNoiser.clean_weights()`: AQN off inside the block, the latest noise back afterwards."""
    write_server_norms(client, clean=True)
    try:
        yield
    finally:
        write_server_norms(client, clean=False)


# A server worker imports this module (as its extension) before loading weights: on the CPU backend, keep the Linear
# weights so that synced weights reach the packed GEMMs (see qerl_repro.vllm_cpu).
if is_vllm_cpu_platform():
    keep_cpu_linear_weights()
