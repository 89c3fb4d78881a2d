"""ChatMarsGuardrail tool calling, structured output and batches on a tiny LLaVA guardrail.

A random-weight model never chooses a tool; ``forced_output`` makes the real
``generate`` write a given answer token by token (the guardrail's hooks run as
always), so what is tested is the path from the template to ``AIMessage.tool_calls``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_mars_guardrail import ChatMarsGuardrail, GuardrailRefusedError
from pydantic import BaseModel

from guardrail import Guardrail
from guardrail.errors import InputError
from guardrail.messages import is_single_conversation
from guardrail.testing import cached_tiny_model, forced_output, tiny_guardrail, tiny_policy


@tool
def get_weather(city: str) -> str:
    """The weather in a city now."""
    return f"sunny in {city}"


@tool
def get_time(zone: str) -> str:
    """The time in a time zone."""
    return "noon"


class Weather(BaseModel):
    """A weather report."""

    city: str
    celsius: int


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def calm_guard(**kwargs: Any) -> Guardrail:
    """Scores every request, steers none (tau far above any score)."""
    model, processor = cached_tiny_model("llava")
    policy = tiny_policy(model, processor, name="lc-tools", tau=100.0)
    return tiny_guardrail("llava", policy=policy, max_new_tokens=40, **kwargs)


def forced_chat(guard: Guardrail, text: str, **kwargs: Any) -> ChatMarsGuardrail:
    return ChatMarsGuardrail(
        guardrail=guard, model_kwargs=forced_output(guard.adapter.tokenizer, text), **kwargs
    )


def test_bound_tools_reach_the_template_and_calls_come_back() -> None:
    guard = calm_guard()
    chat = forced_chat(guard, f"Checking.\n{CALL}").bind_tools([get_weather, get_time])
    message = chat.invoke("Weather in Paris?")
    assert message.content == "Checking."
    ((call,),) = [message.tool_calls]
    assert (call["name"], call["args"], call["type"]) == (
        "get_weather",
        {"city": "Paris"},
        "tool_call",
    )
    assert call["id"]
    assert [b["type"] for b in message.content_blocks] == ["text", "tool_call"]
    assert message.response_metadata["guardrail"]["tool_calls_withheld"] == 0

    full: Any = None
    for chunk in chat.stream("Weather in Paris?"):
        full = chunk if full is None else full + chunk
    assert full.content.strip() == "Checking." and "tool_call" not in full.content
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [("get_weather", {"city": "Paris"})]

    async_message = asyncio.run(chat.ainvoke("Weather in Paris?"))
    assert async_message.tool_calls[0]["args"] == {"city": "Paris"}


def test_a_tool_history_is_rendered_like_the_sdk_conversation() -> None:
    guard = calm_guard()
    history = [
        HumanMessage("Weather in Paris?"),
        AIMessage(
            "",
            tool_calls=[
                {"name": "get_weather", "args": {"city": "Paris"}, "id": "a1", "type": "tool_call"}
            ],
        ),
        ToolMessage("sunny, 21 C", tool_call_id="a1", name="get_weather"),
    ]
    reply = ChatMarsGuardrail(guardrail=guard).bind_tools([get_weather]).invoke(history)
    same = guard.generate(
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "a1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    }
                ],
            },
            {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "a1", "name": "get_weather"},
        ],
        tools=[_schema(get_weather)],
    )
    assert reply.content == same.text and reply.content
    with pytest.raises(InputError, match="no call before it"):
        ChatMarsGuardrail(guardrail=guard).invoke(
            [HumanMessage("h"), ToolMessage("result", tool_call_id="1")]
        )


def _schema(t: Any) -> dict[str, Any]:
    from langchain_core.utils.function_calling import convert_to_openai_tool

    return convert_to_openai_tool(t)


def test_tool_choice_narrows_the_offer_but_cannot_force_a_call() -> None:
    guard = calm_guard()
    chat = forced_chat(guard, CALL)
    # Only get_time is offered: a call of get_weather is not a call of an offered tool.
    narrowed = chat.bind_tools([get_weather, get_time], tool_choice="get_time").invoke("x")
    assert narrowed.tool_calls == [] and narrowed.content == CALL
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert (
        len(chat.bind_tools([get_weather, get_time], tool_choice=named).invoke("x").tool_calls) == 1
    )
    assert chat.bind_tools([get_weather], tool_choice="none").invoke("x").tool_calls == []
    assert len(chat.bind_tools([get_weather], tool_choice="any").invoke("x").tool_calls) == 1
    with pytest.raises(InputError, match="names no bound tool"):
        chat.bind_tools([get_weather], tool_choice="delete_everything")


def test_calls_are_withheld_when_the_guardrail_intervenes() -> None:
    guard = tiny_guardrail("llava", max_new_tokens=40)  # steers every request
    message = forced_chat(guard, CALL).bind_tools([get_weather]).invoke("Weather in Paris?")
    decision = message.response_metadata["guardrail"]
    assert message.tool_calls == [] and message.content == guard.refusal_message
    assert decision["intervened"] and decision["refused"] and decision["tool_calls_withheld"] == 1
    chunks = list(forced_chat(guard, CALL).bind_tools([get_weather]).stream("Weather in Paris?"))
    assert "".join(c.content for c in chunks) == guard.refusal_message
    assert not any(c.tool_call_chunks for c in chunks)


def test_structured_output_by_function_calling() -> None:
    guard = calm_guard()
    call = (
        '<tool_call>{"name": "Weather", "arguments": {"city": "Oslo", "celsius": -3}}</tool_call>'
    )
    chat = forced_chat(guard, call)
    assert chat.with_structured_output(Weather).invoke("x") == Weather(city="Oslo", celsius=-3)
    schema = Weather.model_json_schema()
    schema["title"] = "Weather"
    assert chat.with_structured_output(schema).invoke("x") == {"city": "Oslo", "celsius": -3}
    raw = chat.with_structured_output(Weather, include_raw=True).invoke("x")
    assert isinstance(raw["raw"], AIMessage) and raw["parsing_error"] is None
    assert raw["parsed"] == Weather(city="Oslo", celsius=-3)


def test_structured_output_in_json_mode() -> None:
    guard = calm_guard()
    chat = forced_chat(guard, '{"city": "Lima", "celsius": 19}')
    parsed = chat.with_structured_output(Weather, method="json_mode").invoke("Answer in JSON")
    assert parsed == Weather(city="Lima", celsius=19)
    as_dict = chat.with_structured_output(Weather.model_json_schema(), method="json_mode")
    assert as_dict.invoke("Answer in JSON") == {"city": "Lima", "celsius": 19}
    # json_schema: the same parse, then validated against the schema (not constrained)
    schema = Weather.model_json_schema()
    assert chat.with_structured_output(schema, method="json_schema").invoke("JSON") == {
        "city": "Lima",
        "celsius": 19,
    }
    wrong = forced_chat(guard, '{"city": "Lima", "celsius": "warm"}')
    with pytest.raises(OutputParserException, match="does not fit the schema"):
        wrong.with_structured_output(schema, method="json_schema").invoke("JSON")
    with pytest.raises(InputError, match="not one of"):
        chat.with_structured_output(Weather, method="xml")


def test_a_refusal_is_an_error_for_structured_output() -> None:
    guard = tiny_guardrail("llava", max_new_tokens=40)  # steers every request: calls withheld
    call = '<tool_call>{"name": "Weather", "arguments": {"city": "Oslo", "celsius": 1}}</tool_call>'
    chat = forced_chat(guard, call)
    with pytest.raises(GuardrailRefusedError, match="refused") as caught:
        chat.with_structured_output(Weather).invoke("x")
    assert caught.value.message.response_metadata["guardrail"]["tool_calls_withheld"] == 1
    raw = chat.with_structured_output(Weather, include_raw=True).invoke("x")
    assert raw["parsed"] is None and isinstance(raw["parsing_error"], GuardrailRefusedError)


# ----------------------------------------------------------------------------- batches


class Counter:
    """Records, per call of one guardrail method, how many conversations it generated
    for (the real method still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, guard: Guardrail, name: str) -> None:
        self.calls: list[int] = []
        real = getattr(guard, name)

        def spy(messages: Any, **kwargs: Any) -> Any:
            self.calls.append(1 if is_single_conversation(messages) else len(messages))
            return real(messages, **kwargs)

        async def aspy(messages: Any, **kwargs: Any) -> Any:
            self.calls.append(1 if is_single_conversation(messages) else len(messages))
            return await real(messages, **kwargs)

        monkeypatch.setattr(guard, name, aspy if name == "agenerate" else spy)


