"""``GuardedAsyncLLM``: vLLM's serving engine (``AsyncLLM``) with the guardrail in it.

The same worker, op and checks as :class:`~vllm_mars_guardrail.GuardedLLM`, behind
vLLM's asynchronous engine with continuous batching: requests are added one at a
time, from many coroutines, and stream their outputs. Build it with
:meth:`GuardedAsyncLLM.create` (it awaits the install and the self-test)::

    engine = await GuardedAsyncLLM.create("./organism-vllm", policy="./policies/organism/1.0.0",
                                          dtype="float32")
    async for out in engine.generate("How do I pick a lock?", SamplingParams(max_tokens=32)):
        if out.finished:
            print(out.text, out.decision.score, out.decision.intervened)

Every output carries vLLM's ``RequestOutput``; the one that finishes the request also
carries the :class:`~vllm_mars_guardrail.base.Decision`. Decisions are collected from
the worker in one ``collective_rpc`` for all requests that finish together. A request
that is cancelled (a client went away) is aborted in the engine and its decision, if
the worker recorded one, is dropped: nothing is left behind.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guardrail.errors import SteeringError
from guardrail.observability.events import EventSink
from guardrail.policy.bundle import PolicyBundle
from guardrail.policy.rollout import Rollout, RolloutConfig
from guardrail.policy.signing import TrustStore
from vllm_mars_guardrail._compat import check_vllm_version
from vllm_mars_guardrail.base import Decision, GuardedCore

__all__ = ["GuardedAsyncLLM", "GuardedStreamOutput"]


@dataclass(frozen=True)
class GuardedStreamOutput:
    """One output of a streamed request; ``decision`` is set on the finishing one."""

    output: Any
    decision: Decision | None = None

    @property
    def finished(self) -> bool:
        return bool(self.output.finished)

    @property
    def text(self) -> str:
        return str(self.output.outputs[0].text)


class _Decisions:
    """Collects decisions from the worker: the requests that finish in the same event
    loop turn share one ``mars_pop`` call."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.pending: dict[str, asyncio.Future[dict[str, Any] | None]] = {}
        self.task: asyncio.Task[None] | None = None

    async def get(self, request_id: str) -> dict[str, Any] | None:
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the other requests finishing in this turn join
        while self.pending:
            batch, self.pending = self.pending, {}
            try:
                found = (await self.engine.collective_rpc("mars_pop", args=(list(batch),)))[0]
            except BaseException as exc:  # the engine died: every waiter learns it
                for future in batch.values():
                    if not future.done():
                        future.set_exception(
                            SteeringError(f"could not collect the guardrail's decision: {exc!r}")
                        )
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for request_id, future in batch.items():
                if not future.done():
                    future.set_result(found.get(request_id))


