"""The vLLM engine behind ``guardrail serve --engine vllm``.

:class:`VLLMEngine` implements the server's :class:`~guardrail.serve.engine.ChatEngine`
on :class:`~vllm_mars_guardrail.async_llm.GuardedAsyncLLM`: every HTTP request is one
vLLM request, batched continuously by the engine (no micro-batching window). The
HTTP layer, the admin API, the metrics and the error mapping are the server's own;
what differs from the transformers engine:

- **Prompts** are rendered by the SDK's own adapter (:meth:`ModelAdapter.render
  <guardrail.adapters.ModelAdapter.render>`: caller text made inert, the model's chat
  template), on a weightless copy of the model's modules built from its config, so
  the vLLM server sees the same prompt the HF guardrail would.
- **Results** are :class:`~guardrail.result.GuardrailResult`, built from vLLM's output
  and the worker's decision, with the SDK's spans (parented on the caller's trace
  context), metrics and events.
- **The control surface** the admin routes use (:class:`VLLMControl`: mode, policy,
  rollout, ``set_rollout``, events, telemetry) changes the rollout in the engine:
  new bundles are installed and checked in the worker before any request uses them.
- **Backpressure**: more than ``max_queue`` unfinished requests is a 429.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from guardrail.adapters import ModelAdapter
from guardrail.errors import GuardrailError
from guardrail.limits import InputLimits
from guardrail.messages import Conversation, parse_conversation
from guardrail.observability.events import EventDispatcher, EventSink, build_events
from guardrail.observability.telemetry import Telemetry
from guardrail.result import GuardrailResult, ShadowScore, Usage
from guardrail.serve.engine import EngineRequest, serve_self_test
from guardrail.serve.errors import NotReadyError, ServerBusyError
from guardrail.serve.schema import GenerationSettings
from vllm_mars_guardrail.async_llm import GuardedAsyncLLM, GuardedStreamOutput
from vllm_mars_guardrail.base import Decision, GuardedCore

__all__ = ["VLLMControl", "VLLMEngine", "weightless_adapter"]


def weightless_adapter(model_dir: str, processor: Any) -> ModelAdapter:
    """The SDK's adapter for ``model_dir``'s architecture, on modules with no weights
    (meta device): it renders prompts and names layers, it never runs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        try:
            model = AutoModelForImageTextToText.from_config(config)
        except ValueError:
            model = AutoModelForCausalLM.from_config(config)
    return ModelAdapter(model, processor)


class VLLMControl:
    """What the server's status and admin routes read and change (the transformers
    engine gives them its :class:`~guardrail.Guardrail`)."""

    def __init__(
        self,
        owner: VLLMEngine,
        *,
        model_name: str,
        sinks: Sequence[EventSink] = (),
        limits: InputLimits | None = None,
    ):
        self.owner = owner
        self.core = owner.core
        self.registry = owner.core.registry
        self.limits = limits or InputLimits(allow_paths=False)
        self.events = EventDispatcher(sinks)
        self.telemetry = Telemetry(model_name)
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def mode(self) -> str:
        return self.core.mode

    @property
    def policy(self) -> Any:
        return self.core.policy

    @property
    def rollout(self) -> Any:
        return self.core.rollout

    def set_rollout(self, config: Any) -> None:
        """Called by the admin routes from a worker thread; runs on the server's loop."""
        engine = self.owner.engine
        if engine is None or self.loop is None:
            raise NotReadyError("the vLLM engine is still starting; retry when /ready answers 200")
        asyncio.run_coroutine_threadsafe(engine.set_rollout(config), self.loop).result()


