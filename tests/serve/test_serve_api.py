"""The OpenAI-compatible API against a live server: the openai client, LangChain
ChatOpenAI and LlamaIndex OpenAILike, streaming, images, video frames and errors."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from guardrail.testing import png_bytes

from .conftest import MODEL, Live, data_uri, user

openai = pytest.importorskip("openai")

IMAGE_PROMPT = [
    {"type": "text", "text": "What is in the picture?"},
    {"type": "image_url", "image_url": {"url": data_uri(3)}},
]


def direct(live: Live, messages: Any, max_tokens: int = 6) -> Any:
    """The same request straight through the guardrail (no server)."""
    from guardrail.serve.schema import to_conversation

    return live.engine.guardrail.generate(to_conversation(messages), max_new_tokens=max_tokens)


def test_openai_client_gets_the_guarded_answer_usage_and_decision(llava_server: Live) -> None:
    client = llava_server.openai()
    response = client.chat.completions.create(
        model=MODEL, messages=user("Tell me a story"), max_tokens=6
    )
    expected = direct(llava_server, user("Tell me a story"))
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason == "length"
    assert response.usage.prompt_tokens == expected.usage.input_tokens
    assert response.usage.completion_tokens == 6
    assert response.usage.total_tokens == expected.usage.total_tokens
    decision = response.model_extra["guardrail"]
    assert decision["policy_name"] == "tiny" and decision["policy_version"] == "1.0.0"
    assert decision["intervened"] is True and decision["mode"] == "enforce"
    assert decision["score"] == pytest.approx(expected.score, rel=1e-4, abs=1e-5)
    assert response.id == f"chatcmpl-{decision['request_id']}"
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_stream_chunks_add_up_to_the_answer_and_end_with_the_decision(llava_server: Live) -> None:
    client = llava_server.openai()
    stream = client.chat.completions.create(
        model=MODEL,
        messages=user(IMAGE_PROMPT),
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    expected = direct(llava_server, user(IMAGE_PROMPT))
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == expected.text
    assert len([c for c in with_choices if c.choices[0].delta.content]) >= 2  # streamed
    final = with_choices[-1]
    assert final.choices[0].finish_reason == "length"
    assert final.model_extra["guardrail"]["modalities"] == ["image"]
    assert final.model_extra["guardrail"]["intervened"] is True
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 6
    assert len({c.id for c in chunks}) == 1


def test_the_raw_stream_is_openai_sse_ending_in_done(llava_server: Live) -> None:
    body = {"model": MODEL, "messages": user("Hi"), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", llava_server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    objects = [json.loads(d) for d in data[:-1]]
    assert {o["object"] for o in objects} == {"chat.completion.chunk"}
    assert "guardrail" in objects[-1]


def test_images_and_video_frames_reach_the_model(llava_server: Live) -> None:
    client = llava_server.openai()
    video = [
        {"type": "text", "text": "What happens in the video?"},
        {"type": "video_frames", "video_frames": [data_uri(s, 24) for s in (4, 5, 6)]},
    ]
    for content, modalities in ((IMAGE_PROMPT, ["image"]), (video, ["video"])):
        response = client.chat.completions.create(model=MODEL, messages=user(content), max_tokens=4)
        expected = direct(llava_server, user(content), 4)
        assert response.choices[0].message.content == expected.text
        assert response.model_extra["guardrail"]["modalities"] == modalities
        # The media are in the prompt: more prompt tokens than the text alone.
        assert response.usage.prompt_tokens == expected.usage.input_tokens


def test_langchain_chat_openai_invokes_and_streams(llava_server: Live) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage

    chat = langchain_openai.ChatOpenAI(
        model=MODEL,
        base_url=llava_server.url + "/v1",
        api_key="unused",
        max_tokens=5,
        temperature=0,
        max_retries=0,
    )
    expected = direct(llava_server, user("Write a haiku"), 5)
    message = chat.invoke("Write a haiku")
    assert message.content == expected.text
    assert message.usage_metadata["output_tokens"] == 5
    streamed = list(chat.stream("Write a haiku"))
    assert "".join(str(c.content) for c in streamed) == expected.text
    assert len(streamed) >= 3
    with_image = chat.invoke([HumanMessage(content=IMAGE_PROMPT)])
    assert with_image.content == direct(llava_server, user(IMAGE_PROMPT), 5).text


def test_llamaindex_openai_like_chats_and_streams(llava_server: Live) -> None:
    openai_like = pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock

    llm = openai_like.OpenAILike(
        model=MODEL,
        api_base=llava_server.url + "/v1",
        api_key="unused",
        is_chat_model=True,
        max_tokens=5,
        temperature=0.0,
        context_window=4096,
        max_retries=0,
    )
    expected = direct(llava_server, user("Name three rivers"), 5)
    response = llm.chat([ChatMessage(role="user", content="Name three rivers")])
    assert response.message.content == expected.text
    streamed = list(llm.stream_chat([ChatMessage(role="user", content="Name three rivers")]))
    assert streamed[-1].message.content == expected.text
    assert len(streamed) >= 3
    image = ChatMessage(
        role="user",
        blocks=[TextBlock(text="What is in the picture?"), ImageBlock(image=png_bytes(3))],
    )
    answer = llm.chat([image])
    assert answer.message.content == direct(llava_server, user(IMAGE_PROMPT), 5).text


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ([{"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}}], "remote"),
        ([{"type": "image_url", "image_url": {"url": "/etc/passwd"}}], "data:image"),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], "base64"),
        ([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], "input_audio"),
        ([{"type": "hologram"}], "unknown type"),
        ([{"type": "video_frames", "video_frames": []}], "non-empty list"),
        ([{"type": "text", "text": 5}], "string 'text'"),
    ],
)
def test_bad_content_parts_are_400_naming_the_part(
    llava_server: Live, content: Any, needle: str
) -> None:
    response = llava_server.post({"model": MODEL, "messages": user(content), "max_tokens": 2})
    error = error_of(response, 400)
    assert error["type"] == "invalid_request_error"
    assert needle in error["message"]
    assert "content[0]" in error["message"] or "part 0" in error["message"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"messages": user("hi"), "model": "gpt-4o"}, 404, "serves the model 'tiny'"),
        ({"messages": user("hi"), "n": 2}, 400, "n > 1"),
        ({"messages": user("hi"), "max_tokens": 100_000}, 400, "over this server's limit"),
        ({"messages": user("hi"), "tools": [{"type": "function"}]}, 400, "tools"),
        ({"messages": user("hi"), "temperature": 0.7, "seed": 1}, 400, "seed"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "tool messages"),
        (
            {"messages": [*user("hi"), {"role": "assistant", "content": "x"}]},
            400,
            "end the conversation",
        ),
        ({"messages": []}, 400, "messages"),
        ({"messages": user("hi"), "max_tokens": 0}, 400, "max_tokens"),
    ],
)
def test_bad_requests_get_openai_errors(
    llava_server: Live, body: dict[str, Any], status: int, needle: str
) -> None:
    body = {"model": MODEL, **body}
    error = error_of(llava_server.post(body), status)
    assert needle in error["message"]


def test_openai_client_raises_its_own_error_types(llava_server: Live) -> None:
    client = llava_server.openai()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=user("hi"))
    with pytest.raises(openai.BadRequestError, match="remote image URLs are off"):
        client.chat.completions.create(
            model=MODEL,
            messages=user([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x"}}]),
        )


def test_media_for_a_text_only_model_is_a_400() -> None:
    from .conftest import live_server

    with live_server() as live:  # tiny llama: text only
        error = error_of(live.post({"model": MODEL, "messages": user(IMAGE_PROMPT)}), 400)
        assert "image" in error["message"]


def test_user_and_header_pick_the_rollout_arm(tmp_path: Any) -> None:
    from guardrail.testing import tiny_guardrail, with_canary

    from .conftest import live_server

    guard = with_canary(tiny_guardrail("llama"), tmp_path, "1.1.0", share=0.5)
    rollout = guard.rollout
    keys = [f"user-{i}" for i in range(12)]
    want = {k: rollout.resolve(k).arm for k in keys}
    assert set(want.values()) == {"stable", "canary"}
    with live_server(guard) as live:
        client = live.openai()
        for k in keys:
            r = client.chat.completions.create(
                model=MODEL, messages=user("hi"), max_tokens=1, user=k
            )
            decision = r.model_extra["guardrail"]
            assert decision["rollout_arm"] == want[k]
            assert decision["policy_version"] == ("1.1.0" if want[k] == "canary" else "1.0.0")
        # The header wins over the body's user (a gateway sets it).
        canary_key = next(k for k in keys if want[k] == "canary")
        stable_key = next(k for k in keys if want[k] == "stable")
        r = client.chat.completions.create(
            model=MODEL,
            messages=user("hi"),
            max_tokens=1,
            user=stable_key,
            extra_headers={"X-Guardrail-Key": canary_key},
        )
        assert r.model_extra["guardrail"]["rollout_arm"] == "canary"
