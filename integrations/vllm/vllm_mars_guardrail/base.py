"""What the offline and the serving engine share: policies, rollouts, settings, decisions.

:class:`GuardedLLM` (``vllm.LLM``) and :class:`~vllm_mars_guardrail.async_llm.GuardedAsyncLLM`
(``vllm.v1.engine.async_llm.AsyncLLM``) differ only in how they call the engine
(blocking or awaited). Everything the guardrail decides in the parent process lives
here, once:

- the bundles: one policy (plus shadows), or a :class:`~guardrail.policy.rollout.Rollout`
  (stable, canary, shadows), all verified here and again in the worker;
- per request, the settings that travel in ``SamplingParams.extra_args``: its id,
  mode, the digest of the policy that steers it (the rollout arm its key falls in),
  the shadows scored beside it and its modalities;
- the :class:`Decision` built from what the worker recorded, and its events.

A rollout change (:meth:`GuardedCore.prepare_rollout`) loads and verifies the new
bundles first, the engine installs them in the worker (which checks they fit the
model and that their layer holds the op), and only then is the new rollout served:
a change that fails leaves the old one serving.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from safetensors.torch import save as save_safetensors

from guardrail.errors import InputError
from guardrail.observability.events import DecisionRecord, EventSink
from guardrail.policy.bundle import PolicyBundle
from guardrail.policy.rollout import Rollout, RolloutConfig
from guardrail.policy.signing import TrustStore, load_verified, verify_bundle
from guardrail.refusal import is_refusal
from vllm_mars_guardrail.patch import CONFIG_KEY, engine_config

__all__ = ["Decision", "GuardedCore", "GuardedOutput"]

EXTENSION = "vllm_mars_guardrail.worker.MarsWorkerExtension"
MODES = ("enforce", "shadow", "off")
MODALITIES = ("image", "video")


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
    arm: str | None = None

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
            "arm": self.arm,
        }


@dataclass(frozen=True)
class GuardedOutput:
    """A vLLM ``RequestOutput`` and the guardrail's decision on its prompt."""

    output: Any
    decision: Decision

    @property
    def text(self) -> str:
        return str(self.output.outputs[0].text)


def wire(bundle: PolicyBundle) -> dict[str, Any]:
    """A bundle as the worker receives it (``collective_rpc`` pickles plain data)."""
    manifest = bundle.sealed_manifest()
    return {
        "digest": manifest.digest,
        "manifest": json.dumps(manifest.model_dump(mode="json")),
        "tensors": save_safetensors(dict(bundle.tensors), metadata={"format": "pt"}),
    }


def digest_of(bundle: PolicyBundle) -> str:
    return bundle.sealed_manifest().digest


def load_bundle(
    policy: PolicyBundle | str | os.PathLike[str], trust_store: TrustStore | None
) -> PolicyBundle:
    if isinstance(policy, PolicyBundle):
        policy.verify_integrity()
        if trust_store is not None:
            verify_bundle(policy, trust_store)
        return policy
    return load_verified(policy, trust_store)


