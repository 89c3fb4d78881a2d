"""``MarsGuardrailLLM``: a LlamaIndex LLM backed by a :class:`guardrail.Guardrail`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    ImageBlock,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
    VideoBlock,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.llms.mars_guardrail.events import adispatch, dispatch
from pydantic import Field

from guardrail import Guardrail, GuardrailResult
from guardrail.errors import GuardrailError, InputError
from guardrail.observability.events import CallbackSink, GuardrailEvent

__all__ = ["GuardrailWithheldToolCallsError", "MarsGuardrailLLM", "to_conversation"]

_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
}


class GuardrailWithheldToolCallsError(GuardrailError, ValueError):
    """Tool calls were asked for, and the guardrail withheld the model's calls (the
    request was steered or the answer is a refusal). ``response`` is the reply, with
    the decision in ``response.additional_kwargs["guardrail"]``."""

    def __init__(self, response: ChatResponse):
        decision = response.additional_kwargs.get("guardrail", {})
        super().__init__(
            f"the guardrail withheld {decision.get('tool_calls_withheld')} tool call(s) of "
            f"request {decision.get('request_id')} (policy {decision.get('policy_name')}@"
            f"{decision.get('policy_version')}): the request was refused, so no tool runs"
        )
        self.response = response


def to_conversation(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The guardrail conversation (transformers chat format) of LlamaIndex messages.

    Blocks: ``TextBlock``; ``ImageBlock`` from inline data (``image``), a ``path`` or a
    ``data:`` / ``file:`` URL; ``VideoBlock`` from a ``path`` (a directory of frames or
    an animated GIF). Remote URLs are refused: the guardrail never fetches.
    """
    conversation = []
    for index, message in enumerate(messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise InputError(
                f"message {index} has role {message.role.value!r}; the guardrail takes system, "
                "user, assistant and tool messages"
            )
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(message.blocks):
            where = f"message {index} block {j}"
            if isinstance(block, TextBlock):
                parts.append({"type": "text", "text": block.text})
            elif isinstance(block, ImageBlock) and role != "tool":
                parts.append({"type": "image", "image": _image(block, where)})
            elif isinstance(block, VideoBlock) and block.path is not None and role != "tool":
                parts.append({"type": "video", "video": str(block.path)})
            elif isinstance(block, ThinkingBlock) and role == "assistant":
                continue
            elif isinstance(block, ToolCallBlock) and role == "assistant":
                calls.append(
                    {
                        "id": block.tool_call_id,
                        "type": "function",
                        "function": {"name": block.tool_name, "arguments": block.tool_kwargs},
                    }
                )
            elif role == "tool":
                raise InputError(
                    f"{where} is a {type(block).__name__}; a tool result is text blocks only"
                )
            else:
                raise InputError(
                    f"{where} is a {type(block).__name__}; the guardrail accepts TextBlock, "
                    "ImageBlock and VideoBlock(path=frames directory or animated GIF)"
                )
        entry: dict[str, Any] = {"role": role, "content": parts}
        if calls:
            entry["tool_calls"] = calls
        if role == "tool":
            extra = message.additional_kwargs
            entry["tool_call_id"] = extra.get("tool_call_id")
            if extra.get("name") or extra.get("tool_name"):
                entry["name"] = extra.get("name") or extra.get("tool_name")
        conversation.append(entry)
    return conversation


def _image(block: ImageBlock, where: str) -> Any:
    if block.image is not None:
        return block.resolve_image().read()  # inline data, stored base64 by ImageBlock
    if block.path is not None:
        return str(block.path)
    if block.url is not None:
        url = str(block.url)
        parsed = urlparse(url)
        if parsed.scheme == "data":
            return block.resolve_image().read()
        if parsed.scheme == "file":
            return unquote(parsed.path)
        raise InputError(
            f"{where}: image URL {url!r} is not fetched (the guardrail runs offline); "
            "pass the image bytes or a path"
        )
    raise InputError(f"{where}: ImageBlock has no image, path or url")


class MarsGuardrailLLM(FunctionCallingLLM):
    """A local multimodal LLM guarded by MARS, as a LlamaIndex LLM.

    Example:
        ```python
        from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock
        from llama_index.llms.mars_guardrail import MarsGuardrailLLM

        llm = MarsGuardrailLLM(guardrail=guard)
        llm.chat([ChatMessage(role="user", blocks=[ImageBlock(path="cat.png"), TextBlock(text="What is this?")])])
        ```

    Responses carry the guardrail decision in the *response's*
    ``additional_kwargs["guardrail"]`` (and ``raw``; not on ``response.message``),
    token counts in ``raw["usage"]``.

    Function calling (``chat_with_tools``, ``predict_and_call``, ``FunctionAgent``):
    tools reach the model through its chat template; its calls come back as
    ``ToolCallBlock``s of the reply (``get_tool_calls_from_response``). Nothing forces
    a call (``tool_required`` is not enforced): forcing would decide the first
    generated token, which is where the guardrail steers toward a refusal. Interventions and refusals are
    dispatched as :class:`GuardrailInterventionEvent` / :class:`GuardrailRefusalEvent`
    through the LlamaIndex instrumentation dispatcher.
    """

    guardrail: Guardrail = Field(exclude=True, description="the guardrail that generates")
    model_name: str | None = Field(
        default=None, description="name in metadata; the model's by default"
    )
    temperature: float | None = Field(
        default=None, description="sampling temperature; None/0: greedy"
    )
    max_tokens: int | None = Field(default=None, ge=1, description="most new tokens per answer")
    context_window: int | None = Field(default=None, description="the model's context size")
    mode: Literal["enforce", "shadow", "off"] | None = Field(
        default=None, description="guardrail mode"
    )
    generate_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="more generate() kwargs"
    )
    dispatch_events: bool = Field(
        default=True, description="dispatch guardrail instrumentation events"
    )

    @classmethod
    def class_name(cls) -> str:
        return "MarsGuardrailLLM"

    @property
    def metadata(self) -> LLMMetadata:
        config = getattr(self.guardrail.adapter, "text_config", None)
        window = self.context_window or getattr(config, "max_position_embeddings", None) or 4096
        return LLMMetadata(
            context_window=int(window),
            num_output=self.max_tokens or self.guardrail.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self.model_name or self.guardrail.telemetry.model,
        )

    # ------------------------------------------------------------------ requests

    def _options(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[GuardrailEvent]]:
        options = {**self.generate_kwargs, **kwargs}
        options.pop("formatted", None)
        options.pop("tool_choice", None)  # nothing forces a call (see the class docstring)
        if not options.get("tools"):
            options.pop("tools", None)
        temperature = options.pop("temperature", self.temperature)
        max_tokens = options.pop("max_tokens", self.max_tokens)
        if temperature:
            options.setdefault("do_sample", True)
            options["temperature"] = float(temperature)
        if max_tokens is not None:
            options["max_new_tokens"] = int(max_tokens)
        if self.mode is not None:
            options.setdefault("mode", self.mode)
        events: list[GuardrailEvent] = []
        options["sinks"] = [*options.pop("sinks", []), CallbackSink(events.append)]
        return options, events

    def _conversation(self, messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
        return to_conversation(self._extend_messages(list(messages)))

    def _raw(self, result: GuardrailResult) -> dict[str, Any]:
        return {
            "guardrail": result.decision(),
            "finish_reason": result.finish_reason,
            "usage": {
                "prompt_tokens": result.usage.input_tokens,
                "completion_tokens": result.usage.output_tokens,
                "total_tokens": result.usage.total_tokens,
            },
        }

    def _chat_response(self, result: GuardrailResult) -> ChatResponse:
        blocks: list[Any] = [TextBlock(text=result.text)]
        blocks += [
            ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments)
            for c in result.tool_calls
        ]
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks),
            raw=self._raw(result),
            additional_kwargs={"guardrail": result.decision()},
        )

    def _events(self, events: list[GuardrailEvent]) -> None:
        if self.dispatch_events:
            dispatch(events)

    async def _aevents(self, events: list[GuardrailEvent]) -> None:
        if self.dispatch_events:
            await adispatch(events)

    # ------------------------------------------------------------------ shared bodies

    def _chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        options, events = self._options(kwargs)
        result = self.guardrail.generate(self._conversation(messages), **options)
        self._events(events)
        return self._chat_response(result)

    async def _achat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        options, events = self._options(kwargs)
        result = await self.guardrail.agenerate(self._conversation(messages), **options)
        await self._aevents(events)
        return self._chat_response(result)

    def _stream_chat(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> ChatResponseGen:
        """Responses with the text so far and its ``delta``; the last one carries the decision."""
        conversation = self._conversation(messages)  # input errors surface at the call
        options, events = self._options(kwargs)

        def gen() -> ChatResponseGen:
            text = ""
            for item in self.guardrail.stream(conversation, **options):
                if isinstance(item, GuardrailResult):
                    self._events(events)
                    yield self._final_chat(item)
                    return
                text += item
                yield _partial(text, item)

        return gen()

    def _astream_chat(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> ChatResponseAsyncGen:
        conversation = self._conversation(messages)
        options, events = self._options(kwargs)

        async def gen() -> ChatResponseAsyncGen:
            text = ""
            async for item in self.guardrail.astream(conversation, **options):
                if isinstance(item, GuardrailResult):
                    await self._aevents(events)
                    yield self._final_chat(item)
                    return
                text += item
                yield _partial(text, item)

        return gen()

    def _final_chat(self, result: GuardrailResult) -> ChatResponse:
        response = self._chat_response(result)
        response.delta = ""
        return response

    # ------------------------------------------------------------------ chat

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream_chat(messages, kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await self._achat(messages, kwargs)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        return self._astream_chat(messages, kwargs)

    # ------------------------------------------------------------------ tools

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[Any],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The ``chat`` kwargs of a tool call: the messages and the tools' JSON schemas.

        ``tool_required`` is accepted and not enforced (see the class docstring)."""
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg))
        elif user_msg is not None:
            messages.append(user_msg)
        specs = [tool.metadata.to_openai_tool() for tool in tools]
        return {"messages": messages, "tools": specs or None, **kwargs}

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[Any],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Only the first call unless parallel calls are allowed."""
        if not allow_parallel_tool_calls:
            calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
            for extra in calls[1:]:
                response.message.blocks.remove(extra)
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The reply's tool calls as ``ToolSelection``s.

        Raises:
            GuardrailWithheldToolCallsError: the guardrail withheld the model's calls
                (checked even when ``error_on_no_tool_call`` is false: a refused
                request must not look like one that needed no tool).
            ValueError: no call and ``error_on_no_tool_call``.
        """
        selections = [
            ToolSelection(
                tool_id=b.tool_call_id or "",
                tool_name=b.tool_name,
                tool_kwargs=b.tool_kwargs if isinstance(b.tool_kwargs, dict) else {},
            )
            for b in response.message.blocks
            if isinstance(b, ToolCallBlock)
        ]
        if not selections:
            if response.additional_kwargs.get("guardrail", {}).get("tool_calls_withheld"):
                raise GuardrailWithheldToolCallsError(response)
            if error_on_no_tool_call:
                raise ValueError("the model made no tool call")
        return selections

    # ------------------------------------------------------------------ completion

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _completion(self._chat(_user(prompt), kwargs))

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        responses = self._stream_chat(_user(prompt), kwargs)
        return (_completion(r) for r in responses)

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        return _completion(await self._achat(_user(prompt), kwargs))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        responses = self._astream_chat(_user(prompt), kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            async for response in responses:
                yield _completion(response)

        return gen()


def _user(prompt: str) -> list[ChatMessage]:
    return [ChatMessage(role=MessageRole.USER, content=prompt)]


def _partial(text: str, delta: str) -> ChatResponse:
    return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)


def _completion(response: ChatResponse) -> CompletionResponse:
    return CompletionResponse(
        text=response.message.content or "",  # the text blocks (tool calls are on chat only)
        delta=response.delta,
        raw=response.raw,
        additional_kwargs=dict(response.additional_kwargs),
    )
