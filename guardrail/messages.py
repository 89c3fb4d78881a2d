"""Chat messages: parsing, validation and normalisation.

A conversation is a list of ``{"role": ..., "content": ...}`` dicts in the
transformers chat format (a single message dict, or a bare string for one user
message, is accepted too). ``content`` is a string or a list of parts:

* ``{"type": "text", "text": "..."}``
* ``{"type": "image", "image": PIL.Image | bytes | "data:image/...;base64,..." | path}``
  (``"path"`` is accepted as the key too)
* ``{"type": "video", "video": [frame, ...] | directory of frames | animated GIF}``,
  frames being PIL images, bytes, ``data:`` URIs or paths; the animated image may be
  given as a path, bytes or a ``data:`` URI.

Tool use (:mod:`guardrail.tools`): an assistant message may carry ``"tool_calls"``
(its ``content`` may then be empty or ``None``), and a ``{"role": "tool", "content":
..., "tool_call_id": ..., "name": ...}`` message, text only, gives a call's result
back; it follows the assistant message that made the call (or another tool message).

:func:`parse_conversation` checks everything a hostile or careless caller can get
wrong and raises :class:`~guardrail.errors.InputError` naming the problem and the
fix; what it returns is safe to hand to a processor: RGB images of bounded size.

Media budgets (:class:`InputLimits`) are checked from image headers *before* any
pixel is decoded: images and videos per conversation, frames per video, pixels
per image or frame, and pixels of all images and frames together. Error messages
never repeat caller-supplied values (roles, part types, paths): they name the
message and part by position, so they are safe to record in logs and spans, and a
path that cannot be used gets one message whether it is missing, unreadable or not
an image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from guardrail.errors import InputError
from guardrail.limits import InputLimits
from guardrail.media import (
    _Animated,
    _Budget,
    _Frames,
    _Image,
    _probe_image,
    _probe_video,
)
from guardrail.tools import normalize_tool_call

__all__ = [
    "MODALITIES",
    "ROLES",
    "Conversation",
    "InputLimits",
    "as_single_conversation",
    "conversation_text",
    "message_parts",
    "is_single_conversation",
    "parse_conversation",
]

ROLES = ("system", "user", "assistant", "tool")
MODALITIES = ("text", "image", "video")


@dataclass
class Conversation:
    """A validated conversation with its media pulled out in order of appearance."""

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    videos: list[list[Image.Image]] = field(default_factory=list)

    @property
    def modalities(self) -> frozenset[str]:
        """The non-text modalities present (``"image"``, ``"video"``)."""
        found = set()
        if self.images:
            found.add("image")
        if self.videos:
            found.add("video")
        return frozenset(found)

    def text(self) -> str:
        """All text parts joined, for content capture and detectors."""
        return conversation_text(self.messages)


def message_parts(messages: Any) -> list[tuple[str, list[dict[str, Any]]]]:
    """Each message of a raw, unvalidated conversation as ``(role, parts)``, text parts
    normalised to ``{"type": "text", "text": ...}`` and other parts kept as they are.

    Never raises: it reads what a caller passed (for events and spans) before or
    without :func:`parse_conversation`; anything unreadable is left out.
    """
    if isinstance(messages, str) or _is_message(messages):
        messages = [messages]
    out: list[tuple[str, list[dict[str, Any]]]] = []
    for message in messages if isinstance(messages, Sequence) else ():
        if isinstance(message, str):
            message = {"role": "user", "content": message}
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        items = [content] if isinstance(content, str) else content
        parts: list[dict[str, Any]] = []
        for item in items if isinstance(items, Sequence) else ():
            if isinstance(item, str):
                parts.append({"type": "text", "text": item})
            elif isinstance(item, Mapping) and item.get("type") == "text":
                parts.append({"type": "text", "text": str(item.get("text", ""))})
            elif isinstance(item, Mapping):
                parts.append(dict(item))
        out.append((str(message.get("role")), parts))
    return out


def conversation_text(messages: Any) -> str:
    """All text of a conversation (raw or parsed), joined by newlines."""
    return "\n".join(
        part["text"]
        for _, parts in message_parts(messages)
        for part in parts
        if part.get("type") == "text"
    )


def _is_message(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "role" in obj


def is_single_conversation(obj: Any) -> bool:
    """True for one conversation (a list of message dicts), a single message dict
    (a mapping with a ``"role"``) or a bare string."""
    if isinstance(obj, str) or _is_message(obj):
        return True
    return isinstance(obj, Sequence) and (len(obj) == 0 or isinstance(obj[0], Mapping))


def as_single_conversation(obj: Any) -> Any:
    """A single message dict wrapped in a list (a one-message conversation); anything
    else unchanged. For code that walks raw conversations (events, telemetry)."""
    return [obj] if _is_message(obj) else obj


# ----------------------------------------------------------------------------- parsing


def parse_conversation(messages: Any, *, limits: InputLimits | None = None) -> Conversation:
    """Validate ``messages`` and return a :class:`Conversation`.

    A bare string is accepted as a single user message, a single message dict (a
    mapping with a ``"role"``) as a one-message conversation. The whole conversation
    is validated, and every media budget checked from headers, before any image or
    frame is decoded.
    """
    limits = limits or InputLimits()
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    messages = as_single_conversation(messages)
    if not isinstance(messages, Sequence) or isinstance(messages, (bytes, bytearray)):
        raise InputError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
            f"{type(messages).__name__}; wrap a prompt as [{{'role': 'user', 'content': prompt}}]"
        )
    if not messages:
        raise InputError("messages is empty; pass at least one user message")
    if len(messages) > limits.max_messages:
        raise InputError(
            f"{len(messages)} messages exceed the limit of {limits.max_messages}; "
            "truncate the history or raise InputLimits.max_messages"
        )
    _check_media_counts(messages, limits)
    conv = Conversation(messages=[])
    budget = _Budget(limits)
    pending: list[_Image | _Frames | _Animated] = []
    total_chars = 0
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(
                f"message {i} is a {type(message).__name__}, expected a dict with 'role' and 'content'"
            )
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InputError(f"message {i} has an unknown role; use one of {ROLES}")
        extra = _tool_fields(message, role, i, conv.messages)
        content = message.get("content")
        if content is None and "tool_calls" in extra:
            content = ""
        elif "content" not in message:
            raise InputError(f"message {i} has no 'content'; add a string or a list of parts")
        parts = _parse_content(content, i, pending, budget)
        if role == "tool" and any(p["type"] != "text" for p in parts):
            raise InputError(f"message {i}: a tool result is text only; remove its media parts")
        total_chars += sum(len(p["text"]) for p in parts if p["type"] == "text")
        conv.messages.append({"role": role, "content": parts, **extra})
    if total_chars > limits.max_text_chars:
        raise InputError(
            f"the conversation has {total_chars} characters of text, over the limit of "
            f"{limits.max_text_chars}; shorten it or raise InputLimits.max_text_chars"
        )
    if not any(m["role"] == "user" for m in conv.messages):
        raise InputError("the conversation has no user message; add one with role 'user'")
    if conv.messages[-1]["role"] == "assistant":
        raise InputError(
            "the last message is from the assistant; the guardrail generates the next "
            "assistant turn, so end the conversation with a user message"
        )
    # Everything is validated and within budget: only now are pixels decoded.
    for media in pending:
        if isinstance(media, _Image):
            conv.images.append(media.decode())
        else:
            conv.videos.append(media.decode())
    return conv


def _tool_fields(
    message: Mapping[str, Any], role: str, index: int, before: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The tool-use fields of one message, validated: an assistant's ``tool_calls``, a
    tool result's ``tool_call_id`` and ``name``."""
    out: dict[str, Any] = {}
    calls = message.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise InputError(f"message {index}: only assistant messages carry 'tool_calls'")
        if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
            raise InputError(f"message {index}: 'tool_calls' must be a list of calls")
        if calls:
            out["tool_calls"] = [
                normalize_tool_call(c, f"message {index} tool call {j}")
                for j, c in enumerate(calls)
            ]
    if role == "tool":
        previous = before[-1] if before else None
        if previous is None or not (previous["role"] == "tool" or previous.get("tool_calls")):
            raise InputError(
                f"message {index} is a tool result with no call before it; put it right after "
                "the assistant message whose 'tool_calls' asked for it"
            )
        for key in ("tool_call_id", "name"):
            value = message.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or len(value) > 128:
                raise InputError(
                    f"message {index}: '{key}' must be a string of at most 128 characters"
                )
            out[key] = value
    return out