class VLLMEngine:
    """A :class:`GuardedAsyncLLM` behind the server's :class:`ChatEngine` protocol.

    The engine is built when the server starts, in the background (``/health``
    answers at once, ``/ready`` once the engine is built and the self-test passed).

    Args:
        model: what vLLM loads (for the organism, the ``guardrail export-vllm`` directory).
        core: the guardrail's policies or rollout (:class:`GuardedCore`), already verified.
        adapter: renders conversations (see :func:`weightless_adapter`).
        model_name: the served model's name (spans, ``/v1/models``).
        max_queue: most unfinished requests; one more is refused with 429.
        **engine_args: ``AsyncEngineArgs`` (``dtype``, ``max_model_len``, ...).
    """

    def __init__(
        self,
        model: str,
        core: GuardedCore,
        adapter: ModelAdapter,
        *,
        model_name: str,
        max_queue: int = 256,
        sinks: Sequence[EventSink] = (),
        **engine_args: Any,
    ):
        self.model = model
        self.core = core
        self.adapter = adapter
        self.max_queue = max_queue
        self.engine_args = engine_args
        self.engine: GuardedAsyncLLM | None = None
        self.guardrail = VLLMControl(self, model_name=model_name, sinks=sinks)
        self._building: asyncio.Task[GuardedAsyncLLM] | None = None
        self._active = 0

    async def start(self) -> None:
        self.guardrail.loop = asyncio.get_running_loop()
        self._building = asyncio.create_task(
            GuardedAsyncLLM.from_core(self.model, self.core, **self.engine_args)
        )

    async def _engine(self) -> GuardedAsyncLLM:
        if self.engine is None:
            if self._building is None:
                raise NotReadyError("the vLLM engine was not started")
            self.engine = await self._building
        return self.engine

    async def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        elif self._building is not None:
            self._building.cancel()

    def queue_depth(self) -> int:
        return self._active

    def _conversation(self, request: EngineRequest) -> Conversation:
        conv = parse_conversation(request.messages, limits=self.guardrail.limits)
        self.adapter.check_modalities(conv)
        return conv

    def check(self, request: EngineRequest) -> None:
        conv = self._conversation(request)
        self.core.settings(None, sorted(conv.modalities), None)

    def _prompt(self, conv: Conversation) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt": self.adapter.render(conv)}
        if self.adapter.spec.video_as_frames:
            images = [*conv.images, *(f for v in conv.videos for f in v)]
            media: dict[str, Any] = {"image": images} if images else {}
        else:
            media = {}
            if conv.images:
                media["image"] = conv.images
            if conv.videos:
                media["video"] = conv.videos
        if media:
            prompt["multi_modal_data"] = {k: v[0] if len(v) == 1 else v for k, v in media.items()}
        return prompt

    @staticmethod
    def _params(settings: GenerationSettings) -> Any:
        from vllm import SamplingParams

        kwargs: dict[str, Any] = {"max_tokens": settings.max_new_tokens}
        if settings.sampling:
            kwargs["temperature"] = settings.temperature
            if settings.top_p is not None:
                kwargs["top_p"] = settings.top_p
        else:
            kwargs["temperature"] = 0.0
        return SamplingParams(**kwargs)

    def _admit(self) -> _Admission:
        if self._active >= self.max_queue:
            raise ServerBusyError(
                f"{self._active} requests in progress (the limit is {self.max_queue}); retry later"
            )
        self._active += 1
        return _Admission(self)

    async def _run(self, request: EngineRequest) -> AsyncIterator[str | GuardrailResult]:
        """Text deltas as vLLM produces them, then the result (spans, metrics, events)."""
        conv = self._conversation(request)
        engine = await self._engine()
        control = self.guardrail
        with control.telemetry.generation(
            [request.messages],
            max_tokens=request.settings.max_new_tokens,
            parameters=request.settings.generate_kwargs(),
            parents=[request.trace_context],
        ) as observed:
            start = time.perf_counter()
            sent = 0
            final: GuardedStreamOutput | None = None
            async for out in engine.generate(
                self._prompt(conv),
                self._params(request.settings),
                modalities=sorted(conv.modalities),
                key=request.key,
            ):
                text = out.text
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
                final = out
            if final is None or final.decision is None:
                raise GuardrailError("the engine finished the request without a decision")
            result = self._result(final, final.decision, time.perf_counter() - start)
            observed.record([result], tau=result.tau)
        events = build_events(
            [result], tau=result.tau, capture_content=False, span_ids=observed.span_ids()
        )
        control.events.dispatch(events)
        yield result

    def _result(self, out: GuardedStreamOutput, d: Decision, latency: float) -> GuardrailResult:
        completion = out.output.outputs[0]
        installed = {b.ref: b for b in self.core.installed.values()}
        bundle = installed.get(f"{d.policy_name}@{d.policy_version}")
        shadows = []
        for ref, values in d.shadows.items():
            name, _, version = ref.partition("@")
            shadow = installed.get(ref)
            shadows.append(
                ShadowScore(
                    policy_name=name,
                    policy_version=version,
                    layer=shadow.layer if shadow is not None else -1,
                    score=values.get("score"),
                    would_intervene=values.get("would_strength", 0.0) > 0,
                )
            )
        finish = completion.finish_reason or "stop"
        return GuardrailResult(
            text=str(completion.text),
            refused=d.refused,
            intervened=d.intervened,
            score=d.score,
            strength=d.strength,
            layer=d.layer,
            policy_name=d.policy_name,
            policy_version=d.policy_version,
            mode=d.mode,
            modalities=list(d.modalities),
            usage=Usage(
                input_tokens=len(out.output.prompt_token_ids or []),
                output_tokens=len(completion.token_ids),
            ),
            finish_reason="length" if finish == "length" else "stop",
            request_id=d.request_id,
            latency_s=latency,
            tau=bundle.parameters.gate(d.modalities) if bundle is not None else None,
            would_intervene=d.would_strength > 0,
            rollout_arm=d.arm,
            shadow=shadows,
            token_ids=list(completion.token_ids),
        )

    async def submit(self, request: EngineRequest) -> GuardrailResult:
        stream = _Stream(self._run(request), self._admit())
        result = None
        try:
            async for item in stream:
                if isinstance(item, GuardrailResult):
                    result = item
        finally:
            await stream.aclose()
        if result is None:
            raise GuardrailError("the engine finished the request without a result")
        return result

    def stream(self, request: EngineRequest) -> AsyncIterator[str | GuardrailResult]:
        # A full engine raises here, before any response starts.
        return _Stream(self._run(request), self._admit())

    async def self_test(self) -> GuardrailResult:
        """Wait for the engine (built, installed, its own self-test passed), then the
        server's self-test through this engine (:func:`~guardrail.serve.engine.serve_self_test`)."""
        await self._engine()
        return await serve_self_test(self)


class _Admission:
    """One admitted request; released once, however its stream ends (or never starts)."""

    def __init__(self, engine: VLLMEngine):
        self.engine: VLLMEngine | None = engine

    def release(self) -> None:
        if self.engine is not None:
            self.engine._active -= 1
            self.engine = None


class _Stream:
    """A request's chunks and result; closing it (also before it started) aborts the
    request in vLLM and releases its admission."""

    def __init__(self, gen: AsyncIterator[str | GuardrailResult], admission: _Admission):
        self.gen = gen
        self.admission = admission

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> str | GuardrailResult:
        try:
            return await self.gen.__anext__()
        except BaseException:
            self.admission.release()
            raise

    async def aclose(self) -> None:
        try:
            await self.gen.aclose()  # type: ignore[attr-defined]
        finally:
            self.admission.release()