class GuardedCore:
    """The guardrail's side of a guarded vLLM engine (see the module doc).

    Exactly one of ``policy`` and ``rollout`` is given. ``rollout`` is a
    :class:`~guardrail.policy.rollout.Rollout`, a config (mapping or
    :class:`~guardrail.policy.rollout.RolloutConfig`) or a rollout file; references
    in it are resolved through ``registry``. Every bundle the rollout may serve is in
    the worker before a request can be assigned to it.
    """

    def __init__(
        self,
        *,
        policy: PolicyBundle | str | os.PathLike[str] | None,
        rollout: Rollout | RolloutConfig | Mapping[str, Any] | str | os.PathLike[str] | None,
        shadows: Sequence[PolicyBundle | str | os.PathLike[str]],
        trust_store: TrustStore | None,
        registry: Any,
        mode: str,
        sinks: Sequence[EventSink],
    ) -> None:
        if mode not in MODES:
            raise InputError(f"mode {mode!r} is not one of {MODES}")
        if (policy is None) == (rollout is None):
            raise InputError("give exactly one of policy= and rollout=")
        if rollout is not None and shadows:
            raise InputError("with rollout=, list shadow policies in the rollout config")
        self.trust_store = trust_store
        self.registry = registry
        self.mode = mode
        self.sinks = list(sinks)
        self.rollout: Rollout | None = None
        self.policy: PolicyBundle | None = None
        self.shadows: list[PolicyBundle] = []
        if rollout is not None:
            self.rollout = self._build_rollout(rollout)
        else:
            assert policy is not None
            self.policy = load_bundle(policy, trust_store)
            self.shadows = [load_bundle(s, trust_store) for s in shadows]
        self.installed: dict[str, PolicyBundle] = {}

    # ------------------------------------------------------------------ bundles

    def _build_rollout(self, rollout: Any) -> Rollout:
        if isinstance(rollout, Rollout):
            if self.trust_store is not None and rollout.trust_store is None:
                raise InputError(
                    "the rollout was built without a trust store but the engine has one; build "
                    "it with Rollout(..., trust_store=...) so every bundle it serves is verified"
                )
            return rollout
        if isinstance(rollout, (str, os.PathLike)):
            return Rollout.from_file(rollout, self.registry, trust_store=self.trust_store)
        return Rollout(rollout, self.registry, trust_store=self.trust_store)

    def bundles(self, rollout: Rollout | None = None) -> list[PolicyBundle]:
        """Every bundle requests may be steered or scored with."""
        rollout = rollout if rollout is not None else self.rollout
        if rollout is None:
            assert self.policy is not None
            found = [self.policy, *self.shadows]
        else:
            found = [
                rollout.stable,
                *([rollout.canary] if rollout.canary else []),
                *rollout.shadows,
            ]
        unique: dict[str, PolicyBundle] = {}
        for b in found:
            unique.setdefault(digest_of(b), b)
        return list(unique.values())

    def engine_kwargs(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """What the engine is built with: the op in the bundles' layers, the extension."""
        for key in ("additional_config", "worker_extension_cls"):
            if key in given:
                raise InputError(f"{key} is set by the guardrail; do not pass it")
        return {
            "additional_config": engine_config([b.layer for b in self.bundles()]),
            "worker_extension_cls": EXTENSION,
        }

    def install_args(
        self, bundles: Sequence[PolicyBundle], rollout: Rollout | None = None
    ) -> tuple[Any, ...]:
        """``mars_install``'s arguments: the bundles, and the settings of a request that
        reaches the engine without the guardrail's: the engine's mode with the stable
        policy (of ``rollout``, default the current one) and its shadows."""
        rollout = rollout if rollout is not None else self.rollout
        if rollout is None:
            assert self.policy is not None
            stable, shadows = self.policy, self.shadows
        else:
            stable, shadows = rollout.stable, rollout.shadows
        default = {
            "mode": self.mode,
            "policy": digest_of(stable),
            "shadows": [digest_of(s) for s in shadows],
            "arm": "stable" if rollout is not None else None,
        }
        return ([wire(b) for b in bundles], default)

    def installed_now(self, bundles: Sequence[PolicyBundle]) -> None:
        for b in bundles:
            self.installed[digest_of(b)] = b

    def prepare_rollout(
        self,
        config: Rollout | RolloutConfig | Mapping[str, Any] | str | os.PathLike[str],
        report: Mapping[str, Any],
    ) -> tuple[Rollout, list[PolicyBundle], tuple[Any, ...]]:
        """Load and verify ``config``'s bundles and check the new ones fit the running
        engine (``report``: what ``mars_install`` answered at start). Returns the new
        rollout, the bundles the worker must install, and ``mars_install``'s arguments
        for them; :meth:`commit_rollout` then serves it. Nothing changes yet."""
        if self.rollout is None:
            raise InputError(
                "this engine was built with policy=; build it with rollout= to change rollouts"
            )
        new = self._build_rollout(config)
        missing = [b for b in self.bundles(new) if digest_of(b) not in self.installed]
        self.check_fits(missing, report)
        return new, missing, self.install_args(missing, new)

    def check_fits(self, bundles: Sequence[PolicyBundle], report: Mapping[str, Any]) -> None:
        """Refuse, before the worker is asked, bundles the running engine cannot steer
        with: another layer than those compiled with the op, another model shape."""
        layers = set(report.get("layers", []))
        for b in bundles:
            if b.layer not in layers:
                raise InputError(
                    f"policy {b.ref} steers layer {b.layer}; this engine was built with the op in "
                    f"layers {sorted(layers)}. Start a new engine whose rollout names it"
                )
            fp = b.manifest.model
            shape = (report.get("hidden_size"), report.get("num_layers"))
            if shape != (fp.hidden_size, fp.num_layers):
                raise InputError(
                    f"policy {b.ref} was calibrated for hidden size {fp.hidden_size} and "
                    f"{fp.num_layers} layers; the engine's model has {shape[0]} and {shape[1]}"
                )

    def commit_rollout(self, new: Rollout, installed: Sequence[PolicyBundle]) -> None:
        """Serve ``new``, once the worker installed ``installed`` (its new bundles)."""
        self.installed_now(installed)
        missing = [b.ref for b in self.bundles(new) if digest_of(b) not in self.installed]
        if missing:
            raise InputError(f"bundles {missing} are not installed in the engine's workers")
        self.rollout = new

    # ------------------------------------------------------------------ per request

    def settings(
        self,
        mode: str | None,
        modalities: Sequence[str],
        key: str | None,
        *,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """One request's ``extra_args`` entry; ``key`` picks its rollout arm."""
        mode = mode or self.mode
        if mode not in MODES:
            raise InputError(f"mode {mode!r} is not one of {MODES}")
        arm: str | None = None
        if self.rollout is not None:
            assignment = self.rollout.resolve(key)
            applied, shadows, arm = assignment.policy, assignment.shadows, assignment.arm
            if applied is None:  # the kill switch: unsteered, on purpose
                mode = "off"
        else:
            applied, shadows = self.policy, self.shadows
        for m in modalities:
            if m not in MODALITIES:
                raise InputError(f"modality {m!r} is not one of {MODALITIES}")
            if (
                mode != "off"
                and applied is not None
                and applied.parameters.recenter != "none"
                and applied.delta(m) is None
            ):
                raise InputError(
                    f"policy {applied.ref} has no re-centring offset for {m} input; "
                    f"recalibrate with {m} enabled"
                )
        return {
            "id": request_id or uuid.uuid4().hex,
            "mode": mode,
            "policy": digest_of(applied) if applied is not None else None,
            "shadows": [digest_of(s) for s in shadows],
            "modalities": sorted(set(modalities)),
            "arm": arm,
        }

    def params_with(self, params: Any, settings: dict[str, Any]) -> Any:
        """A copy of ``params`` that carries ``settings`` to the worker."""
        p = params.clone()
        p.extra_args = {**(p.extra_args or {}), CONFIG_KEY: settings}
        return p

    def decision(self, s: dict[str, Any], raw: dict[str, Any], text: str) -> Decision:
        bundle = self.installed.get(s["policy"]) if s["policy"] else None
        applied = s["mode"] != "off" and bundle is not None
        return Decision(
            request_id=s["id"],
            mode=s["mode"],
            policy_name=bundle.name if applied and bundle else None,
            policy_version=bundle.version if applied and bundle else None,
            layer=raw.get("layer"),
            score=raw.get("score"),
            strength=float(raw.get("strength", 0.0)),
            would_strength=float(raw.get("would_strength", 0.0)),
            intervened=bool(raw.get("intervened", False)),
            refused=is_refusal(text),
            modalities=tuple(s["modalities"]),
            shadows=dict(raw.get("shadows", {})),
            arm=s.get("arm"),
        )

    def emit(self, d: Decision, latency: float) -> None:
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
            rollout_arm=d.arm,
        )
        for sink in self.sinks:
            sink.emit(record)

    def modalities_of(self, prompt: Any) -> list[str]:
        """A prompt's media, from its ``multi_modal_data`` keys (LLaVA's video-as-frames
        prompts say ``["video"]`` themselves)."""
        if isinstance(prompt, dict):
            return sorted((prompt.get("multi_modal_data") or {}).keys())
        return []
