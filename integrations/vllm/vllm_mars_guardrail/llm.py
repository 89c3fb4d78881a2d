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

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from guardrail.errors import InputError, SteeringError
from guardrail.observability.events import EventSink
from guardrail.policy.bundle import PolicyBundle
from guardrail.policy.rollout import Rollout, RolloutConfig
from guardrail.policy.signing import TrustStore
from vllm_mars_guardrail._compat import check_vllm_version
from vllm_mars_guardrail.base import Decision, GuardedCore, GuardedOutput
from vllm_mars_guardrail.patch import CONFIG_KEY

__all__ = ["Decision", "GuardedLLM", "GuardedOutput"]


class GuardedLLM:
    """A ``vllm.LLM`` whose every request is guarded by MARS.

    Args:
        model: what ``vllm.LLM`` takes (a checkpoint directory or hub id; for the
            organism, the directory written by ``guardrail export-vllm``).
        policy: the policy bundle (or its directory) applied in ``enforce`` mode.
        rollout: instead of ``policy``, a rollout (stable, canary, shadows; a
            :class:`~guardrail.policy.rollout.Rollout`, its config or a rollout file):
            each request's ``key`` picks its arm, as in the SDK.
        shadows: with ``policy``, bundles scored in the same pass without steering.
        trust_store: with one, every bundle must carry a valid signature.
        registry: resolves the rollout's references (paths need none).
        mode: the default mode of requests that do not choose one.
        sinks: event sinks that receive a decision record per request.
        **llm_kwargs: passed to ``vllm.LLM`` (``additional_config`` and
            ``worker_extension_cls`` are set here and may not be given).
    """

    def __init__(
        self,
        model: str,
        *,
        policy: PolicyBundle | str | os.PathLike[str] | None = None,
        rollout: Rollout | RolloutConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        shadows: Sequence[PolicyBundle | str | os.PathLike[str]] = (),
        trust_store: TrustStore | None = None,
        registry: Any = None,
        mode: str = "enforce",
        sinks: Sequence[EventSink] = (),
        **llm_kwargs: Any,
    ) -> None:
        check_vllm_version()
        self.core = GuardedCore(
            policy=policy,
            rollout=rollout,
            shadows=shadows,
            trust_store=trust_store,
            registry=registry,
            mode=mode,
            sinks=sinks,
        )
        engine_kwargs = self.core.engine_kwargs(llm_kwargs)

        from vllm import LLM

        self.llm = LLM(model, **engine_kwargs, **llm_kwargs)
        bundles = self.core.bundles()
        reports = self.llm.collective_rpc("mars_install", args=self.core.install_args(bundles))
        self.core.installed_now(bundles)
        self.install_report = reports[0]
        self._self_test()

    @property
    def policy(self) -> PolicyBundle | None:
        return self.core.policy

    @property
    def rollout(self) -> Rollout | None:
        return self.core.rollout

    def set_rollout(
        self, config: Rollout | RolloutConfig | Mapping[str, Any] | str | os.PathLike[str]
    ) -> None:
        """Serve another rollout: its bundles are verified here, installed and checked in
        every worker, and only then used; a failure leaves the current one serving."""
        new, missing, args = self.core.prepare_rollout(config, self.install_report)
        self.llm.collective_rpc("mars_install", args=args)
        self.core.commit_rollout(new, missing)

    # ------------------------------------------------------------------ requests

    def _self_test(self) -> None:
        """One guarded request; the op must have fired for it (see the worker)."""
        from vllm import SamplingParams

        before = self.llm.collective_rpc("mars_stats")[0]
        settings = self.core.settings("enforce", [], None)
        params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={CONFIG_KEY: settings})
        self.llm.generate(["self-test"], params, use_tqdm=False)
        after = self.llm.collective_rpc("mars_stats")[0]
        found = self.llm.collective_rpc("mars_pop", args=([settings["id"]],))[0]
        if settings["mode"] != "off" and (
            after["guarded"] <= before["guarded"] or settings["id"] not in found
        ):
            raise SteeringError(
                "the guardrail's self-test request was not steered by the engine; refusing to "
                "serve (fail closed)"
            )

    def generate(
        self,
        prompts: Any,
        sampling_params: Any = None,
        *,
        mode: str | Sequence[str] | None = None,
        modalities: Sequence[Sequence[str]] | None = None,
        keys: Sequence[str | None] | None = None,
        use_tqdm: bool = False,
    ) -> list[GuardedOutput]:
        """``LLM.generate`` with the guardrail: one :class:`GuardedOutput` per prompt.

        ``mode`` is one mode for all prompts or one per prompt. ``modalities`` names
        each prompt's media for re-centring; by default it is read from the prompt's
        ``multi_modal_data`` keys. A model that takes video as frames (LLaVA) gets
        them as images: say ``["video"]`` for such a prompt. ``keys`` (one per prompt)
        pick rollout arms.
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
            modalities = [self.core.modalities_of(p) for p in items]
        if len(modalities) != n:
            raise InputError(f"{len(modalities)} modality lists for {n} prompts")
        keys = list(keys) if keys is not None else [None] * n
        if len(keys) != n:
            raise InputError(f"{len(keys)} keys for {n} prompts; give one per prompt")
        base = sampling_params or SamplingParams()
        bases = base if isinstance(base, list) else [base] * n
        params, settings = [], []
        for b, m, mods, key in zip(bases, modes, modalities, keys, strict=True):
            s = self.core.settings(m, mods, key)
            params.append(self.core.params_with(b, s))
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
            decision = self.core.decision(s, raw, str(out.outputs[0].text))
            self.core.emit(decision, latency / n)
            results.append(GuardedOutput(out, decision))
        return results
