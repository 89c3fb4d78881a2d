"""The public :class:`Guardrail`: a local MLLM with MARS applied during generation.

Result types are in :mod:`guardrail.result`, the policy-to-tensor step in
:mod:`guardrail.policy.plans`, the rule and its hooks in :mod:`guardrail.steering`.

Concurrency model: a :class:`Guardrail` holds no per-request state. Each call
builds its own steering plans, registers its own hooks for the duration of its
``generate`` and marks them active in a :mod:`contextvars` variable, so a hook only
acts for the request (thread or asyncio task) that registered it. Many threads
and tasks may share one guardrail and one model.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import structlog
import torch

from guardrail.adapters import ModelAdapter
from guardrail.errors import GuardrailError, InputError, SteeringError
from guardrail.generation import (
    FirstTokenProbe,
    close_when_idle,
    eos_ids,
    expansion,
    generate_kwargs,
)
from guardrail.messages import (
    Conversation,
    InputLimits,
    as_single_conversation,
    conversation_text,
    is_single_conversation,
    parse_conversation,
)
from guardrail.observability.events import EventDispatcher, EventSink, build_events
from guardrail.observability.telemetry import Telemetry
from guardrail.observability.telemetry import model_name as _model_name
from guardrail.policy import PolicyBundle
from guardrail.policy.plans import build_plans, inapplicable, row_values
from guardrail.policy.registry import BundleSource
from guardrail.policy.rollout import Rollout, RolloutConfig, is_path_like
from guardrail.policy.signing import TrustStore
from guardrail.refusal import PhraseRefusalDetector, RefusalDetector, refusal_token_ids
from guardrail.result import GuardrailResult, ShadowScore, Usage
from guardrail.steering import LayerPlan, install_dispatch, run_until, steering_hooks
from guardrail.tools import ToolCallStreamFilter, normalize_tools, parse_tool_calls, tool_names

log = structlog.get_logger("guardrail")

Mode = Literal["enforce", "shadow", "off"]
ConversationLike = str | Mapping[str, Any] | Sequence[Mapping[str, Any]]
"""One conversation: a list of message dicts, a single message dict, or a bare string
(one user message)."""
MODES: tuple[str, ...] = ("enforce", "shadow", "off")
OnError = Literal["fail_closed", "fail_open", "raise"]
DEFAULT_REFUSAL = "I can't help with that request."


@dataclass(frozen=True)
class _Route:
    """Which bundle serves a row, under which rollout arm, with which shadows."""

    policy: PolicyBundle | None
    arm: str | None = None
    shadows: tuple[PolicyBundle, ...] = ()


class Guardrail:
    """A multimodal LLM guarded by a MARS policy bundle.

    Args:
        model: a loaded transformers model of a supported architecture.
        processor: its ``AutoProcessor`` (or tokenizer for text-only models).
        policy: a :class:`PolicyBundle`, a bundle directory, or ``None`` (no steering).
        mode: ``"enforce"`` (steer), ``"shadow"`` (score and report, never change the
            output) or ``"off"``.
        on_error: what a request gets when the policy cannot be applied to it:
            ``"fail_closed"`` (default: a refusal result carrying the reason),
            ``"fail_open"`` (the unguarded answer, logged) or ``"raise"``.
        refusal_detector: ``(prompt, response) -> bool``; the phrase detector by default.
        sinks: event sinks (:mod:`guardrail.observability.events`) receiving intervention and refusal
            events of every call; ``generate(..., sinks=[...])`` adds more per call.
        capture_content: put prompt and output text on events (off by default).
        tracer_provider: OpenTelemetry provider for spans
            (:mod:`guardrail.observability.telemetry`); the API's global one by default.
        meter_provider: OpenTelemetry provider for metrics; the API's global one by default.
        model_name: the model's name on spans; its checkpoint name by default.
        trust_store: a :class:`~guardrail.policy.signing.TrustStore`; when set, only bundles
            signed by one of its keys are loaded.
        rollout: a :class:`~guardrail.policy.rollout.Rollout` (or its config, or a config file)
            choosing the bundle per request: stable, canary, shadows, kill switch.
        registry: resolves the references of a rollout config.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        policy: PolicyBundle | str | os.PathLike[str] | None = None,
        *,
        mode: Mode = "enforce",
        on_error: OnError = "fail_closed",
        refusal_detector: RefusalDetector | None = None,
        limits: InputLimits | None = None,
        max_new_tokens: int = 256,
        refusal_message: str = DEFAULT_REFUSAL,
        sinks: Sequence[EventSink] = (),
        capture_content: bool = False,
        tracer_provider: Any | None = None,
        meter_provider: Any | None = None,
        model_name: str | None = None,
        trust_store: TrustStore | None = None,
        rollout: Rollout | RolloutConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        registry: BundleSource | None = None,
    ):
        self.adapter = ModelAdapter(model, processor)
        self.model = model
        self.processor = processor
        self.mode: Mode = _check_mode(mode)
        if on_error not in ("fail_closed", "fail_open", "raise"):
            raise GuardrailError(
                f"on_error {on_error!r} must be 'fail_closed', 'fail_open' or 'raise'"
            )
        self.on_error: OnError = on_error
        self.refusal_detector: RefusalDetector = refusal_detector or PhraseRefusalDetector()
        self.limits = limits or InputLimits()
        self.max_new_tokens = max_new_tokens
        self.refusal_message = refusal_message
        self._device_cache: dict[tuple[int, str], Any] = {}
        self._refusal_ids: list[int] | None = None
        self._lock = threading.Lock()
        self.events = EventDispatcher(sinks, capture_content=capture_content)
        self.telemetry = Telemetry(
            model_name or _model_name(model),
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        self.trust_store = trust_store
        self.registry = registry
        # Bundles that passed the verification gate (_admit), keyed by identity.
        self._admitted: dict[tuple[int, int, int], PolicyBundle] = {}
        # One permanent dispatcher hook per decoder layer, installed before any request
        # runs; each request's hooks then live in its own context (guardrail.steering).
        install_dispatch(self.adapter.layers)
        self.policy: PolicyBundle | None = self.load_policy(policy) if policy is not None else None
        self._rollout: Rollout | None = None
        if rollout is not None:
            self.set_rollout(rollout)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike[str],
        policy: PolicyBundle | str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device_map: str | dict[str, Any] | None = None,
        quantization_config: Any = None,
        model_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Guardrail:
        """Load a model and its processor with transformers and wrap them.

        ``model_id_or_path`` is whatever transformers accepts (a local checkpoint
        directory or a hub id) or a built-in: ``"organism"``, ``"smollm2"``,
        ``"tiny-<arch>"``. ``dtype`` (or its older name ``torch_dtype``),
        ``device_map`` and ``quantization_config`` go to ``from_pretrained``, as do
        ``model_kwargs`` (``revision``, ``trust_remote_code``, ...); ``device`` moves a
        model loaded without a ``device_map``. The other keyword arguments are the
        :class:`Guardrail`'s (``mode``, ``trust_store``, ``rollout``, ...).
        """
        from guardrail.models.loading import load_model

        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise GuardrailError("pass dtype or torch_dtype, not both")
        model, processor = load_model(
            str(model_id_or_path),
            device=device,
            dtype=dtype if dtype is not None else torch_dtype,
            device_map=device_map,
            quantization_config=quantization_config,
            **dict(model_kwargs or {}),
        )
        return cls(model, processor, policy, **kwargs)

    def load_policy(self, policy: PolicyBundle | str | os.PathLike[str]) -> PolicyBundle:
        """Load and check a policy: integrity, signature (under a trust store), model fit.

        ``policy`` is a bundle, a bundle directory, or, with a ``registry``, a registry
        reference such as ``"organism@^1.0"`` (a string that is not a path: no ``/``,
        not starting with ``.`` or ``~``).
        """
        from guardrail.policy.signing import load_verified

        if isinstance(policy, PolicyBundle):
            return self._admit(policy)
        if isinstance(policy, str) and not is_path_like(policy):
            if self.registry is not None:
                bundle = self.registry.load(
                    policy, adapter=self.adapter, trust_store=self.trust_store
                )
                return self._admit(bundle)
            if "@" in policy:
                raise GuardrailError(
                    f"policy {policy!r} is a registry reference but the guardrail has no "
                    "registry; pass registry=PolicyRegistry(DIR) (or RemoteRegistry(URL, ...)), "
                    "or give a bundle directory such as './policies/name/1.0.0'"
                )
        return self._admit(load_verified(policy, self.trust_store, self.adapter))

    def _admit(self, bundle: PolicyBundle) -> PolicyBundle:
        """The one verification gate every bundle passes before it can steer or score.

        Constructor, per-call ``policy=``, :meth:`load_policy`, :meth:`set_rollout`,
        rollouts built elsewhere and registry resolution all come through here:
        integrity (manifest digest and tensor hashes of a sealed bundle), the
        signature when a trust store is set, and the fit to this model. A bundle is
        checked once per identity; later calls cost a dictionary lookup.
        """
        from guardrail.policy.signing import verify_bundle

        if not isinstance(bundle, PolicyBundle):
            raise InputError(
                f"policy must be a PolicyBundle (or a bundle path for load_policy), got "
                f"{type(bundle).__name__}; load one with PolicyBundle.from_pretrained(DIR)"
            )
        key = (id(bundle), id(bundle.manifest), id(bundle.tensors))
        if self._admitted.get(key) is bundle:
            return bundle
        bundle.verify_integrity()
        if self.trust_store is not None:
            verify_bundle(bundle, self.trust_store)
        bundle.check_compatible(self.adapter)
        with self._lock:
            if len(self._admitted) > 256:
                self._admitted.clear()
            self._admitted[key] = bundle
        return bundle

    @property
    def rollout(self) -> Rollout | None:
        return self._rollout

    def set_rollout(
        self, rollout: Rollout | RolloutConfig | Mapping[str, Any] | str | os.PathLike[str] | None
    ) -> Rollout | None:
        """Switch the rollout (or drop it with ``None``) without touching the model.

        Every bundle of the new rollout is loaded and verified first (signature under
        the trust store, fit to this model); then one reference is swapped, so
        requests in flight finish under the rollout they started with and new ones
        see the new one. A swap costs the bundle loads (milliseconds), never a model
        reload. For switching arms of the same rollout (promote, rollback, kill
        switch, share) use the :class:`~guardrail.policy.rollout.Rollout` methods.
        """
        if rollout is None:
            self._rollout = None
            return None
        if isinstance(rollout, Rollout):
            # Built elsewhere, perhaps without this guardrail's trust store or model:
            # every bundle it can serve passes this guardrail's gate before the swap.
            for bundle in (rollout.stable, rollout.canary, *rollout.shadows):
                if bundle is not None:
                    self._admit(bundle)
            self._rollout = rollout
            return rollout
        if isinstance(rollout, (str, os.PathLike)):
            built = Rollout.from_file(
                rollout, self.registry, trust_store=self.trust_store, adapter=self.adapter
            )
        else:
            built = Rollout(
                rollout, self.registry, trust_store=self.trust_store, adapter=self.adapter
            )
        for bundle in (built.stable, built.canary, *built.shadows):
            if bundle is not None:
                self._admit(bundle)
        self._rollout = built
        return built

    # ------------------------------------------------------------------ generation

    @overload
    def generate(
        self,
        messages: ConversationLike,
        *,
        mode: Mode | None = None,
        policy: PolicyBundle | None = None,
        key: str | Sequence[str | None] | None = None,
        sinks: Sequence[EventSink] | None = None,
        trace_context: Any | Sequence[Any] | None = None,
        tools: Sequence[Any] | None = None,
        **generate_kwargs: Any,
    ) -> GuardrailResult: ...

    @overload
    def generate(
        self,
        messages: Sequence[ConversationLike],
        *,
        mode: Mode | None = None,
        policy: PolicyBundle | None = None,
        key: str | Sequence[str | None] | None = None,
        sinks: Sequence[EventSink] | None = None,
        trace_context: Any | Sequence[Any] | None = None,
        tools: Sequence[Any] | None = None,
        **generate_kwargs: Any,
    ) -> list[GuardrailResult]: ...

    def generate(
        self,
        messages: ConversationLike | Sequence[ConversationLike],
        *,
        mode: Mode | None = None,
        policy: PolicyBundle | None = None,
        key: str | Sequence[str | None] | None = None,
        sinks: Sequence[EventSink] | None = None,
        trace_context: Any | Sequence[Any] | None = None,
        tools: Sequence[Any] | None = None,
        **generate_kwargs: Any,
    ) -> GuardrailResult | list[GuardrailResult]:
        """Generate the next assistant turn for one conversation or a batch.

        ``messages`` is one conversation (a list of message dicts, or a string) or a
        list of conversations; the result is one :class:`GuardrailResult` or a list.
        Generation kwargs are passed to ``model.generate`` (greedy by default).
        ``policy`` overrides the configured policy and rollout for this call;
        ``key`` (a user or session id, or one per conversation) picks the rollout arm.
        ``sinks`` receive this call's events in addition to the guardrail's own.
        ``trace_context`` (an OpenTelemetry ``Context``, or one per conversation) is the
        parent of the ``chat`` spans instead of the current span: a server that batches
        requests of different callers keeps each row in its caller's trace.
        ``tools`` (:mod:`guardrail.tools`) are offered to every conversation through
        the model's chat template; the calls the model emits are in
        ``result.tool_calls`` (withheld when the guardrail intervened in enforce mode).
        """
        single = is_single_conversation(messages)
        batch = [as_single_conversation(messages)] if single else list(messages)
        if not batch:
            raise InputError("no conversations given; pass one conversation or a non-empty list")
        if trace_context is None or single or not isinstance(trace_context, Sequence):
            parents = None if trace_context is None else [trace_context] * len(batch)
        else:
            parents = list(trace_context)
            if len(parents) != len(batch):
                raise InputError(
                    f"{len(parents)} trace contexts for {len(batch)} conversations; give one "
                    "per conversation"
                )
        results = self._run(
            batch,
            mode=mode,
            policy=policy,
            key=key,
            sinks=sinks,
            parents=parents,
            tools=normalize_tools(tools),
            **generate_kwargs,
        )
        return results[0] if single else results

    @overload
    async def agenerate(self, messages: ConversationLike, **kwargs: Any) -> GuardrailResult: ...

    @overload
    async def agenerate(
        self, messages: Sequence[ConversationLike], **kwargs: Any
    ) -> list[GuardrailResult]: ...

    async def agenerate(
        self, messages: ConversationLike | Sequence[ConversationLike], **kwargs: Any
    ) -> GuardrailResult | list[GuardrailResult]:
        """Async twin of :meth:`generate` (runs in a worker thread)."""
        run: Callable[..., GuardrailResult | list[GuardrailResult]] = self.generate
        return await asyncio.to_thread(run, messages, **kwargs)

    def stream(
        self,
        messages: ConversationLike,
        *,
        mode: Mode | None = None,
        policy: PolicyBundle | None = None,
        key: str | None = None,
        sinks: Sequence[EventSink] | None = None,
        tools: Sequence[Any] | None = None,
        **generate_kwargs: Any,
    ) -> Generator[str | GuardrailResult, None, None]:
        """Yield text chunks as they are generated, then the :class:`GuardrailResult`.

        With ``tools``, the chunks are the text outside tool-call blocks; the calls
        are in the result only, after the guardrail's decision on them.
        Abandoning the iterator (``close()``, ``break``, garbage collection) stops
        generation and removes the hooks.
        """
        return self._stream(
            messages,
            cancel=threading.Event(),
            mode=mode,
            policy=policy,
            key=key,
            sinks=sinks,
            tools=tools,
            **generate_kwargs,
        )

    def _stream(
        self,
        messages: Any,
        *,
        cancel: threading.Event,
        mode: Mode | None = None,
        policy: PolicyBundle | None = None,
        key: str | None = None,
        sinks: Sequence[EventSink] | None = None,
        tools: Sequence[Any] | None = None,
        **generate_kwargs: Any,
    ) -> Generator[str | GuardrailResult, None, None]:
        """:meth:`stream` with a cancel event the caller can set from any thread."""
        from transformers import TextIteratorStreamer

        if not is_single_conversation(messages):
            raise InputError("stream() takes one conversation; call it once per conversation")
        messages = as_single_conversation(messages)
        tokenizer = self.adapter.tokenizer
        streamer = TextIteratorStreamer(
            tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=None
        )
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["result"] = self._run(
                    [messages],
                    mode=mode,
                    policy=policy,
                    key=key,
                    streamer=streamer,
                    cancel=cancel,
                    sinks=sinks,
                    tools=offered,
                    **generate_kwargs,
                )[0]
            except BaseException as exc:  # handed to the consumer below
                box["error"] = exc
                streamer.end()

        # Validate input in the caller's thread so errors surface on first next().
        offered = normalize_tools(tools)
        parse_conversation(messages, limits=self.limits)
        calls = ToolCallStreamFilter(tool_names(offered)) if offered else None
        emitted: list[str] = []
        # The worker runs in a copy of the caller's context: spans get the caller's
        # span as parent and events reach sinks in the caller's context.
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run, args=(work,), name="guardrail-stream", daemon=True
        )
        thread.start()
        try:
            for chunk in streamer:
                chunk = calls.feed(chunk) if calls is not None and chunk else chunk
                if chunk:
                    emitted.append(chunk)
                    yield chunk
            thread.join()
            if "error" in box:
                raise box["error"]
            result: GuardrailResult = box["result"]
            rest = calls.finish() if calls is not None else ""
            if result.tool_calls_withheld and not "".join(emitted).strip():
                rest = result.text  # nothing but withheld calls was written: the refusal
            if rest:
                yield rest
            yield result
        finally:
            cancel.set()
            thread.join()

    async def astream(
        self, messages: ConversationLike, **kwargs: Any
    ) -> AsyncIterator[str | GuardrailResult]:
        """Async twin of :meth:`stream`.

        Cancelling the consuming task (or closing the iterator) stops generation: the
        cancel event is set at once, and the iterator is closed as soon as the chunk
        being fetched in a worker thread has arrived.
        """
        cancel = threading.Event()
        iterator = self._stream(messages, cancel=cancel, **kwargs)
        sentinel = object()
        try:
            while True:
                item = await asyncio.to_thread(next, iterator, sentinel)
                if item is sentinel:
                    return
                yield item  # type: ignore[misc]
        finally:
            cancel.set()
            await asyncio.to_thread(close_when_idle, iterator)

    # ------------------------------------------------------------------ scoring

    @overload
    def score(  # type: ignore[overload-overlap]  # a str is also a Sequence[str]
        self, messages: ConversationLike, *, policy: PolicyBundle | None = None
    ) -> float: ...

    @overload
    def score(
        self, messages: Sequence[ConversationLike], *, policy: PolicyBundle | None = None
    ) -> list[float]: ...

    def score(
        self,
        messages: ConversationLike | Sequence[ConversationLike],
        *,
        policy: PolicyBundle | None = None,
    ) -> float | list[float]:
        """The MARS score ``s`` of one conversation or a batch, without generating.

        Runs the prefill up to the policy's layer only.
        """
        single = is_single_conversation(messages)
        batch = [as_single_conversation(messages)] if single else list(messages)
        policy = policy or self.policy
        if policy is None:
            raise GuardrailError("score() needs a policy; pass policy= or configure one")
        policy = self._admit(policy)
        if not batch:
            raise InputError("no conversations given; pass one conversation or a non-empty list")
        convs = [parse_conversation(m, limits=self.limits) for m in batch]
        inputs = self.adapter.build_inputs(convs)
        plans = self._plans([policy] * len(convs), convs, inputs["attention_mask"], apply=False)
        run_until(self.model, self.adapter.layers, max(p.layer for p in plans), inputs, plans)
        values = row_values(plans, len(convs), "score")
        scores = [v for v in values if v is not None]
        if len(scores) != len(values) or not all(p.fired for p in plans):
            raise SteeringError("the scoring hook did not run for every conversation")
        return scores[0] if single else scores

    # ------------------------------------------------------------------ internals

    def _run(
        self,
        batch: Sequence[Any],
        *,
        mode: Mode | None,
        policy: PolicyBundle | None,
        key: str | Sequence[str | None] | None = None,
        cancel: threading.Event | None = None,
        sinks: Sequence[EventSink] | None = None,
        parents: Sequence[Any] | None = None,
        tools: Sequence[dict[str, Any]] = (),
        **generate_kwargs: Any,
    ) -> list[GuardrailResult]:
        """:meth:`_generate` observed: one span per row, metrics, then events to the sinks.

        Events are dispatched after the spans end, in the caller's context.
        """
        routes = self._routes(len(batch), policy, key)
        max_tokens = generate_kwargs.get("max_new_tokens", self.max_new_tokens)
        params = generate_kwargs
        with self.telemetry.generation(
            batch, max_tokens=max_tokens, parameters=params, parents=parents
        ) as observed:
            results = self._generate(
                batch, routes=routes, mode=mode, cancel=cancel, tools=tools, **generate_kwargs
            )
            observed.record(results, tau=None)
        events = build_events(
            results,
            tau=None,
            prompts=[conversation_text(m) for m in batch] if self.events.capture_content else None,
            capture_content=self.events.capture_content,
            span_ids=observed.span_ids(),
        )
        self.events.dispatch(events, extra=sinks or ())
        return results

    def _routes(
        self, n: int, policy: PolicyBundle | None, key: str | Sequence[str | None] | None
    ) -> list[_Route]:
        """Resolve, once per request, which bundle serves each row."""
        if policy is not None:
            return [_Route(self._admit(policy))] * n
        rollout = self._rollout  # one snapshot for the whole call
        if rollout is None:
            return [_Route(self.policy)] * n
        if key is None or isinstance(key, str):
            keys: list[str | None] = [key] * n
        else:
            keys = list(key)
            if len(keys) != n:
                raise InputError(
                    f"{len(keys)} routing keys for {n} conversations; give one per conversation"
                )
        routes = []
        for k in keys:
            a = rollout.resolve(k)
            # The rollout may have been updated since set_rollout (update(), promote());
            # whatever it serves passes the gate (a cached lookup once admitted).
            chosen = self._admit(a.policy) if a.policy is not None else None
            routes.append(_Route(chosen, a.arm, tuple(self._admit(b) for b in a.shadows)))
        return routes

    def _generate(
        self,
        batch: Sequence[Any],
        *,
        routes: Sequence[_Route],
        mode: Mode | None,
        cancel: threading.Event | None = None,
        tools: Sequence[dict[str, Any]] = (),
        **generate_kwargs: Any,
    ) -> list[GuardrailResult]:
        started = time.perf_counter()
        mode = _check_mode(mode or self.mode)
        convs = [parse_conversation(m, limits=self.limits) for m in batch]
        inputs = self.adapter.build_inputs(convs, tools)
        if mode == "enforce" and any(r.policy is None and r.arm != "killed" for r in routes):
            # Never answer unguarded by omission (the kill switch's arm is on purpose).
            raise GuardrailError(
                "mode='enforce' but no policy serves this request, so it would be answered "
                "unguarded; attach one (Guardrail(..., policy=DIR, or policy='name@range' with "
                "registry=), generate(..., policy=bundle), or a rollout), or ask for unguarded "
                "output explicitly with mode='off'"
            )
        mask = inputs["attention_mask"]
        kwargs = self._generate_kwargs(generate_kwargs, cancel)
        expand, per_conv = self._expansion(kwargs)
        n = len(convs)
        # Rows whose policy cannot be applied are handled by the on_error policy.
        policies = [r.policy if mode != "off" else None for r in routes]
        errors: list[str | None] = [None] * n
        for row, (p, conv) in enumerate(zip(policies, convs, strict=True)):
            reason = inapplicable(p, conv)
            if reason is not None:
                errors[row] = reason
                policies[row] = None
                if self._policy_failure(SteeringError(reason), mode):
                    errors[row] = _BLOCKED + reason
        blocked = [row for row, e in enumerate(errors) if e is not None and e.startswith(_BLOCKED)]
        streamer = kwargs.get("streamer")
        if blocked and streamer is not None:
            # A blocked row's unguarded tokens must never reach a stream.
            if len(blocked) == n:
                streamer.end()
                return [
                    self._blocked(c, r.policy, mode, str(e).removeprefix(_BLOCKED), started, r.arm)
                    for c, r, e in zip(convs, routes, errors, strict=True)
                ]
            withhold = getattr(streamer, "withhold", None)
            if not callable(withhold):
                raise SteeringError(
                    "some rows of this streamed batch are blocked and the streamer cannot "
                    "withhold them (it has no withhold(rows) method)"
                )
            withhold(blocked)
        apply = mode == "enforce"
        plans = self._plans(policies, convs, mask, apply=apply)
        shadow_plans, shadow_of = self._shadow_plans(routes, convs, mask, mode)
        late = [p for p in shadow_plans if any(a.layer < p.layer for a in plans if a.apply)]
        if late:  # score these shadows on an unsteered prefill of their own
            run_until(self.model, self.adapter.layers, max(p.layer for p in late), inputs, late)
        late_ids = {id(p) for p in late}
        # Shadows see unsteered states: their hooks run before the steering plans.
        hooks = [p for p in shadow_plans if id(p) not in late_ids] + plans
        for plan in hooks:
            plan.expand = expand
        probe = self._first_token_probe(kwargs, expand)
        try:
            with torch.no_grad(), steering_hooks(self.adapter.layers, hooks):
                output = self.model.generate(**inputs, **kwargs)
            if hooks and not all(p.fired for p in hooks):
                raise SteeringError("the steering hook did not fire during the prefill pass")
            returned = (output if isinstance(output, torch.Tensor) else output.sequences).shape[0]
            if returned != n * per_conv:
                raise SteeringError(
                    f"generate returned {returned} sequences for {n} conversations x "
                    f"{per_conv} return sequences; results cannot be matched to conversations"
                )
        except SteeringError as exc:
            if self._policy_failure(exc, mode):
                return [
                    self._blocked(c, r.policy, mode, str(exc), started, r.arm)
                    for c, r in zip(convs, routes, strict=True)
                ]
            errors = [str(exc)] * n
            plans, hooks = [], []
            policies = [None] * n
            with torch.no_grad():
                output = self.model.generate(**inputs, **kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        results = self._results(
            convs,
            inputs,
            sequences,
            plans,
            policies,
            routes,
            mode,
            errors,
            started,
            per_conv,
            probe,
        )
        if tools:
            names = tool_names(tools)
            results = [self._tool_answer(r, c, names) for r, c in zip(results, convs, strict=True)]
        for bundle, built in shadow_of:
            rows = {int(r) for plan in built for r in plan.rows.tolist()}
            scores = row_values(built, n, "score")
            would = row_values(built, n, "would_strength")
            for row in sorted(rows):
                results[row].shadow.append(
                    ShadowScore(
                        policy_name=bundle.name,
                        policy_version=bundle.version,
                        layer=bundle.layer,
                        score=scores[row],
                        would_intervene=(would[row] or 0.0) > 0,
                    )
                )
        for row, reason in enumerate(errors):
            if reason is not None and reason.startswith(_BLOCKED):
                route = routes[row]
                results[row] = self._blocked(
                    convs[row],
                    route.policy,
                    mode,
                    reason.removeprefix(_BLOCKED),
                    started,
                    route.arm,
                )
        return results

    def _shadow_plans(
        self, routes: Sequence[_Route], convs: Sequence[Conversation], mask: torch.Tensor, mode: str
    ) -> tuple[list[LayerPlan], list[tuple[PolicyBundle, list[LayerPlan]]]]:
        """Score-only plans for the rollout's shadow bundles, grouped per bundle."""
        if mode == "off":
            return [], []
        bundles: dict[int, PolicyBundle] = {}
        for route in routes:
            for b in route.shadows:
                bundles.setdefault(id(b), b)
        plans: list[LayerPlan] = []
        per_bundle: list[tuple[PolicyBundle, list[LayerPlan]]] = []
        for bundle in bundles.values():
            rows: list[PolicyBundle | None] = [
                bundle
                if any(x is bundle for x in r.shadows) and inapplicable(bundle, c) is None
                else None
                for r, c in zip(routes, convs, strict=True)
            ]
            built = self._plans(rows, convs, mask, apply=False)
            plans += built
            per_bundle.append((bundle, built))
        return plans, per_bundle

    def _policy_failure(self, exc: GuardrailError, mode: str) -> bool:
        """Decide what a request gets when its policy cannot be applied.

        Returns True to block (fail closed), False to continue unguarded; raises
        under ``on_error="raise"``. Shadow mode never blocks: it must not change output.
        """
        if mode == "enforce" and self.on_error == "raise":
            raise exc
        if mode == "enforce" and self.on_error == "fail_closed":
            log.warning("guardrail.fail_closed", reason=str(exc))
            return True
        log.warning("guardrail.unguarded", mode=mode, on_error=self.on_error, reason=str(exc))
        return False

    def _generate_kwargs(
        self, kwargs: dict[str, Any], cancel: threading.Event | None
    ) -> dict[str, Any]:
        return generate_kwargs(
            kwargs,
            max_new_tokens=self.max_new_tokens,
            tokenizer=self.adapter.tokenizer,
            cancel=cancel,
        )

    def _expansion(self, kwargs: Mapping[str, Any]) -> tuple[int, int]:
        return expansion(self.model, kwargs)

    def _first_token_probe(self, kwargs: dict[str, Any], expand: int) -> FirstTokenProbe | None:
        """A probe for ``result.refusal_logodds`` attached to this call's ``kwargs``;
        ``None`` when the tokenizer spells no refusal start (then the field stays unset)."""
        if self._refusal_ids is None:
            try:
                self._refusal_ids = refusal_token_ids(self.adapter.tokenizer)
            except (ValueError, AttributeError, TypeError):
                self._refusal_ids = []
        if not self._refusal_ids:
            return None
        probe = FirstTokenProbe(self._refusal_ids, expand)
        probe.attach(kwargs)
        return probe

    def _plans(
        self,
        policies: Sequence[PolicyBundle | None],
        convs: Sequence[Conversation],
        attention_mask: torch.Tensor,
        *,
        apply: bool,
    ) -> list[LayerPlan]:
        return build_plans(policies, convs, attention_mask, apply=apply, cache=self._device_cache)

    def _results(
        self,
        convs: Sequence[Conversation],
        inputs: dict[str, Any],
        sequences: torch.Tensor,
        plans: Sequence[LayerPlan],
        policies: Sequence[PolicyBundle | None],
        routes: Sequence[_Route],
        mode: str,
        errors: Sequence[str | None],
        started: float,
        per_conv: int = 1,
        probe: FirstTokenProbe | None = None,
    ) -> list[GuardrailResult]:
        """One result per conversation. ``generate`` returns ``per_conv`` sequences per
        conversation, consecutively (``num_return_sequences``); the first is the result's
        ``text``, and all of them are in ``texts`` when there are several.
        ``refusal_logodds`` comes from ``probe`` (the same generation pass)."""
        prompt_len = int(inputs["input_ids"].shape[1])
        new = sequences[:, prompt_len:].cpu()
        scores = row_values(plans, len(convs), "score")
        strengths = row_values(plans, len(convs), "strength")
        would = row_values(plans, len(convs), "would_strength")
        input_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        tokenizer = self.adapter.tokenizer
        eos = eos_ids(self.model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        latency = time.perf_counter() - started
        results = []

        def decoded(index: int) -> tuple[list[int], str, str]:
            ids = new[index].tolist()
            cut = next((k for k, tok in enumerate(ids) if tok in eos), None)
            finish = "stop" if cut is not None else "length"
            ids = ids[:cut] if cut is not None else [t for t in ids if t != pad or pad in eos]
            return ids, tokenizer.decode(ids, skip_special_tokens=True), finish

        for row, conv in enumerate(convs):
            outputs = [decoded(row * per_conv + j) for j in range(per_conv)]
            ids, text, finish = outputs[0]
            strength = strengths[row] or 0.0
            policy = policies[row]
            route = routes[row]
            named = policy or (route.policy if mode != "off" else None)
            row_mode = "off" if route.arm == "killed" else mode
            results.append(
                GuardrailResult(
                    text=text,
                    refused=self.refusal_detector(conv.text(), text),
                    intervened=mode == "enforce" and strength > 0,
                    score=scores[row],
                    strength=strength if mode == "enforce" else 0.0,
                    layer=policy.layer if policy is not None else None,
                    policy_name=named.name if named is not None else None,
                    policy_version=named.version if named is not None else None,
                    mode=row_mode,
                    modalities=sorted(conv.modalities),
                    usage=Usage(input_tokens=int(input_tokens[row]), output_tokens=len(ids)),
                    finish_reason=finish,
                    latency_s=latency,
                    error=errors[row],
                    tau=policy.parameters.gate(conv.modalities) if policy is not None else None,
                    would_intervene=(would[row] or 0.0) > 0,
                    rollout_arm=route.arm,
                    token_ids=ids,
                    texts=[t for _, t, _ in outputs] if per_conv > 1 else [],
                    refusal_logodds=probe.value(row) if probe is not None else None,
                )
            )
        return results

    def _tool_answer(
        self, result: GuardrailResult, conv: Conversation, names: frozenset[str]
    ) -> GuardrailResult:
        """``result`` with the tool calls of its text parsed out (:mod:`guardrail.tools`).

        Fail closed: in enforce mode, calls are withheld when the guardrail intervened
        (the policy flagged the request) or the answer is a refusal; the answer is then
        the text outside the calls, or the refusal message when there is none.
        """
        parsed = parse_tool_calls(result.text, names)
        if not parsed.calls:
            return result
        refused = self.refusal_detector(conv.text(), parsed.text)
        if result.mode == "enforce" and (result.intervened or refused):
            log.warning("guardrail.tool_calls_withheld", calls=len(parsed.calls))
            return result.model_copy(
                update={
                    "text": parsed.text or self.refusal_message,
                    "refused": refused or not parsed.text,
                    "tool_calls_withheld": len(parsed.calls),
                }
            )
        return result.model_copy(
            update={"text": parsed.text, "refused": refused, "tool_calls": parsed.calls}
        )

    def _blocked(
        self,
        conv: Conversation,
        policy: PolicyBundle | None,
        mode: str,
        reason: str,
        started: float,
        arm: str | None = None,
    ) -> GuardrailResult:
        return GuardrailResult(
            text=self.refusal_message,
            refused=True,
            intervened=True,
            layer=policy.layer if policy is not None else None,
            policy_name=policy.name if policy is not None else None,
            policy_version=policy.version if policy is not None else None,
            mode=mode,
            modalities=sorted(conv.modalities),
            usage=Usage(input_tokens=0, output_tokens=0),
            finish_reason="guardrail_error",
            latency_s=time.perf_counter() - started,
            error=reason,
            rollout_arm=arm,
        )


_BLOCKED = "blocked: "


def _check_mode(mode: str) -> Mode:
    if mode not in MODES:
        raise GuardrailError(f"mode {mode!r} is not one of {MODES}")
    return mode  # type: ignore[return-value]
