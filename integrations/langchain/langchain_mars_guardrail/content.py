"""LangChain messages to guardrail conversations.

Roles: ``SystemMessage`` -> ``system``, ``HumanMessage`` -> ``user``, ``AIMessage`` ->
``assistant`` (its ``tool_calls`` as the assistant message's ``tool_calls``),
``ToolMessage`` -> ``tool`` (text only, with its ``tool_call_id`` and ``name``), and a
``ChatMessage`` with one of those roles. Content is a string or a list of blocks:

* text: a plain string, ``{"type": "text", "text": ...}``;
* images, as LangChain content blocks (both the v0 ``source_type`` form and the v1
  form), or OpenAI-style ``image_url`` blocks:

  - ``{"type": "image", "source_type": "base64", "data": ..., "mime_type": ...}``
  - ``{"type": "image", "base64": ..., "mime_type": ...}``
  - ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``
    (or ``"image_url": "data:..."``)
  - a local file: ``{"type": "image", "path": "cat.png"}``, or a ``file://`` URL or a
    plain path wherever a URL is accepted (``"url"``, ``image_url.url``,
    ``source_type="url"``).

Remote ``http(s)`` image URLs are refused: the guardrail never fetches from the
network; download the image and pass it as base64 or a path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlparse

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from guardrail.errors import InputError

__all__ = ["to_conversation", "to_parts"]

_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "tool": "tool",
}
# Blocks an assistant turn may carry that hold no text for the model to read back.
_SKIPPED_ASSISTANT_BLOCKS = {"reasoning", "thinking", "tool_call", "tool_use", "tool_call_chunk"}


def to_conversation(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """The guardrail conversation (transformers chat format) of LangChain messages."""
    conversation = []
    for index, message in enumerate(messages):
        role = _role(message, index)
        entry: dict[str, Any] = {"role": role, "content": to_parts(message.content, index, role)}
        if isinstance(message, AIMessage) and message.tool_calls:
            entry["tool_calls"] = [
                {
                    "id": call.get("id"),
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["args"]},
                }
                for call in message.tool_calls
            ]
        elif isinstance(message, ToolMessage):
            entry["tool_call_id"] = message.tool_call_id
            if message.name:
                entry["name"] = message.name
        conversation.append(entry)
    return conversation


def _role(message: BaseMessage, index: int) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, ToolMessage):
        return "tool"
    if isinstance(message, ChatMessage) and message.role.lower() in _ROLES:
        return _ROLES[message.role.lower()]
    raise InputError(
        f"message {index} is a {type(message).__name__} (type {message.type!r}); the guardrail "
        "takes system, human, AI and tool messages"
    )


def to_parts(
    content: str | list[Any], index: int = 0, role: str = "user"
) -> str | list[dict[str, Any]]:
    """Guardrail content parts of one message's LangChain content."""
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        where = f"message {index} block {j}"
        if isinstance(block, str):
            parts.append({"type": "text", "text": block})
            continue
        if not isinstance(block, Mapping):
            raise InputError(
                f"{where} is a {type(block).__name__}; use a string or a content block dict"
            )
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind in ("image", "image_url") and role != "tool":
            parts.append({"type": "image", "image": _image(block, where)})
        elif role == "assistant" and kind in _SKIPPED_ASSISTANT_BLOCKS:
            continue
        elif role == "tool":
            raise InputError(f"{where} has type {kind!r}; a tool result is text blocks only")
        else:
            raise InputError(
                f"{where} has type {kind!r}; the guardrail accepts text and image blocks "
                "(image, image_url)"
            )
    return parts


def _image(block: Mapping[str, Any], where: str) -> Any:
    """Bytes or a local path for an image block."""
    if block.get("type") == "image_url":
        ref = block.get("image_url")
        url = ref.get("url") if isinstance(ref, Mapping) else ref
        if not isinstance(url, str):
            raise InputError(
                f"{where}: image_url block needs image_url.url (a data: URL or a path)"
            )
        return _from_url(url, where)
    if "image" in block and block["image"] is not None:  # already a PIL image, bytes or path
        return block["image"]
    source_type = block.get("source_type")
    if source_type == "base64" or (source_type is None and block.get("base64") is not None):
        data = block.get("data") if source_type == "base64" else block.get("base64")
        return _b64(data, where, block.get("mime_type"))
    if block.get("path") is not None:
        return str(block["path"])
    url = block.get("url") if block.get("url") is not None else block.get("data")
    if source_type in (None, "url") and isinstance(url, str):
        return _from_url(url, where)
    if source_type == "id" or block.get("file_id") is not None:
        raise InputError(
            f"{where}: file ids refer to a provider's storage; pass base64 data or a path"
        )
    raise InputError(
        f"{where}: image block has no data; give 'base64' (with 'mime_type'), a data: URL or a 'path'"
    )


def _from_url(url: str, where: str) -> Any:
    if url.startswith("data:"):
        return url  # decoded and checked by the guardrail's own media parsing
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme in ("http", "https"):
        raise InputError(
            f"{where}: remote image URL {url!r} is not fetched (the guardrail runs offline); "
            "download the image and pass it as base64 data or a file path"
        )
    if parsed.scheme and len(parsed.scheme) > 1:
        raise InputError(
            f"{where}: image URL scheme {parsed.scheme!r} is not supported; use data: or file:"
        )
    return url  # a plain local path


def _b64(data: Any, where: str, mime_type: Any = None) -> str:
    """A base64 block as a data URI; the guardrail's media parsing decodes and checks it."""
    if not isinstance(data, str) or not data:
        raise InputError(f"{where}: base64 image data is missing or not a string")
    mime = (
        mime_type if isinstance(mime_type, str) and mime_type.startswith("image/") else "image/png"
    )
    return f"data:{mime};base64,{data}"
