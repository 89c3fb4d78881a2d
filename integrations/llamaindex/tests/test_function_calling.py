"""MarsGuardrailLLM function calling on a tiny LLaVA guardrail.

A random-weight model never chooses a tool; ``forced_output`` makes the real
``generate`` write a given answer token by token (the guardrail's hooks run as
always), so what is tested is the path from LlamaIndex tools through the chat
template to ``ToolCallBlock``s and ``ToolSelection``s, and the guardrail's say over it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from llama_index.core.base.llms.types import (
    ChatMessage,
    ImageBlock,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.tools import FunctionTool
from llama_index.llms.mars_guardrail import (
    GuardrailWithheldToolCallsError,
    MarsGuardrailLLM,
    to_conversation,
)

from guardrail import Guardrail
from guardrail.errors import InputError
from guardrail.testing import (
    cached_tiny_model,
    forced_output,
    png_bytes,
    tiny_guardrail,
    tiny_policy,
)


def get_weather(city: str) -> str:
    """The weather in a city now."""
    return f"sunny in {city}"


def get_time(zone: str) -> str:
    """The time in a time zone."""
    return "noon"


TOOLS = [FunctionTool.from_defaults(get_weather), FunctionTool.from_defaults(get_time)]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'


def calm_guard() -> Guardrail:
    """Scores every request, steers none (tau far above any score)."""
    model, processor = cached_tiny_model("llava")
    policy = tiny_policy(model, processor, name="li-tools", tau=100.0)
    return tiny_guardrail("llava", policy=policy, max_new_tokens=40)


def forced_llm(guard: Guardrail, text: str) -> MarsGuardrailLLM:
    return MarsGuardrailLLM(
        guardrail=guard,
        max_tokens=100,
        generate_kwargs=forced_output(guard.adapter.tokenizer, text),
    )


def test_tools_reach_the_template_and_calls_come_back() -> None:
    guard = calm_guard()
    llm = forced_llm(guard, f"Checking.\n{CALL}")
    assert llm.metadata.is_function_calling_model
    response = llm.chat_with_tools(TOOLS, user_msg="Weather in Paris?")
    assert response.message.content == "Checking."
    (selection,) = llm.get_tool_calls_from_response(response)
    assert (selection.tool_name, selection.tool_kwargs) == ("get_weather", {"city": "Paris"})
    assert selection.tool_id
    assert response.additional_kwargs["guardrail"]["tool_calls_withheld"] == 0

    # the prompt the model saw holds the tools' schemas (rendered by the template)
    seen: list[Any] = []
    original = guard.adapter.render

    def spy(conv: Any, tools: Any = None) -> str:
        text = original(conv, tools)
        seen.append(text)
        return text

    guard.adapter.render = spy  # type: ignore[method-assign]
    try:
        llm.chat_with_tools(TOOLS, user_msg="Weather in Paris?")
    finally:
        del guard.adapter.render
    assert "get_weather" in seen[-1] and "get_time" in seen[-1]

    # streaming and async: the last response carries the call; no markup leaks as text
    last = None
    for last in llm.stream_chat_with_tools(TOOLS, user_msg="Weather in Paris?"):
        assert "<tool_call>" not in (last.message.content or "")
    assert last is not None
    assert [s.tool_name for s in llm.get_tool_calls_from_response(last)] == ["get_weather"]
    response = asyncio.run(llm.achat_with_tools(TOOLS, user_msg="Weather in Paris?"))
    assert llm.get_tool_calls_from_response(response)[0].tool_kwargs == {"city": "Paris"}


def test_predict_and_call_runs_the_chosen_tool() -> None:
    llm = forced_llm(calm_guard(), CALL)
    answer = llm.predict_and_call(TOOLS, user_msg="Weather in Paris?")
    assert answer.response == "sunny in Paris"


def test_parallel_calls_only_when_allowed() -> None:
    llm = forced_llm(calm_guard(), f"{CALL}\n{TIME_CALL}")
    single = llm.chat_with_tools(TOOLS, user_msg="Weather and time?")
    assert [s.tool_name for s in llm.get_tool_calls_from_response(single)] == ["get_weather"]
    both = llm.chat_with_tools(TOOLS, user_msg="Weather and time?", allow_parallel_tool_calls=True)
    names = [s.tool_name for s in llm.get_tool_calls_from_response(both)]
    assert names == ["get_weather", "get_time"]


def test_no_call_is_an_error_only_when_asked() -> None:
    llm = forced_llm(calm_guard(), "It is sunny.")
    response = llm.chat_with_tools(TOOLS, user_msg="Weather in Paris?")
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="no tool call"):
        llm.get_tool_calls_from_response(response)


def test_calls_are_withheld_when_the_guardrail_intervenes() -> None:
    guard = tiny_guardrail("llava", max_new_tokens=40)  # steers every request
    llm = forced_llm(guard, CALL)
    response = llm.chat_with_tools(TOOLS, user_msg="Weather in Paris?")
    decision = response.additional_kwargs["guardrail"]
    assert decision["intervened"] and decision["tool_calls_withheld"] == 1
    assert response.message.content == guard.refusal_message
    assert not [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
    # a withheld call never reads as "no tool was needed", whatever the caller asks
    for strict in (True, False):
        with pytest.raises(GuardrailWithheldToolCallsError, match="withheld 1"):
            llm.get_tool_calls_from_response(response, error_on_no_tool_call=strict)
    with pytest.raises(GuardrailWithheldToolCallsError):
        llm.predict_and_call(TOOLS, user_msg="Weather in Paris?")


def test_a_tool_history_is_the_sdk_conversation() -> None:
    history = [
        ChatMessage(role=MessageRole.USER, content="Weather in Paris?"),
        ChatMessage(
            role=MessageRole.ASSISTANT,
            blocks=[
                TextBlock(text="Checking."),
                ToolCallBlock(
                    tool_call_id="c1", tool_name="get_weather", tool_kwargs={"city": "Paris"}
                ),
            ],
        ),
        ChatMessage(
            role=MessageRole.TOOL,
            content="sunny",
            additional_kwargs={"tool_call_id": "c1", "name": "get_weather"},
        ),
    ]
    conversation = to_conversation(history)
    assert conversation[1]["tool_calls"] == [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
        }
    ]
    assert conversation[2] == {
        "role": "tool",
        "content": [{"type": "text", "text": "sunny"}],
        "tool_call_id": "c1",
        "name": "get_weather",
    }
    guard = calm_guard()
    llm = forced_llm(guard, "It is sunny in Paris.")
    response = llm.chat_with_tools(TOOLS, chat_history=history)
    expected = guard.generate(
        conversation,
        tools=[t.metadata.to_openai_tool() for t in TOOLS],
        **forced_output(guard.adapter.tokenizer, "It is sunny in Paris."),
    )
    assert response.message.content == expected.text == "It is sunny in Paris."
    assert response.raw["usage"]["prompt_tokens"] == expected.usage.input_tokens


def test_a_tool_result_is_text_only() -> None:
    image = ImageBlock(image=png_bytes(), image_mimetype="image/png")
    with pytest.raises(InputError, match="text blocks only"):
        to_conversation([ChatMessage(role=MessageRole.TOOL, blocks=[image])])
