"""The guardrail inside a vLLM worker: policies, the per-step plan and the check.

vLLM imports this module in every worker process when it resolves
``worker_extension_cls`` (before the model is built), so importing it patches the
decoder layers (:mod:`vllm_mars_guardrail.patch`). :class:`MarsWorkerExtension` is
mixed into the worker class; its methods are called by name through
``collective_rpc``:

- ``mars_install(policies, default)`` loads the policies (verified again here:
  digest, tensors, shape against this model), checks that the op sits in the layers
  they steer, and wraps the model runner so each step is planned and checked;
- ``mars_pop(ids)`` hands back (and forgets) the decisions of finished requests.

Each step, before the model runs, the plan finds the requests whose prompt ends in
this step (``computed <= P - 1 < computed + scheduled``), their flat index ``t*``
(``query_start_loc[i] + P - 1 - computed``) and their settings from
``SamplingParams.extra_args["mars_guardrail"]``. After the model ran, every planned
group must have been applied exactly once; if not, the step raises and the engine
stops (fail closed) instead of returning tokens that were not guarded.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from guardrail.adapters import adapter_spec, resolve_path
from guardrail.errors import PolicyCompatibilityError, SteeringError
from guardrail.policy.bundle import PolicyBundle, parse_manifest
from guardrail.policy.plans import recentring_offset, row_gates
from vllm_mars_guardrail import op
from vllm_mars_guardrail.patch import CONFIG_KEY, install, patched_classes

install()

ARGS_KEY = CONFIG_KEY
MODES = ("enforce", "shadow", "off")
MAX_KEPT = 65536  # decisions nobody collected (aborted requests) are dropped oldest first


def _policy_from_wire(wire: dict[str, Any]) -> PolicyBundle:
    manifest = parse_manifest(json.loads(wire["manifest"]), source="collective_rpc")
    bundle = PolicyBundle(manifest, load_safetensors(wire["tensors"]))
    bundle.verify_integrity()
    if bundle.manifest.digest != wire["digest"]:
        raise PolicyCompatibilityError(
            f"policy {bundle.ref}: the worker received digest {bundle.manifest.digest}, "
            f"expected {wire['digest']}"
        )
    return bundle


class _Guard:
    def __init__(self, runner: Any, policies: dict[str, PolicyBundle], default: dict[str, Any]):
        self.runner = runner
        self.policies = policies
        self.default = default
        self.decisions: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.steps = 0
        self.guarded = 0

    # -- per-request settings ----------------------------------------------------

    def settings(self, req_id: str) -> dict[str, Any]:
        request = self.runner.requests.get(req_id)
        params = getattr(request, "sampling_params", None)
        extra = (getattr(params, "extra_args", None) or {}).get(ARGS_KEY)
        if extra is None:
            # A request that did not come through the guarded API gets the engine's
            # default (enforce with the default policy): never unguarded by accident.
            return {"id": req_id, "modalities": [], **self.default}
        return extra

    def tensors_of(self, digest: str, device: torch.device) -> dict[str, torch.Tensor]:
        cached = self.tensors.get(digest)
        if cached is None:
            cached = {k: v.to(device) for k, v in self.policies[digest].tensors.items()}
            self.tensors[digest] = cached
        return cached

    # -- the plan ----------------------------------------------------------------

    def plan(
        self, device: torch.device
    ) -> tuple[op.StepPlan | None, list[tuple[str, str, op.RowGroup, int, str]]]:
        """This step's plan, or None when no request's prompt ends in it (a step of
        decoding only: nothing to steer, and the op passes every row through)."""
        runner = self.runner
        batch = runner.input_batch
        n = batch.num_reqs
        starts = runner.query_start_loc.np[: n + 1]
        computed = batch.num_computed_tokens_cpu[:n]
        last = batch.num_prompt_tokens[:n] - 1
        ending = np.flatnonzero((computed <= last) & (last < computed + np.diff(starts)))
        if ending.size == 0:
            return None, []
        rows: dict[tuple[str, bool], list[tuple[int, str, dict[str, Any]]]] = {}
        req_ids = batch.req_ids
        for i in ending.tolist():
            req_id = req_ids[i]
            p, c = int(last[i]) + 1, int(computed[i])
            t_star = int(starts[i]) + (p - 1 - c)
            s = self.settings(req_id)
            mode = s.get("mode", "enforce")
            if mode not in MODES:
                raise SteeringError(f"request {req_id}: unknown guardrail mode {mode!r}")
            applied = s.get("policy")
            if mode != "off":
                if applied is None or applied not in self.policies:
                    raise SteeringError(
                        f"request {req_id}: mode {mode!r} with policy {applied!r}, which this "
                        "engine has not installed; the step is refused (fail closed)"
                    )
                rows.setdefault((applied, mode == "enforce"), []).append((t_star, req_id, s))
            for shadow in s.get("shadows", []):
                if shadow not in self.policies:
                    raise SteeringError(f"request {req_id}: shadow policy {shadow!r} not installed")
                rows.setdefault((shadow, False), []).append((t_star, req_id, s))
            self.decisions[s.get("id", req_id)] = {
                "mode": mode,
                "policy": applied,
                "t_star_prompt_len": p,
                "shadows": {},
            }
        plan = op.StepPlan()
        groups = []
        for (digest, apply), members in rows.items():
            bundle = self.policies[digest]
            t = self.tensors_of(digest, device)
            params = bundle.parameters
            deltas = [recentring_offset(bundle, t, s.get("modalities", [])) for _, _, s in members]
            k = len(members)

            def full(value: float | None, k: int = k) -> torch.Tensor:
                return torch.full(
                    (k,), float("inf") if value is None else float(value), device=device
                )

            group = op.RowGroup(
                layer=bundle.layer,
                rows=torch.tensor([m[0] for m in members], device=device),
                u=t["u"].expand(k, -1),
                p_S=t["p_S"].expand(k),
                g=t["g"].expand(k),
                delta=torch.stack(deltas),
                tau=row_gates(bundle, [s.get("modalities", []) for _, _, s in members], device),
                lam=full(params.lam),
                kappa=full(params.kappa),
                eta=full(params.eta),
                recenter_mode=params.recenter,
                apply_recentering_to_activation=params.apply_recentering_to_activation,
                apply=apply,
            )
            plan.groups.setdefault(bundle.layer, []).append(group)
            for index, (_, req_id, s) in enumerate(members):
                groups.append((s.get("id", req_id), digest, group, index, req_id))
        return plan, groups

    def record(self, groups: list[tuple[str, str, op.RowGroup, int, str]]) -> None:
        for key, digest, group, index, _ in groups:
            if group.fired != 1 or group.score is None or group.strength is None:
                raise SteeringError(
                    f"the steering op ran {group.fired} times for layer {group.layer} in this "
                    "step (expected once): the compiled model does not contain the guardrail's "
                    "op. The step is refused; rebuild the engine through GuardedLLM (fail closed)"
                )
            score = float(group.score[index])
            strength = float(group.strength[index])
            decision = self.decisions[key]
            bundle = self.policies[digest]
            if digest == decision["policy"] and group.apply == (decision["mode"] == "enforce"):
                decision.update(
                    score=score,
                    strength=strength if group.apply else 0.0,
                    would_strength=strength,
                    intervened=bool(group.apply and strength > 0),
                    layer=bundle.layer,
                    policy_ref=bundle.ref,
                )
            else:
                decision["shadows"][bundle.ref] = {"score": score, "would_strength": strength}
        while len(self.decisions) > MAX_KEPT:
            self.decisions.popitem(last=False)

    # -- the wrapped runner method -----------------------------------------------

    def wrap(self) -> None:
        runner = self.runner
        forward = runner._model_forward

        device = next(runner.model.parameters()).device

        def guarded_forward(*args: Any, **kwargs: Any) -> Any:
            plan, groups = self.plan(device)
            op.STEP.plan = plan
            try:
                out = forward(*args, **kwargs)
            finally:
                op.STEP.plan = None
            self.record(groups)
            self.steps += 1
            self.guarded += len(groups)
            return out

        runner._model_forward = guarded_forward


def _decoder_layers(model: Any, config: Any, text: Any) -> Any:
    """The language model's decoder layers, at the path the family's adapter names for
    vLLM (``AdapterSpec.vllm_layers_path``), checked against the config's depth."""
    model_type = str(getattr(config, "model_type", ""))
    spec = adapter_spec(model_type)
    if spec is None or spec.vllm_layers_path is None:
        raise SteeringError(
            f"model type {model_type!r} has no vLLM layer path in its guardrail adapter; this "
            "architecture is not supported by the vLLM integration (register an AdapterSpec "
            "with vllm_layers_path)"
        )
    try:
        layers = resolve_path(model, spec.vllm_layers_path)
    except AttributeError:
        raise SteeringError(
            f"{type(model).__name__} has no {spec.vllm_layers_path}; the adapter's vLLM layer "
            "path does not match this vLLM version"
        ) from None
    if len(layers) != text.num_hidden_layers:
        raise SteeringError(
            f"{type(model).__name__}.{spec.vllm_layers_path} holds {len(layers)} layers, the "
            f"config says {text.num_hidden_layers}"
        )
    return layers


class MarsWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``)."""

    def mars_install(
        self, policies: list[dict[str, Any]], default: dict[str, Any]
    ) -> dict[str, Any]:
        runner = self.model_runner  # type: ignore[attr-defined]
        for attr in ("_model_forward", "input_batch", "query_start_loc", "requests"):
            if not hasattr(runner, attr):
                raise SteeringError(
                    f"vLLM's model runner {type(runner).__name__} has no {attr}; this runner is "
                    "not supported (set VLLM_USE_V2_MODEL_RUNNER=0)"
                )
        model = runner.get_model()
        marked = {
            m._mars_layer: type(m).__name__
            for m in model.modules()
            if getattr(m, "_mars_layer", None) is not None
        }
        indexed = [m for m in model.modules() if hasattr(m, "_mars_index")]
        config = runner.vllm_config.model_config.hf_config
        text = getattr(config, "text_config", None) or config
        layers = _decoder_layers(model, config, text)
        loaded: dict[str, PolicyBundle] = {}
        for wire in policies:
            bundle = _policy_from_wire(wire)
            fp = bundle.manifest.model
            if fp.hidden_size != text.hidden_size or fp.num_layers != text.num_hidden_layers:
                raise PolicyCompatibilityError(
                    f"policy {bundle.ref} was calibrated for hidden size {fp.hidden_size} and "
                    f"{fp.num_layers} layers; this engine's model has {text.hidden_size} and "
                    f"{text.num_hidden_layers}"
                )
            if bundle.parameters.score_positions != 1:
                raise SteeringError(
                    f"policy {bundle.ref} scores {bundle.parameters.score_positions} positions; "
                    "the vLLM engine supports score_positions=1 only"
                )
            in_range = 0 <= bundle.layer < len(layers)
            if not in_range or getattr(layers[bundle.layer], "_mars_layer", None) != bundle.layer:
                raise SteeringError(
                    f"policy {bundle.ref} steers layer {bundle.layer} but the engine's compiled "
                    f"model has the guardrail op in layers {sorted(marked)} (decoder layers "
                    f"found: {len(indexed)}, patched classes: "
                    f"{[c.__name__ for c in patched_classes()]}); this architecture or "
                    "engine configuration is not supported"
                )
            loaded[wire["digest"]] = bundle
        guard = getattr(self, "_mars_guard", None)
        if guard is None:
            guard = _Guard(runner, loaded, default)
            guard.wrap()
            self._mars_guard = guard
        else:
            guard.policies.update(loaded)
            guard.default = default
        return {
            "layers": sorted(marked),
            "policies": sorted(guard.policies),
            "hidden_size": text.hidden_size,
            "num_layers": text.num_hidden_layers,
        }

    def mars_pop(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        guard = getattr(self, "_mars_guard", None)
        if guard is None:
            return {}
        return {i: guard.decisions.pop(i) for i in ids if i in guard.decisions}

    def mars_stats(self) -> dict[str, int]:
        """Steps planned, rows guarded, and decisions not yet collected."""
        guard = getattr(self, "_mars_guard", None)
        if guard is None:
            return {"steps": 0, "guarded": 0, "pending": 0}
        return {"steps": guard.steps, "guarded": guard.guarded, "pending": len(guard.decisions)}