def _check_media_counts(messages: Sequence[Any], limits: InputLimits) -> None:
    """Count image and video parts before opening any of them."""
    counts = {"image": 0, "video": 0}
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str) or not isinstance(content, Sequence):
            continue
        for part in content:
            if isinstance(part, Mapping):
                kind = part.get("type")
                if isinstance(kind, str) and kind in counts:
                    counts[kind] += 1
    for kind, limit, name in (
        ("image", limits.max_images, "max_images"),
        ("video", limits.max_videos, "max_videos"),
    ):
        if counts[kind] > limit:
            raise InputError(
                f"the conversation has {counts[kind]} {kind} parts, over the limit of {limit} "
                f"{kind}s per conversation (InputLimits.{name}); send fewer or raise "
                f"InputLimits.{name}"
            )


def _parse_content(
    content: Any, index: int, pending: list[_Image | _Frames | _Animated], budget: _Budget
) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, Sequence) or isinstance(content, (bytes, bytearray)):
        raise InputError(
            f"message {index} content is a {type(content).__name__}; use a string or a "
            "list of {'type': 'text'|'image'|'video', ...} parts"
        )
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"message {index} part {j}"
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
            continue
        if not isinstance(part, Mapping):
            raise InputError(f"{where} is a {type(part).__name__}; use a dict with a 'type'")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise InputError(
                    f"{where}: text part needs a string 'text', got {type(text).__name__}"
                )
            parts.append({"type": "text", "text": text})
        elif kind == "image":
            source = part.get("image", part.get("path"))
            pending.append(_probe_image(source, where, budget))
            parts.append({"type": "image"})
        elif kind == "video":
            source = part.get("video", part.get("path"))
            pending.append(_probe_video(source, where, budget))
            parts.append({"type": "video"})
        else:
            raise InputError(f"{where} has an unknown type; use one of {MODALITIES}")
    return parts
