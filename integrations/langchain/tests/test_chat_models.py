"""ChatMarsGuardrail on a tiny LLaVA guardrail: chains with images, streaming, events."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import (
    AIMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_mars_guardrail import ChatMarsGuardrail, to_conversation

from guardrail import Guardrail
from guardrail.errors import InputError
from guardrail.testing import cached_tiny_model as tiny
from guardrail.testing import png_bytes
from guardrail.testing import random_image as png_image
from guardrail.testing import tiny_policy as make_policy

SYSTEM = "You describe pictures."
QUESTION = "What is in this picture?"


def prompt_template() -> ChatPromptTemplate:
    return ChatPromptTemplate.from_messages(
        [
            ("system", SYSTEM),
            (
                "human",
                [
                    {"type": "text", "text": "{question}"},
                    {
                        "type": "image",
                        "source_type": "base64",
                        "mime_type": "image/png",
                        "data": "{image_data}",
                    },
                ],
            ),
        ]
    )


def expected(guard: Guardrail, **kwargs: Any) -> Any:
    """What the guardrail itself answers for the chain's conversation."""
    conversation = [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": QUESTION},
                {"type": "image", "image": png_image()},
            ],
        },
    ]
    return guard.generate(conversation, **kwargs)


def test_chain_with_image_sync(guard: Guardrail, image_b64: str) -> None:
    chain = prompt_template() | ChatMarsGuardrail(guardrail=guard) | StrOutputParser()
    text = chain.invoke({"question": QUESTION, "image_data": image_b64})
    reference = expected(guard)
    assert reference.modalities == ["image"] and reference.intervened
    assert text == reference.text and text


def test_chain_with_image_async(guard: Guardrail, image_b64: str) -> None:
    chain = prompt_template() | ChatMarsGuardrail(guardrail=guard) | StrOutputParser()
    text = asyncio.run(chain.ainvoke({"question": QUESTION, "image_data": image_b64}))
    assert text == expected(guard).text


def test_chain_with_image_streaming(guard: Guardrail, image_b64: str) -> None:
    chain = prompt_template() | ChatMarsGuardrail(guardrail=guard) | StrOutputParser()
    inputs = {"question": QUESTION, "image_data": image_b64}
    chunks = list(chain.stream(inputs))
    assert len([c for c in chunks if c]) > 1  # really streamed, token by token
    assert "".join(chunks) == expected(guard).text

    async def collect() -> list[str]:
        return [chunk async for chunk in chain.astream(inputs)]

    assert "".join(asyncio.run(collect())) == expected(guard).text


def test_response_carries_usage_and_the_guardrail_decision(
    guard: Guardrail, image_b64: str
) -> None:
    chat = ChatMarsGuardrail(guardrail=guard)
    message = (prompt_template() | chat).invoke({"question": QUESTION, "image_data": image_b64})
    reference = expected(guard)
    assert message.usage_metadata == {
        "input_tokens": reference.usage.input_tokens,
        "output_tokens": reference.usage.output_tokens,
        "total_tokens": reference.usage.total_tokens,
    }
    meta = message.response_metadata
    assert meta["model_name"] == "llava" and meta["finish_reason"] == reference.finish_reason
    decision = meta["guardrail"]
    assert decision["score"] == pytest.approx(reference.score)
    assert decision["strength"] == pytest.approx(reference.strength)
    assert decision["intervened"] is True and decision["refused"] is False
    assert (decision["policy_name"], decision["policy_version"]) == ("lc-test", "1.2.3")
    assert decision["mode"] == "enforce" and decision["modalities"] == ["image"]

    chunks = list(chat.stream([HumanMessage(content=QUESTION)]))
    last = chunks[-1]
    assert last.chunk_position == "last"
    assert last.response_metadata["guardrail"]["modalities"] == []
    assert sum(c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata) == 8


