"""``GuardedLLM``: vLLM's offline ``LLM`` with the guardrail in its engine.

The policy (and any shadow policies) and the trust store are given once. The
bundles are verified here (integrity, signature under a trust store), sent to every
worker, verified there again, and the engine is started with the op compiled into
the layers they steer. Every request carries its settings in
``SamplingParams.extra_args["mars_guardrail"]`` (its id, mode, policy and
modalities); each output comes back with its :class:`Decision`.

Before it returns, the constructor runs one guarded request and checks that the op
fired: an engine that would serve unguarded output never starts.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from safetensors.torch import save as save_safetensors

from guardrail.errors import InputError, SteeringError
from guardrail.observability.events import DecisionRecord, EventSink
from guardrail.policy.bundle import PolicyBundle
from guardrail.policy.signing import TrustStore, load_verified, verify_bundle
from guardrail.refusal import is_refusal
from vllm_mars_guardrail._compat import check_vllm_version
from vllm_mars_guardrail.patch import CONFIG_KEY, engine_config

__all__ = ["Decision", "GuardedLLM", "GuardedOutput"]

EXTENSION = "vllm_mars_guardrail.worker.MarsWorkerExtension"
MODES = ("enforce", "shadow", "off")


@dataclass(frozen=True)
class Decision:
    """The guardrail's decision on one request (no text)."""

    request_id: str
    mode: str
    policy_name: str | None
    policy_version: str | None
    layer: int | None
    score: float | None
    strength: float
    would_strength: float
    intervened: bool
    refused: bool
    modalities: tuple[str, ...]
    shadows: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "mode": self.mode,
            "policy_name": self.policy_name,
            "policy_version": self.policy_version,
            "layer": self.layer,
            "score": self.score,
            "strength": self.strength,
            "intervened": self.intervened,
            "refused": self.refused,
            "modalities": list(self.modalities),
            "shadows": self.shadows,
        }


@dataclass(frozen=True)
class GuardedOutput:
    """A vLLM ``RequestOutput`` and the guardrail's decision on its prompt."""

    output: Any
    decision: Decision

    @property
    def text(self) -> str:
        return str(self.output.outputs[0].text)


def _wire(bundle: PolicyBundle) -> dict[str, Any]:
    manifest = bundle.sealed_manifest()
    return {
        "digest": manifest.digest,
        "manifest": json.dumps(manifest.model_dump(mode="json")),
        "tensors": save_safetensors(dict(bundle.tensors), metadata={"format": "pt"}),
    }


def _load(
    policy: PolicyBundle | str | os.PathLike[str], trust_store: TrustStore | None
) -> PolicyBundle:
    if isinstance(policy, PolicyBundle):
        policy.verify_integrity()
        if trust_store is not None:
            verify_bundle(policy, trust_store)
        return policy
    return load_verified(policy, trust_store)


