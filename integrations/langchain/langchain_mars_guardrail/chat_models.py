"""``ChatMarsGuardrail``: a LangChain chat model backed by a :class:`guardrail.Guardrail`."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.base import LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import (
    Runnable,
    RunnableConfig,
    RunnableLambda,
    RunnableMap,
    RunnablePassthrough,
)
from langchain_core.runnables.config import get_config_list
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict, Field

from guardrail import Guardrail, GuardrailError, GuardrailResult
from guardrail.errors import InputError
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

__all__ = ["ChatMarsGuardrail", "GuardrailRefusedError", "guardrail_metadata"]

PROVIDER = "mars_guardrail"


class GuardrailRefusedError(GuardrailError):
    """Structured output was asked for and the guarded answer is a refusal (or the
    guardrail withheld the model's tool calls): there is nothing to parse.

    ``message`` is the model's reply, with the guardrail decision in its
    ``response_metadata["guardrail"]``.
    """

    def __init__(self, message: BaseMessage):
        decision = message.response_metadata.get("guardrail", {})
        super().__init__(
            "the guardrail refused this request, so there is no structured output "
            f"(policy {decision.get('policy_name')}@{decision.get('policy_version')}, "
            f"request {decision.get('request_id')})"
        )
        self.message = message


@dataclass
class _Prefetched:
    """One row of a batched ``Guardrail.generate``, waiting for its own run."""

    conversation: list[dict[str, Any]]
    result: GuardrailResult
    events: list[GuardrailEvent] = field(default_factory=list)
    used: bool = False


# The prefetched row for the chat model call now running (set by batch / abatch).
_PREFETCHED: ContextVar[_Prefetched | None] = ContextVar(
    "langchain_mars_guardrail_prefetched", default=None
)


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

    Tools: ``bind_tools`` offers tools through the model's chat template; the calls
    the model emits are ``AIMessage.tool_calls`` (see the README for the formats, and
    for why ``tool_choice`` cannot force a call). ``with_structured_output`` supports
    ``method="function_calling"`` (default) and ``"json_mode"``. ``batch`` / ``abatch``
    run each group of up to ``max_concurrency`` inputs as one batched
    ``Guardrail.generate``.
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

    # ------------------------------------------------------------------ tools

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer ``tools`` (anything ``convert_to_openai_tool`` takes) to the model.

        ``tool_choice``: ``None``, ``"auto"``, ``"any"`` or ``"required"`` offer every
        tool; a tool's name (or ``{"type": "function", "function": {"name": ...}}``)
        offers that tool alone; ``"none"`` offers none. Nothing forces the model to
        call a tool: forcing would decide the first generated token, which is where
        the guardrail steers toward a refusal, so a flagged request could no longer
        be refused.
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        _choose_tools(formatted, tool_choice)  # errors at bind time, not at invoke
        return self.bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        method: Literal["function_calling", "json_mode", "json_schema"] = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """A runnable returning ``schema``-shaped output.

        ``method="function_calling"`` offers the schema as a tool and parses the
        model's call of it; ``"json_mode"`` parses the answer's text as JSON (the
        prompt must ask for it); ``"json_schema"`` does the same and validates the
        object against ``schema`` (a pydantic model or a JSON schema dict). Decoding is
        never constrained, for the reason ``bind_tools`` gives for ``tool_choice``, so
        ``strict`` is accepted and has no effect: a reply that does not fit the schema
        is a parsing error, never a silently coerced object. A refused
        request raises :class:`GuardrailRefusedError` (with ``include_raw=True`` it is
        the ``parsing_error``, next to the raw message).
        """
        if kwargs:
            raise ValueError(f"unsupported arguments {sorted(kwargs)}")
        is_model = isinstance(schema, type) and is_basemodel_subclass(schema)
        traced = {"ls_structured_output_format": {"kwargs": {"method": method}, "schema": schema}}
        parser: Runnable[Any, Any]
        if method == "function_calling":
            llm = self.bind_tools([schema], tool_choice="any", **traced)
            if is_model:
                parser = PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
            else:
                name = convert_to_openai_tool(schema)["function"]["name"]
                parser = JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
        elif method in ("json_mode", "json_schema"):
            llm = self.bind(**traced)
            if is_model:
                parser = PydanticOutputParser(pydantic_object=schema)  # type: ignore[arg-type]
            elif method == "json_schema":
                parser = JsonOutputParser() | RunnableLambda(
                    functools.partial(_validated, schema=convert_to_json_schema(schema))
                )
            else:
                parser = JsonOutputParser()
        else:
            raise InputError(
                f"method={method!r} is not one of 'function_calling', 'json_mode', 'json_schema'"
            )
        answered = RunnableLambda(_answered, name="guardrail_answered")
        if not include_raw:
            return llm | answered | parser
        parse = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | answered | parser, parsing_error=lambda _: None
        )
        empty = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks([empty], exception_key="parsing_error")

    # ------------------------------------------------------------------ batches

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage | Exception]:  # type: ignore[override]
        """Generate for every input in one batched ``Guardrail.generate`` per group of
        ``max_concurrency`` inputs (all of them when it is unset).

        Each input still gets its own run (its config's callbacks, tags, metadata and
        run id, its events), opened after the group's generation; the generation
        kwargs are the batch's. If the batched call fails (say one input is
        invalid), each input of the group is generated on its own, so every input
        gets its own result or error.
        """
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        out: list[AIMessage | Exception] = []
        for group in _groups(len(inputs), configs[0].get("max_concurrency")):
            prefetched = self._prefetch([inputs[i] for i in group], kwargs)
            for i, pre in zip(group, prefetched, strict=True):
                token = _PREFETCHED.set(pre)
                try:
                    out.append(self.invoke(inputs[i], configs[i], **kwargs))
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    out.append(exc)
                finally:
                    _PREFETCHED.reset(token)
        return out

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage | Exception]:  # type: ignore[override]
        """Async twin of :meth:`batch` (one batched ``Guardrail.agenerate`` per group)."""
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        out: list[AIMessage | Exception] = []
        for group in _groups(len(inputs), configs[0].get("max_concurrency")):
            prefetched = await self._aprefetch([inputs[i] for i in group], kwargs)
            for i, pre in zip(group, prefetched, strict=True):
                token = _PREFETCHED.set(pre)
                try:
                    out.append(await self.ainvoke(inputs[i], configs[i], **kwargs))
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    out.append(exc)
                finally:
                    _PREFETCHED.reset(token)
        return out

    def _batch_request(
        self, inputs: list[LanguageModelInput], kwargs: dict[str, Any]
    ) -> tuple[list[list[dict[str, Any]]], dict[str, Any], list[GuardrailEvent]] | None:
        """The conversations and shared options of a batch; None if an input is invalid
        (each input then goes on its own and reports its own error)."""
        options = dict(kwargs)
        stop = options.pop("stop", None)
        try:
            requests = [
                self._request(self._convert_input(x).to_messages(), stop, dict(options))
                for x in inputs
            ]
        except (GuardrailError, ValueError, TypeError):
            return None
        shared = requests[0][1]
        events: list[GuardrailEvent] = []
        shared["sinks"] = [*shared["sinks"][:-1], CallbackSink(events.append)]
        return [r[0] for r in requests], shared, events

    def _prefetch(
        self, inputs: list[LanguageModelInput], kwargs: dict[str, Any]
    ) -> list[_Prefetched | None]:
        request = self._batch_request(inputs, kwargs)
        if request is None:
            return [None] * len(inputs)
        conversations, options, events = request
        try:
            results = self.guardrail.generate(conversations, **options)
        except GuardrailError:
            return [None] * len(inputs)
        return _rows(conversations, results, events)

    async def _aprefetch(
        self, inputs: list[LanguageModelInput], kwargs: dict[str, Any]
    ) -> list[_Prefetched | None]:
        request = self._batch_request(inputs, kwargs)
        if request is None:
            return [None] * len(inputs)
        conversations, options, events = request
        try:
            results = await self.guardrail.agenerate(conversations, **options)
        except GuardrailError:
            return [None] * len(inputs)
        return _rows(conversations, results, events)

    def _take_prefetched(
        self, conversation: list[dict[str, Any]], events: list[GuardrailEvent]
    ) -> GuardrailResult | None:
        """The batch's result for this call's conversation (once), with its events."""
        pre = _PREFETCHED.get()
        if pre is None or pre.used or pre.conversation != conversation:
            return None
        pre.used = True
        events.extend(pre.events)
        return pre.result

    # ------------------------------------------------------------------ requests

    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[str, Any], list[str], list[GuardrailEvent]]:
        """Conversation, guardrail kwargs, stop sequences and the list events land in."""
        conversation = to_conversation(messages)
        options = {**self.model_kwargs, **kwargs}
        options.pop("model", None)
        choice = options.pop("tool_choice", None)
        if options.get("tools"):
            options["tools"] = _choose_tools(options["tools"], choice)
        if not options.get("tools"):
            options.pop("tools", None)
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
            tool_calls=[
                {"name": c.name, "args": c.arguments, "id": c.id, "type": "tool_call"}
                for c in result.tool_calls
            ],
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
        result = self._take_prefetched(conversation, events)
        if result is None:
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
        result: GuardrailResult | None = self._take_prefetched(conversation, events)
        items = [result.text, result] if result is not None else []
        for item in items or self.guardrail.stream(conversation, **options):
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
                tool_call_chunks=[
                    {
                        "name": c.name,
                        "args": json.dumps(c.arguments),
                        "id": c.id,
                        "index": i,
                        "type": "tool_call_chunk",
                    }
                    for i, c in enumerate(result.tool_calls)
                ],
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
        result = self._take_prefetched(conversation, events)
        if result is None:
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
        result: GuardrailResult | None = self._take_prefetched(conversation, events)
        items = [result.text, result] if result is not None else []
        async for item in (
            _aiter(items) if items else self.guardrail.astream(conversation, **options)
        ):
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


def _choose_tools(tools: list[dict[str, Any]], choice: Any) -> list[dict[str, Any]]:
    """The tools a ``tool_choice`` offers (see :meth:`ChatMarsGuardrail.bind_tools`)."""
    if choice is None or choice is True or choice in ("auto", "any", "required"):
        return tools
    if choice is False or choice == "none":
        return []
    name = choice
    if isinstance(choice, Mapping):
        name = choice.get("function", choice).get("name")
    names = [t["function"]["name"] for t in tools]
    if not isinstance(name, str) or name not in names:
        raise InputError(
            f"tool_choice {choice!r} names no bound tool; use 'auto', 'any', 'none' or one "
            f"of {names}"
        )
    return [t for t in tools if t["function"]["name"] == name]


def _validated(value: Any, schema: dict[str, Any]) -> Any:
    """``value`` if it fits the JSON ``schema`` (an ``OutputParserException`` otherwise)."""
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        raise OutputParserException(
            f"the reply does not fit the schema: {exc.message}", llm_output=json.dumps(value)
        ) from None
    return value


def _answered(message: BaseMessage) -> BaseMessage:
    """``message`` unless the guardrail refused it (structured output has nothing to parse)."""
    decision = message.response_metadata.get("guardrail", {})
    if decision.get("refused") or decision.get("tool_calls_withheld"):
        raise GuardrailRefusedError(message)
    return message


def _groups(n: int, size: int | None) -> list[range]:
    step = size if size and size > 0 else n
    return [range(start, min(start + step, n)) for start in range(0, n, step)]


def _rows(
    conversations: list[list[dict[str, Any]]],
    results: list[GuardrailResult],
    events: list[GuardrailEvent],
) -> list[_Prefetched | None]:
    return [
        _Prefetched(c, r, [e for e in events if e.request_id == r.request_id])
        for c, r in zip(conversations, results, strict=True)
    ]


async def _aiter(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


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
