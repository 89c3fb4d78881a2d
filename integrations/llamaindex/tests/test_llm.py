"""MarsGuardrailLLM on a tiny LLaVA guardrail: ImageBlocks, streaming, instrumentation events."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from llama_index.core.base.llms.types import (
    ChatMessage,
    ImageBlock,
    MessageRole,
    TextBlock,
)
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent
from llama_index.llms.mars_guardrail import (
    GuardrailInterventionEvent,
    GuardrailRefusalEvent,
    MarsGuardrailLLM,
    to_conversation,
)

from guardrail import Guardrail
from guardrail.errors import InputError
from guardrail.testing import cached_tiny_model as tiny
from guardrail.testing import png_bytes
from guardrail.testing import random_image as png_image
from guardrail.testing import tiny_policy as make_policy

QUESTION = "What is in this picture?"


def image_message(block: ImageBlock | None = None) -> ChatMessage:
    block = block or ImageBlock(image=png_bytes(), image_mimetype="image/png")
    return ChatMessage(role=MessageRole.USER, blocks=[block, TextBlock(text=QUESTION)])


def reference(guard: Guardrail, **kwargs: Any) -> Any:
    """The guardrail's own answer to the same conversation."""
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": png_image()},
                {"type": "text", "text": QUESTION},
            ],
        }
    ]
    return guard.generate(conversation, **kwargs)


def test_chat_with_an_image_block(guard: Guardrail) -> None:
    llm = MarsGuardrailLLM(guardrail=guard)
    response = llm.chat([image_message()])
    expected = reference(guard)
    assert response.message.role == MessageRole.ASSISTANT
    assert response.message.content == expected.text and expected.text
    decision = response.additional_kwargs["guardrail"]
    assert decision["modalities"] == ["image"]
    assert decision["intervened"] is True and decision["refused"] is False
    assert (decision["policy_name"], decision["policy_version"]) == ("li-test", "1.2.3")
    assert decision["score"] == pytest.approx(expected.score)
    assert response.raw["usage"] == {
        "prompt_tokens": expected.usage.input_tokens,
        "completion_tokens": expected.usage.output_tokens,
        "total_tokens": expected.usage.total_tokens,
    }


@pytest.mark.parametrize("source", ["path", "file-url", "data-url", "base64"])
def test_image_block_sources(guard: Guardrail, tmp_path, source: str) -> None:
    path = tmp_path / "picture.png"
    path.write_bytes(png_bytes())
    b64 = base64.b64encode(png_bytes()).decode("ascii")
    block = {
        "path": lambda: ImageBlock(path=path),
        "file-url": lambda: ImageBlock(url=path.as_uri()),
        "data-url": lambda: ImageBlock(url=f"data:image/png;base64,{b64}"),
        "base64": lambda: ImageBlock(image=b64.encode("ascii"), image_mimetype="image/png"),
    }[source]()
    response = MarsGuardrailLLM(guardrail=guard).chat([image_message(block)])
    assert response.message.content == reference(guard).text


def test_remote_images_and_unknown_roles_are_rejected(guard: Guardrail) -> None:
    llm = MarsGuardrailLLM(guardrail=guard)
    with pytest.raises(InputError, match="not fetched"):
        llm.chat([image_message(ImageBlock(url="https://example.com/cat.png"))])
    with pytest.raises(InputError, match="role 'function'"):
        to_conversation([ChatMessage(role=MessageRole.FUNCTION, content="42")])


def test_stream_chat_and_async_twins_match_chat(guard: Guardrail) -> None:
    llm = MarsGuardrailLLM(guardrail=guard)
    expected = reference(guard).text
    responses = list(llm.stream_chat([image_message()]))
    deltas = [r.delta for r in responses]
    assert len([d for d in deltas if d]) > 1
    assert "".join(deltas) == expected == responses[-1].message.content
    assert responses[-1].additional_kwargs["guardrail"]["modalities"] == ["image"]

    async def run() -> tuple[str, str]:
        chat = await llm.achat([image_message()])
        stream = await llm.astream_chat([image_message()])
        last = ""
        async for response in stream:
            last = response.message.content
        return chat.message.content, last

    assert asyncio.run(run()) == (expected, expected)