class GuardedLLM:
    """A ``vllm.LLM`` whose every request is guarded by MARS.

    Args:
        model: what ``vllm.LLM`` takes (a checkpoint directory or hub id; for the
            organism, the directory written by ``guardrail export-vllm``).
        policy: the policy bundle (or its directory) applied in ``enforce`` mode.
        shadows: bundles scored in the same pass without steering.
        trust_store: with one, every bundle must carry a valid signature.
        mode: the default mode of requests that do not choose one.
        sinks: event sinks that receive a decision record per request.
        **llm_kwargs: passed to ``vllm.LLM`` (``additional_config`` and
            ``worker_extension_cls`` are set here and may not be given).
    """

    def __init__(
        self,
        model: str,
        *,
        policy: PolicyBundle | str | os.PathLike[str],
        shadows: Sequence[PolicyBundle | str | os.PathLike[str]] = (),
        trust_store: TrustStore | None = None,
        mode: str = "enforce",
        sinks: Sequence[EventSink] = (),
        **llm_kwargs: Any,
    ) -> None:
        check_vllm_version()
        if mode not in MODES:
            raise InputError(f"mode {mode!r} is not one of {MODES}")
        for key in ("additional_config", "worker_extension_cls"):
            if key in llm_kwargs:
                raise InputError(f"{key} is set by GuardedLLM; do not pass it")
        self.policy = _load(policy, trust_store)
        self.shadows = [_load(s, trust_store) for s in shadows]
        self.mode = mode
        self.sinks = list(sinks)
        bundles = [self.policy, *self.shadows]
        self._by_digest = {b.sealed_manifest().digest: b for b in bundles}
        self._digest = self.policy.sealed_manifest().digest
        self._shadow_digests = [b.sealed_manifest().digest for b in self.shadows]

        from vllm import LLM

        self.llm = LLM(
            model,
            additional_config=engine_config([b.layer for b in bundles]),
            worker_extension_cls=EXTENSION,
            **llm_kwargs,
        )
        default = {"mode": mode, "policy": self._digest, "shadows": self._shadow_digests}
        reports = self.llm.collective_rpc(
            "mars_install", args=([_wire(b) for b in bundles], default)
        )
        self.install_report = reports[0]
        self._self_test()

    # ------------------------------------------------------------------ requests

    def _self_test(self) -> None:
        """One guarded request; the op must have fired for it (see the worker)."""
        from vllm import SamplingParams

        before = self.llm.collective_rpc("mars_stats")[0]
        settings = self._settings("enforce", [])
        params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={CONFIG_KEY: settings})
        self.llm.generate(["self-test"], params, use_tqdm=False)
        after = self.llm.collective_rpc("mars_stats")[0]
        found = self.llm.collective_rpc("mars_pop", args=([settings["id"]],))[0]
        if after["guarded"] <= before["guarded"] or settings["id"] not in found:
            raise SteeringError(
                "the guardrail's self-test request was not steered by the engine; refusing to "
                "serve (fail closed)"
            )

    def _settings(self, mode: str | None, modalities: Sequence[str]) -> dict[str, Any]:
        mode = mode or self.mode
        if mode not in MODES:
            raise InputError(f"mode {mode!r} is not one of {MODES}")
        for m in modalities:
            if m not in ("image", "video"):
                raise InputError(f"modality {m!r} is not one of ('image', 'video')")
            if self.policy.parameters.recenter != "none" and self.policy.delta(m) is None:
                raise InputError(
                    f"policy {self.policy.ref} has no re-centring offset for {m} input; "
                    f"recalibrate with {m} enabled"
                )
        return {
            "id": uuid.uuid4().hex,
            "mode": mode,
            "policy": self._digest,
            "shadows": self._shadow_digests,
            "modalities": sorted(set(modalities)),
        }

    def generate(
        self,
        prompts: Any,
        sampling_params: Any = None,
        *,
        mode: str | Sequence[str] | None = None,
        modalities: Sequence[Sequence[str]] | None = None,
        use_tqdm: bool = False,
    ) -> list[GuardedOutput]:
        """``LLM.generate`` with the guardrail: one :class:`GuardedOutput` per prompt.

        ``mode`` is one mode for all prompts or one per prompt. ``modalities`` names
        each prompt's media for re-centring; by default it is read from the prompt's
        ``multi_modal_data`` keys. A model that takes video as frames (LLaVA) gets
        them as images: say ``["video"]`` for such a prompt.
        """
        from vllm import SamplingParams

        items = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if not items:
            raise InputError("no prompts given")
        n = len(items)
        modes = [mode] * n if mode is None or isinstance(mode, str) else list(mode)
        if len(modes) != n:
            raise InputError(f"{len(modes)} modes for {n} prompts; give one per prompt")
        if modalities is None:
            modalities = [
                sorted((p.get("multi_modal_data") or {}).keys()) if isinstance(p, dict) else []
                for p in items
            ]
        if len(modalities) != n:
            raise InputError(f"{len(modalities)} modality lists for {n} prompts")
        base = sampling_params or SamplingParams()
        bases = base if isinstance(base, list) else [base] * n
        params, settings = [], []
        for b, m, mods in zip(bases, modes, modalities, strict=True):
            s = self._settings(m, mods)
            p = b.clone()
            p.extra_args = {**(p.extra_args or {}), CONFIG_KEY: s}
            params.append(p)
            settings.append(s)
        start = time.perf_counter()
        outputs = self.llm.generate(items, params, use_tqdm=use_tqdm)
        latency = time.perf_counter() - start
        found = self.llm.collective_rpc("mars_pop", args=([s["id"] for s in settings],))[0]
        results = []
        for out, s in zip(outputs, settings, strict=True):
            raw = found.get(s["id"])
            if raw is None:
                raise SteeringError(
                    f"request {s['id']}: the engine returned no guardrail decision; the output "
                    "is withheld (fail closed)"
                )
            decision = self._decision(s, raw, out)
            self._emit(decision, latency / n)
            results.append(GuardedOutput(out, decision))
        return results

    def _decision(self, s: dict[str, Any], raw: dict[str, Any], out: Any) -> Decision:
        mode = s["mode"]
        applied = mode != "off"
        return Decision(
            request_id=s["id"],
            mode=mode,
            policy_name=self.policy.name if applied else None,
            policy_version=self.policy.version if applied else None,
            layer=raw.get("layer"),
            score=raw.get("score"),
            strength=float(raw.get("strength", 0.0)),
            would_strength=float(raw.get("would_strength", 0.0)),
            intervened=bool(raw.get("intervened", False)),
            refused=is_refusal(str(out.outputs[0].text)),
            modalities=tuple(s["modalities"]),
            shadows=dict(raw.get("shadows", {})),
        )

    def _emit(self, d: Decision, latency: float) -> None:
        if not self.sinks:
            return
        record = DecisionRecord(
            request_id=d.request_id,
            policy_name=d.policy_name,
            policy_version=d.policy_version,
            mode=d.mode,
            layer=d.layer,
            score=d.score,
            strength=d.strength,
            modalities=list(d.modalities),
            refused=d.refused,
            intervened=d.intervened,
            would_intervene=d.would_strength > 0,
            latency_s=latency,
        )
        for sink in self.sinks:
            sink.emit(record)