@pytest.mark.parametrize(
    "block",
    [
        lambda b64, path: {
            "type": "image",
            "source_type": "base64",
            "data": b64,
            "mime_type": "image/png",
        },
        lambda b64, path: {"type": "image", "base64": b64, "mime_type": "image/png"},
        lambda b64, path: {
            "type": "image_url",
            "image_url": {"url": f"data:image/png;base64,{b64}"},
        },
        lambda b64, path: {"type": "image_url", "image_url": f"data:image/png;base64,{b64}"},
        lambda b64, path: {"type": "image", "path": str(path)},
        lambda b64, path: {"type": "image", "url": path.as_uri()},
        lambda b64, path: {"type": "image", "source_type": "url", "url": str(path)},
        lambda b64, path: {"type": "image_url", "image_url": {"url": path.as_uri()}},
    ],
    ids=[
        "v0-base64",
        "v1-base64",
        "image_url",
        "image_url-str",
        "path",
        "file-url",
        "v0-url-path",
        "image_url-file",
    ],
)
def test_image_block_formats_reach_the_model(
    guard: Guardrail, image_b64: str, tmp_path, block
) -> None:
    path = tmp_path / "picture.png"
    path.write_bytes(png_bytes())
    message = HumanMessage(content=[{"type": "text", "text": QUESTION}, block(image_b64, path)])
    reply = ChatMarsGuardrail(guardrail=guard).invoke([SystemMessage(SYSTEM), message])
    assert reply.content == expected(guard).text
    assert reply.response_metadata["guardrail"]["modalities"] == ["image"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
            "not fetched",
        ),
        ([{"type": "image", "url": "http://example.com/cat.png"}], "not fetched"),
        (
            [{"type": "image", "base64": "@@not base64@@", "mime_type": "image/png"}],
            "valid base64",
        ),
        (
            [{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}],
            "is not a base64 image",
        ),
        ([{"type": "image", "source_type": "id", "id": "file-123"}], "file ids"),
        ([{"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}], "type 'audio'"),
    ],
)
def test_unsupported_content_is_rejected_with_the_fix(
    guard: Guardrail, content: list, match: str
) -> None:
    with pytest.raises(InputError, match=match):
        ChatMarsGuardrail(guardrail=guard).invoke([HumanMessage(content=content)])


def test_message_roles_map_to_the_chat_format() -> None:
    conversation = to_conversation(
        [
            SystemMessage("s"),
            HumanMessage("h", name="someone"),
            AIMessage(
                content=[
                    {"type": "reasoning", "reasoning": "hidden"},
                    {"type": "text", "text": "a"},
                ]
            ),
            HumanMessage(content=["plain", {"type": "text", "text": "block"}]),
        ]
    )
    assert conversation == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "h"},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "plain"}, {"type": "text", "text": "block"}],
        },
    ]
    with pytest.raises(InputError, match="FunctionMessage"):
        to_conversation([HumanMessage("h"), FunctionMessage("result", name="f")])


def test_stop_sequences_cut_the_answer(guard: Guardrail) -> None:
    chat = ChatMarsGuardrail(guardrail=guard)
    full = chat.invoke(QUESTION).content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and full.find(stop) > 0
    cut = full[: full.find(stop)]
    reply = chat.invoke(QUESTION, stop=[stop])
    assert reply.content == cut
    assert reply.response_metadata["finish_reason"] == "stop"
    assert "".join(c.content for c in chat.stream(QUESTION, stop=[stop])) == cut
    assert ChatMarsGuardrail(guardrail=guard, stop=[stop]).invoke(QUESTION).content == cut


def test_generation_parameters_are_passed_through(guard: Guardrail) -> None:
    chat = ChatMarsGuardrail(guardrail=guard, max_tokens=3, mode="off")
    reply = chat.invoke(QUESTION)
    assert reply.usage_metadata["output_tokens"] == 3
    assert reply.response_metadata["guardrail"]["mode"] == "off"
    assert reply.response_metadata["guardrail"]["intervened"] is False
    assert chat.invoke(QUESTION, max_tokens=2).usage_metadata["output_tokens"] == 2
    params = chat._get_ls_params(stop=["x"])
    assert params == {
        "ls_provider": "mars_guardrail",
        "ls_model_name": "llava",
        "ls_model_type": "chat",
        "ls_max_tokens": 3,
        "ls_stop": ["x"],
    }


class EventRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any], UUID]] = []

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.events.append((name, data, run_id))