def test_completion_api(guard: Guardrail) -> None:
    llm = MarsGuardrailLLM(guardrail=guard, max_tokens=5)
    expected = guard.generate("Hello there", max_new_tokens=5)
    completion = llm.complete("Hello there")
    assert completion.text == expected.text
    assert completion.raw["usage"]["completion_tokens"] == 5
    assert "".join(r.delta or "" for r in llm.stream_complete("Hello there")) == expected.text

    async def run() -> tuple[str, str]:
        text = (await llm.acomplete("Hello there")).text
        last = ""
        async for response in await llm.astream_complete("Hello there"):
            last = response.text
        return text, last

    assert asyncio.run(run()) == (expected.text, expected.text)


def test_metadata_and_parameters(guard: Guardrail) -> None:
    llm = MarsGuardrailLLM(guardrail=guard, max_tokens=3, mode="off", system_prompt="Be brief.")
    meta = llm.metadata
    assert meta.is_chat_model and meta.model_name == "llava" and meta.num_output == 3
    assert meta.context_window > 0
    response = llm.chat([ChatMessage(role=MessageRole.USER, content="Hi")])
    assert response.raw["usage"]["completion_tokens"] == 3
    assert response.additional_kwargs["guardrail"]["mode"] == "off"
    expected = guard.generate(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        mode="off",
        max_new_tokens=3,
    )
    assert response.message.content == expected.text


def test_event_handler_receives_refusal_events(refusing_guard: Guardrail, recorder: Any) -> None:
    llm = MarsGuardrailLLM(guardrail=refusing_guard)
    response = llm.chat([image_message()])
    request_id = response.additional_kwargs["guardrail"]["request_id"]
    ours = [
        e
        for e in recorder.events
        if isinstance(e, (GuardrailInterventionEvent, GuardrailRefusalEvent))
    ]
    assert [type(e) for e in ours] == [GuardrailInterventionEvent, GuardrailRefusalEvent]
    refusal = ours[1].event
    assert refusal.request_id == request_id
    assert refusal.refused is True and refusal.blocked is False and refusal.modalities == ["image"]
    assert ours[1].class_name() == "GuardrailRefusalEvent"
    assert ours[1].model_dump()["class_name"] == "GuardrailRefusalEvent"
    # Raised inside the chat call's span, before its end event.
    end = next(e for e in recorder.events if isinstance(e, LLMChatEndEvent))
    assert ours[1].span_id == end.span_id is not None
    assert recorder.events.index(ours[1]) < recorder.events.index(end)


def test_streaming_and_async_calls_dispatch_events(
    refusing_guard: Guardrail, recorder: Any
) -> None:
    llm = MarsGuardrailLLM(guardrail=refusing_guard)
    list(llm.stream_chat([image_message()]))

    async def run() -> None:
        await llm.achat([image_message()])
        async for _ in await llm.astream_chat([image_message()]):
            pass

    asyncio.run(run())
    refusals = [e for e in recorder.events if isinstance(e, GuardrailRefusalEvent)]
    assert len(refusals) == 3
    assert len({e.event.request_id for e in refusals}) == 3

    quiet = MarsGuardrailLLM(guardrail=refusing_guard, dispatch_events=False)
    before = len(recorder.events)
    quiet.chat([image_message()])
    assert not any(isinstance(e, GuardrailRefusalEvent) for e in recorder.events[before:])


def test_fail_closed_block_is_a_refusal_event(recorder: Any) -> None:
    model, processor = tiny("llava")
    textonly = make_policy(model, processor, modalities=(), tau=-10.0)  # no image offset
    llm = MarsGuardrailLLM(guardrail=Guardrail(model, processor, textonly, max_new_tokens=4))
    response = llm.chat([image_message()])
    assert response.message.content == llm.guardrail.refusal_message
    assert response.raw["finish_reason"] == "guardrail_error"
    (refusal,) = [e for e in recorder.events if isinstance(e, GuardrailRefusalEvent)]
    assert refusal.event.blocked is True
    assert refusal.event.error == response.additional_kwargs["guardrail"]["error"]
    assert not any(isinstance(e, GuardrailInterventionEvent) for e in recorder.events)


def test_the_rollout_arm_and_version_reach_the_response(tmp_path) -> None:
    from guardrail.testing import tiny_guardrail, with_canary

    guard = with_canary(tiny_guardrail("llava", name="li-test", version="1.2.3"), tmp_path, "1.3.0")
    llm = MarsGuardrailLLM(guardrail=guard)
    response = llm.chat([ChatMessage(role=MessageRole.USER, content="Hi")], key="user-1")
    decision = response.additional_kwargs["guardrail"]
    assert (decision["rollout_arm"], decision["policy_version"]) == ("canary", "1.3.0")
