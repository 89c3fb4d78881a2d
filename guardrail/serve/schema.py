"""The OpenAI Chat Completions wire format: requests in, guardrail messages out, and back.

A request's ``messages`` use OpenAI's content parts; :func:`to_conversation` turns
them into the guardrail's chat format (:mod:`guardrail.messages`):

* ``{"type": "text", "text": ...}`` (or a plain string) stays text;
* ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` becomes
  an image; ``http(s)://`` URLs only when the server was started with remote images
  on (``--allow-remote-images``), fetched with a size cap and a timeout;
* the extension ``{"type": "video_frames", "video_frames": [url, ...]}`` becomes a
  video, one ``data:`` (or, when enabled, http(s)) image URL per frame, in order.

Roles ``system``, ``developer`` (read as ``system``), ``user`` and ``assistant`` are
accepted; tool and function messages, audio and file parts are refused with a 400
that names the part. Local paths are never accepted from the network.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from guardrail.errors import InputError
from guardrail.result import GuardrailResult

__all__ = [
    "ChatCompletionRequest",
    "GenerationSettings",
    "completion_body",
    "chunk_body",
    "finish_reason",
    "to_conversation",
]

VIDEO_PART = "video_frames"
"""The content part type of the video extension."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of ``POST /v1/chat/completions`` this server reads.

    Fields OpenAI defines but this server cannot honour are refused when set to a
    non-default value (:meth:`unsupported`), never silently ignored.
    """

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=256)
    seed: int | None = None
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def unsupported(self) -> str | None:
        """Why this request asks for something the server does not do, or None."""
        if self.n not in (None, 1):
            return "n > 1 is not supported; send one request per choice"
        if self.tools or self.functions:
            return "tools and functions are not supported by this server; leave them out"
        if self.logprobs:
            return "logprobs are not supported; leave logprobs out"
        if self.stop:
            return "stop sequences are not supported; leave stop out"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "only response_format {'type': 'text'} is supported"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty are not supported; leave them at 0"
        if self.seed is not None and (self.temperature or 0.0) > 0:
            return (
                "seed is not supported with temperature > 0 (rows of one batch share the "
                "sampler); use temperature 0 for reproducible answers or leave seed out"
            )
        return None


@dataclass(frozen=True)
class GenerationSettings:
    """The generation settings of a request: requests with equal settings may share a
    batch, requests with different ones never do."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float | None = None

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def generate_kwargs(self) -> dict[str, Any]:
        """``model.generate`` arguments: greedy unless a temperature above 0 was asked for."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if self.sampling:
            kwargs.update(do_sample=True, temperature=self.temperature)
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        else:
            kwargs["do_sample"] = False
        return kwargs


ImageFetcher = Callable[[str, str], bytes]
"""``(url, where) -> bytes``: fetches an http(s) image for a part (remote images on)."""


def to_conversation(
    messages: list[dict[str, Any]], *, fetch: ImageFetcher | None = None
) -> list[dict[str, Any]]:
    """OpenAI messages as a guardrail conversation. Raises :class:`InputError` naming the
    message and part (never repeating caller values) and the fix."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role in ("tool", "function"):
            raise InputError(f"messages[{i}]: {role} messages are not supported by this server")
        if role not in ("system", "user", "assistant"):
            raise InputError(
                f"messages[{i}] has an unknown role; use system, developer, user or assistant"
            )
        content = message.get("content")
        if content is None:
            raise InputError(
                f"messages[{i}] has no content (tool calls are not supported); give text"
            )
        out.append({"role": role, "content": _parts(content, i, fetch)})
    return out


def _parts(content: Any, index: int, fetch: ImageFetcher | None) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InputError(f"messages[{index}].content must be a string or a list of parts")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"messages[{index}].content[{j}]"
        if not isinstance(part, Mapping):
            raise InputError(f"{where} must be an object with a 'type'")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise InputError(f"{where}: a text part needs a string 'text'")
            parts.append({"type": "text", "text": text})
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, Mapping) else spec
            parts.append({"type": "image", "image": _image_source(url, where, fetch)})
        elif kind == VIDEO_PART:
            frames = part.get(VIDEO_PART)
            if isinstance(frames, Mapping):
                frames = frames.get("frames")
            if not isinstance(frames, list) or not frames:
                raise InputError(
                    f"{where}: a {VIDEO_PART} part needs a non-empty list of frame image URLs "
                    f"under '{VIDEO_PART}'"
                )
            video = [_image_source(f, f"{where} frame {k}", fetch) for k, f in enumerate(frames)]
            parts.append({"type": "video", "video": video})
        elif kind in ("input_audio", "file", "refusal"):
            raise InputError(f"{where}: {kind} parts are not supported by this server")
        else:
            raise InputError(f"{where} has an unknown type; use text, image_url or {VIDEO_PART}")
    return parts


def _image_source(url: Any, where: str, fetch: ImageFetcher | None) -> str | bytes:
    if not isinstance(url, str) or not url:
        raise InputError(f"{where}: image_url needs a 'url' string")
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        return url
    if scheme in ("http", "https"):
        if fetch is None:
            raise InputError(
                f"{where}: remote image URLs are off on this server; send the image inline as "
                "a data:image/...;base64 URI (or start the server with --allow-remote-images)"
            )
        return fetch(url, where)
    raise InputError(f"{where}: image URLs must be data:image/...;base64 URIs")


def finish_reason(result: GuardrailResult) -> str:
    """OpenAI's finish reason: a fail-closed block is ``content_filter``."""
    if result.finish_reason == "guardrail_error":
        return "content_filter"
    return "length" if result.finish_reason == "length" else "stop"


def usage_body(result: GuardrailResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.usage.input_tokens,
        "completion_tokens": result.usage.output_tokens,
        "total_tokens": result.usage.total_tokens,
    }


def completion_body(result: GuardrailResult, model: str) -> dict[str, Any]:
    """A ``chat.completion`` object with the decision under ``guardrail``."""
    return {
        "id": f"chatcmpl-{result.request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(result),
            }
        ],
        "usage": usage_body(result),
        "guardrail": result.decision(),
    }


def chunk_body(
    request_id: str,
    model: str,
    created: int,
    *,
    delta: dict[str, Any] | None = None,
    result: GuardrailResult | None = None,
    usage_only: bool = False,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``: a delta, the final chunk (finish reason and the
    decision under ``guardrail``) or, with ``include_usage``, the usage chunk."""
    body: dict[str, Any] = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
    }
    if usage_only:
        if result is None:
            raise ValueError("the usage chunk needs the result")
        body["usage"] = usage_body(result)
        return body
    choice: dict[str, Any] = {
        "index": 0,
        "delta": delta or {},
        "logprobs": None,
        "finish_reason": None,
    }
    if result is not None:
        choice["finish_reason"] = finish_reason(result)
        body["guardrail"] = result.decision()
    body["choices"] = [choice]
    return body