def test_refusal_and_intervention_events_reach_callbacks(refusing_guard: Guardrail) -> None:
    chat = ChatMarsGuardrail(guardrail=refusing_guard)
    recorder = EventRecorder()
    reply = chat.invoke(QUESTION, config={"callbacks": [recorder]})
    assert reply.response_metadata["guardrail"]["refused"] is True
    assert [name for name, _, _ in recorder.events] == [
        "guardrail.intervention",
        "guardrail.refusal",
    ]
    request_id = reply.response_metadata["guardrail"]["request_id"]
    assert all(data["request_id"] == request_id for _, data, _ in recorder.events)
    assert recorder.events[1][1]["policy_version"] == "1.2.3"

    streamed = EventRecorder()
    list(chat.stream(QUESTION, config={"callbacks": [streamed]}))
    assert [name for name, _, _ in streamed.events] == [
        "guardrail.intervention",
        "guardrail.refusal",
    ]

    silent = EventRecorder()
    ChatMarsGuardrail(guardrail=refusing_guard, dispatch_events=False).invoke(
        QUESTION, config={"callbacks": [silent]}
    )
    assert silent.events == []


@pytest.mark.parametrize("chained", [False, True], ids=["model", "chain"])
@pytest.mark.parametrize("streaming", [None, False, True], ids=["default", "no-stream", "stream"])
def test_events_visible_in_astream_events_v2(
    refusing_guard: Guardrail, image_b64: str, streaming: bool | None, chained: bool
) -> None:
    settings = {} if streaming is None else {"streaming": streaming}
    chat = ChatMarsGuardrail(guardrail=refusing_guard, **settings)
    inputs = {"question": QUESTION, "image_data": image_b64}
    runnable: Any = prompt_template() | chat if chained else chat
    if not chained:
        inputs = prompt_template().invoke(inputs)

    async def collect() -> list[dict[str, Any]]:
        return [event async for event in runnable.astream_events(inputs, version="v2")]

    events = asyncio.run(collect())
    custom = [e for e in events if e["event"] == "on_custom_event"]
    assert [e["name"] for e in custom] == ["guardrail.intervention", "guardrail.refusal"]
    model_run = next(e for e in events if e["event"] == "on_chat_model_end")
    assert {e["run_id"] for e in custom} == {model_run["run_id"]}  # the chat model's own run
    refusal = custom[1]["data"]
    assert refusal["refused"] is True and refusal["modalities"] == ["image"]
    output = model_run["data"]["output"]
    assert refusal["request_id"] == output.response_metadata["guardrail"]["request_id"]


def test_events_reach_callbacks_when_invoke_streams(refusing_guard: Guardrail) -> None:
    recorder = EventRecorder()
    chat = ChatMarsGuardrail(guardrail=refusing_guard, streaming=True)
    reply = chat.invoke(QUESTION, config={"callbacks": [recorder]})
    assert [name for name, _, _ in recorder.events] == [
        "guardrail.intervention",
        "guardrail.refusal",
    ]
    assert recorder.events[0][1]["request_id"] == reply.response_metadata["guardrail"]["request_id"]
    replies = asyncio.run(chat.abatch([QUESTION, QUESTION], config={"callbacks": [recorder]}))
    assert len(recorder.events) == 6
    ids = {reply.response_metadata["guardrail"]["request_id"] for reply in replies}
    assert {data["request_id"] for _, data, _ in recorder.events[2:]} == ids


def test_fail_closed_block_is_reported(image_b64: str) -> None:
    model, processor = tiny("llava")
    textonly = make_policy(model, processor, modalities=(), tau=-10.0)  # no image offset
    guard = Guardrail(model, processor, textonly, max_new_tokens=4)
    recorder = EventRecorder()
    content = [
        {"type": "text", "text": QUESTION},
        {"type": "image", "base64": image_b64, "mime_type": "image/png"},
    ]
    reply = ChatMarsGuardrail(guardrail=guard).invoke(
        [HumanMessage(content=content)], config={"callbacks": [recorder]}
    )
    assert reply.content == guard.refusal_message
    assert reply.response_metadata["finish_reason"] == "guardrail_error"
    assert reply.response_metadata["guardrail"]["error"]
    ((name, data, _),) = recorder.events
    assert name == "guardrail.refusal" and data["blocked"] is True


def test_the_rollout_arm_and_version_reach_the_response(tmp_path) -> None:
    from guardrail.testing import tiny_guardrail, with_canary

    guard = with_canary(tiny_guardrail("llava", name="lc-test", version="1.2.3"), tmp_path, "1.3.0")
    chat = ChatMarsGuardrail(guardrail=guard)
    decision = chat.invoke("Hi", key="user-1").response_metadata["guardrail"]
    assert (decision["rollout_arm"], decision["policy_version"]) == ("canary", "1.3.0")