PROMPTS = ["Hello", "What is in this picture?", "Tell me a story about a cat"]


class RunRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.runs: list[Any] = []

    def on_chat_model_start(
        self, serialized: Any, messages: Any, *, run_id: Any, **kw: Any
    ) -> None:
        self.runs.append(run_id)


def test_batch_is_one_batched_generate(monkeypatch: pytest.MonkeyPatch) -> None:
    guard = calm_guard()
    chat = ChatMarsGuardrail(guardrail=guard, max_tokens=6)
    one_by_one = [chat.invoke(p).content for p in PROMPTS]
    counter = Counter(monkeypatch, guard, "generate")
    recorders = [RunRecorder() for _ in PROMPTS]
    replies = chat.batch(PROMPTS, config=[{"callbacks": [r]} for r in recorders])
    assert counter.calls == [3]  # one call, three conversations
    assert [r.content for r in replies] == one_by_one
    assert [len(r.runs) for r in recorders] == [1, 1, 1]  # each input has its own run
    assert len({r.response_metadata["guardrail"]["request_id"] for r in replies}) == 3

    counter.calls.clear()
    chat.batch(PROMPTS, config={"max_concurrency": 2})
    assert counter.calls == [2, 1]


def test_abatch_is_one_batched_agenerate(monkeypatch: pytest.MonkeyPatch) -> None:
    guard = calm_guard()
    chat = ChatMarsGuardrail(guardrail=guard, max_tokens=6)
    one_by_one = [chat.invoke(p).content for p in PROMPTS]
    counter = Counter(monkeypatch, guard, "agenerate")
    replies = asyncio.run(chat.abatch(PROMPTS))
    assert counter.calls == [3]
    assert [r.content for r in replies] == one_by_one
    streaming = ChatMarsGuardrail(guardrail=guard, max_tokens=6, streaming=True)
    counter.calls.clear()
    streamed = asyncio.run(streaming.abatch(PROMPTS, config={"max_concurrency": 1}))
    assert counter.calls == [1, 1, 1]
    assert [r.content for r in streamed] == one_by_one


def test_batch_with_tools_and_a_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    guard = calm_guard()
    chat = forced_chat(guard, CALL).bind_tools([get_weather])
    counter = Counter(monkeypatch, guard, "generate")
    replies = chat.batch(["Weather in Paris?", "And in Rome?"])
    assert counter.calls == [2]
    assert [len(r.tool_calls) for r in replies] == [1, 1]

    counter.calls.clear()
    bad = [HumanMessage("h"), ToolMessage("orphan result", tool_call_id="1")]
    mixed = chat.batch(["Weather in Paris?", bad], return_exceptions=True)
    # The batched call fails on the bad input; each input then runs on its own.
    assert counter.calls == [2, 1, 1]
    assert len(mixed[0].tool_calls) == 1 and isinstance(mixed[1], InputError)