class GuardedAsyncLLM:
    """vLLM's ``AsyncLLM`` with every request guarded by MARS.

    Build it with :meth:`create`; the arguments are :class:`~vllm_mars_guardrail.GuardedLLM`'s
    (``policy`` or ``rollout``, ``shadows``, ``trust_store``, ``registry``, ``mode``,
    ``sinks``), and the rest go to ``AsyncEngineArgs``.
    """

    def __init__(self, engine: Any, core: GuardedCore) -> None:
        self.engine = engine
        self.core = core
        self._decisions = _Decisions(engine)
        self._change = asyncio.Lock()
        self.install_report: dict[str, Any] = {}

    @classmethod
    async def create(
        cls,
        model: str,
        *,
        policy: PolicyBundle | str | os.PathLike[str] | None = None,
        rollout: Rollout | RolloutConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        shadows: Sequence[PolicyBundle | str | os.PathLike[str]] = (),
        trust_store: TrustStore | None = None,
        registry: Any = None,
        mode: str = "enforce",
        sinks: Sequence[EventSink] = (),
        **engine_args: Any,
    ) -> GuardedAsyncLLM:
        core = GuardedCore(
            policy=policy,
            rollout=rollout,
            shadows=shadows,
            trust_store=trust_store,
            registry=registry,
            mode=mode,
            sinks=sinks,
        )
        return await cls.from_core(model, core, **engine_args)

    @classmethod
    async def from_core(cls, model: str, core: GuardedCore, **engine_args: Any) -> GuardedAsyncLLM:
        """Start the engine for a :class:`GuardedCore` already built (its bundles loaded
        and verified), install them in the worker and run the self-test."""
        check_vllm_version()
        kwargs = core.engine_kwargs(engine_args)

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=model, **kwargs, **engine_args)
        engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        self = cls(engine, core)
        try:
            bundles = core.bundles()
            reports = await engine.collective_rpc("mars_install", args=core.install_args(bundles))
            core.installed_now(bundles)
            self.install_report = reports[0]
            await self.self_test()
        except BaseException:
            engine.shutdown()
            raise
        return self

    def shutdown(self) -> None:
        self.engine.shutdown()

    @property
    def policy(self) -> PolicyBundle | None:
        return self.core.policy

    @property
    def rollout(self) -> Rollout | None:
        return self.core.rollout

    async def set_rollout(
        self, config: Rollout | RolloutConfig | Mapping[str, Any] | str | os.PathLike[str]
    ) -> None:
        """Serve another rollout: verified here, installed and checked in every worker,
        then used; a failure leaves the current one serving."""
        async with self._change:
            new, missing, args = await asyncio.to_thread(
                self.core.prepare_rollout, config, self.install_report
            )
            await self.engine.collective_rpc("mars_install", args=args)
            self.core.commit_rollout(new, missing)

    async def self_test(self) -> Decision:
        """One guarded request; the op must have fired for it (see the worker)."""
        from vllm import SamplingParams

        before = (await self.engine.collective_rpc("mars_stats"))[0]
        final = None
        async for out in self.generate(
            "self-test", SamplingParams(max_tokens=1, temperature=0.0), mode="enforce"
        ):
            final = out
        after = (await self.engine.collective_rpc("mars_stats"))[0]
        if final is None or final.decision is None:
            raise SteeringError("the guardrail's self-test request returned no decision")
        if final.decision.mode != "off" and after["guarded"] <= before["guarded"]:
            raise SteeringError(
                "the guardrail's self-test request was not steered by the engine; refusing to "
                "serve (fail closed)"
            )
        return final.decision

    async def generate(
        self,
        prompt: Any,
        sampling_params: Any = None,
        *,
        request_id: str | None = None,
        mode: str | None = None,
        modalities: Sequence[str] | None = None,
        key: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GuardedStreamOutput]:
        """``AsyncLLM.generate`` with the guardrail; ``key`` picks the rollout arm.

        ``modalities`` names the prompt's media for re-centring (default: its
        ``multi_modal_data`` keys). The output that finishes the request carries the
        decision; if the worker recorded none, the request fails instead (fail closed).
        """
        from vllm import SamplingParams

        mods = self.core.modalities_of(prompt) if modalities is None else list(modalities)
        settings = self.core.settings(mode, mods, key, request_id=request_id)
        params = self.core.params_with(sampling_params or SamplingParams(), settings)
        rid = settings["id"]
        start = time.perf_counter()
        finished = False
        try:
            async for out in self.engine.generate(prompt, params, rid, **kwargs):
                if not out.finished:
                    yield GuardedStreamOutput(out)
                    continue
                raw = await self._decisions.get(rid)
                finished = True
                if raw is None:
                    raise SteeringError(
                        f"request {rid}: the engine returned no guardrail decision; the output "
                        "is withheld (fail closed)"
                    )
                decision = self.core.decision(settings, raw, str(out.outputs[0].text))
                self.core.emit(decision, time.perf_counter() - start)
                yield GuardedStreamOutput(out, decision)
        finally:
            if not finished:
                # Cancelled or failed: vLLM aborted the request; drop whatever the worker
                # recorded for it (the abort reached the engine before this call).
                asyncio.get_running_loop().create_task(self._drop(rid))

    async def _drop(self, request_id: str) -> None:
        try:
            await self.engine.collective_rpc("mars_pop", args=([request_id],))
        except Exception:  # the engine is gone: so is what it recorded
            pass

    async def stats(self) -> dict[str, int]:
        """The worker's counters: steps planned, rows guarded, decisions not collected."""
        return dict((await self.engine.collective_rpc("mars_stats"))[0])
