"""``ChatMarsGuardrail``: a LangChain chat model backed by a :class:`guardrail.Guardrail`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.base import LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from pydantic import ConfigDict, Field

from guardrail import Guardrail, GuardrailResult
from guardrail.observability.events import CallbackSink, GuardrailEvent
from langchain_mars_guardrail.content import to_conversation
from langchain_mars_guardrail.events import (
    Route,
    adispatch_events,
    aiterate_routed,
    arun_routed,
    dispatch_events,
    iterate_routed,
    run_routed,
)

__all__ = ["ChatMarsGuardrail", "guardrail_metadata"]

PROVIDER = "mars_guardrail"


def guardrail_metadata(result: GuardrailResult) -> dict[str, Any]:
    """The guardrail decision of one result, as put in ``response_metadata["guardrail"]``."""
    return result.decision()


class ChatMarsGuardrail(BaseChatModel):
    """A local multimodal LLM guarded by MARS, as a LangChain chat model.

    Example:
        ```python
        from guardrail import Guardrail
        from langchain_mars_guardrail import ChatMarsGuardrail

        chat = ChatMarsGuardrail(guardrail=Guardrail.from_pretrained("smollm2", "policies/smollm2"))
        chat.invoke([HumanMessage(content=[
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image", "base64": b64_png, "mime_type": "image/png"},
        ])])
        ```

    Each response carries ``usage_metadata`` and, in ``response_metadata``, the model
    name, the finish reason and the guardrail decision (``"guardrail"``: score,
    strength, intervened, refused, policy name/version, mode, ...). Intervention and
    refusal events are dispatched as LangChain custom events named
    ``guardrail.intervention`` / ``guardrail.refusal`` on the chat model's run (see
    ``astream_events(version="v2")``), with the event's fields as data.

    The guardrail's models have no tool calling or structured output.
    """

    model_config = ConfigDict(
        arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=()
    )

    guardrail: Guardrail = Field(exclude=True)
    """The guardrail that generates (model, processor and policy)."""
    model_name: str | None = Field(default=None, alias="model")
    """Name reported in metadata and traces; the guardrail's model name by default."""
    temperature: float | None = None
    """Sampling temperature; ``None`` or ``0`` decode greedily."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Most new tokens per answer; the guardrail's ``max_new_tokens`` by default."""
    stop: list[str] | None = None
    """Stop sequences: generation ends at, and the text is cut before, the first one."""
    streaming: bool = False
    """Whether ``invoke`` streams internally (callbacks then see each token)."""
    mode: Literal["enforce", "shadow", "off"] | None = None
    """Guardrail mode for this chat model's calls; the guardrail's own by default."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further ``generate`` keyword arguments (e.g. ``top_p``, ``repetition_penalty``)."""
    dispatch_events: bool = True
    """Dispatch guardrail events as LangChain custom events."""

    @property
    def _llm_type(self) -> str:
        return "mars-guardrail"

    @property
    def resolved_model_name(self) -> str:
        return self.model_name or self.guardrail.telemetry.model

    @property
    def _identifying_params(self) -> dict[str, Any]:
        policy = self.guardrail.policy
        return {
            "model_name": self.resolved_model_name,
            "policy": f"{policy.name}@{policy.version}" if policy is not None else None,
            "mode": self.mode or self.guardrail.mode,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=kwargs.get("model", self.resolved_model_name),
            ls_model_type="chat",
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stop = stop or self.stop
        if stop:
            params["ls_stop"] = stop
        return params

    # ------------------------------------------------------------------ runnable entry points
    # They only fix the run id up front so that events raised in ``_stream`` (which
    # LangChain calls without a run manager) reach this call's run; see ``events``.

    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        route = Route.start(self, config)
        return run_routed(route, super().invoke, input, route.config, stop=stop, **kwargs)

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        route = Route.start(self, config)
        return await arun_routed(route, super().ainvoke, input, route.config, stop=stop, **kwargs)

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        route = Route.start(self, config)
        return iterate_routed(route, super().stream(input, route.config, stop=stop, **kwargs))

    def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        route = Route.start(self, config)
        return aiterate_routed(route, super().astream(input, route.config, stop=stop, **kwargs))

    # ------------------------------------------------------------------ requests

    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[str, Any], list[str], list[GuardrailEvent]]:
        """Conversation, guardrail kwargs, stop sequences and the list events land in."""
        conversation = to_conversation(messages)
        options = {**self.model_kwargs, **kwargs}
        options.pop("model", None)
        temperature = options.pop("temperature", self.temperature)
        max_tokens = options.pop("max_tokens", self.max_tokens)
        stops = [s for s in (stop if stop is not None else self.stop or []) if s]
        if temperature:
            options.setdefault("do_sample", True)
            options["temperature"] = float(temperature)
        if max_tokens is not None:
            options["max_new_tokens"] = int(max_tokens)
        if stops:
            options["stop_strings"] = stops
            options["tokenizer"] = self.guardrail.adapter.tokenizer
        if self.mode is not None:
            options.setdefault("mode", self.mode)
        events: list[GuardrailEvent] = []
        options["sinks"] = [*options.pop("sinks", []), CallbackSink(events.append)]
        return conversation, options, stops, events

    def _message(self, result: GuardrailResult, text: str, stops: Sequence[str]) -> AIMessage:
        return AIMessage(
            content=text,
            usage_metadata=_usage(result),
            response_metadata=self._response_metadata(result, text != result.text and bool(stops)),
        )

    def _response_metadata(self, result: GuardrailResult, stopped: bool) -> dict[str, Any]:
        return {
            "model_name": self.resolved_model_name,
            "model_provider": PROVIDER,
            "finish_reason": "stop" if stopped else result.finish_reason,
            "guardrail": guardrail_metadata(result),
        }

    # ------------------------------------------------------------------ sync

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        conversation, options, stops, events = self._request(messages, stop, kwargs)
        result = self.guardrail.generate(conversation, **options)
        if self.dispatch_events:
            dispatch_events(self, events, run_manager)
        text = _cut(result.text, stops)
        return ChatResult(generations=[ChatGeneration(message=self._message(result, text, stops))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        conversation, options, stops, events = self._request(messages, stop, kwargs)
        trimmer = _StopTrimmer(stops)
        result: GuardrailResult | None = None
        for item in self.guardrail.stream(conversation, **options):
            if isinstance(item, GuardrailResult):
                result = item
                break
            piece = trimmer.feed(item)
            if piece:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager:
                    run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
        result = _check_result(result)
        if self.dispatch_events:
            dispatch_events(self, events, run_manager)
        yield self._last_chunk(result, trimmer)

    def _last_chunk(self, result: GuardrailResult, trimmer: _StopTrimmer) -> ChatGenerationChunk:
        """The closing chunk: held-back text, usage and the guardrail decision."""
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content=trimmer.finish(),
                usage_metadata=_usage(result),
                response_metadata=self._response_metadata(result, trimmer.stopped),
                chunk_position="last",
            )
        )

    # ------------------------------------------------------------------ async

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        conversation, options, stops, events = self._request(messages, stop, kwargs)
        result = await self.guardrail.agenerate(conversation, **options)
        if self.dispatch_events:
            await adispatch_events(self, events, run_manager)
        text = _cut(result.text, stops)
        return ChatResult(generations=[ChatGeneration(message=self._message(result, text, stops))])

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        conversation, options, stops, events = self._request(messages, stop, kwargs)
        trimmer = _StopTrimmer(stops)
        result: GuardrailResult | None = None
        async for item in self.guardrail.astream(conversation, **options):
            if isinstance(item, GuardrailResult):
                result = item
                break
            piece = trimmer.feed(item)
            if piece:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager:
                    await run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
        result = _check_result(result)
        if self.dispatch_events:
            await adispatch_events(self, events, run_manager)
        yield self._last_chunk(result, trimmer)


def _check_result(result: GuardrailResult | None) -> GuardrailResult:
    if result is None:  # Guardrail.stream always ends with its result
        raise RuntimeError("the guardrail stream ended without a result")
    return result


def _usage(result: GuardrailResult) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=result.usage.input_tokens,
        output_tokens=result.usage.output_tokens,
        total_tokens=result.usage.total_tokens,
    )


def _cut(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


class _StopTrimmer:
    """Streams text up to the first stop sequence, holding back a possible partial match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.buffer += text
        cut = _cut(self.buffer, self.stops)
        if len(cut) < len(self.buffer):
            self.stopped = True
            self.buffer = ""
            return cut
        keep = max(0, len(self.buffer) - self.hold)
        out, self.buffer = self.buffer[:keep], self.buffer[keep:]
        return out

    def finish(self) -> str:
        out, self.buffer = self.buffer, ""
        return out
