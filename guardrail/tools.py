"""Tools offered to the model and the tool calls it emits.

A request may offer tools (``Guardrail.generate(..., tools=[...])``). They reach the
model only through its own chat template (``apply_chat_template(tools=...)``), as
JSON-schema function definitions; nothing here writes a prompt. What the model
emits is read back by :func:`parse_tool_calls`.

**Tool definitions** (:func:`normalize_tools`) are accepted as

* ``{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}``
  (the transformers and OpenAI form; what the template receives),
* ``{"name": ..., "description": ..., "parameters": {...}}`` (the function alone), or
* a Python function with type hints and a Google-style docstring (converted by
  transformers' ``get_json_schema``).

**Tool calls in a conversation**: an assistant message may carry ``"tool_calls"``
(the same two dict forms, ``arguments`` as a dict or a JSON string) and a
``{"role": "tool", "content": ..., "tool_call_id": ..., "name": ...}`` message
gives a call's result back (:func:`normalize_tool_call`).

**Output format**: the Hermes / Qwen form, one block per call::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(``"parameters"`` is read as a synonym of ``"arguments"``; ``arguments`` may be a
JSON string). Other formats (Llama 3's bare JSON, Mistral's ``[TOOL_CALLS]``) are
not parsed: their calls stay in the text. A block that is not valid JSON, lacks a
name, names a tool that was not offered, or is not closed is never a call: it stays
in the text, word for word, so nothing the model wrote is lost and nothing the
application did not offer can be called.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from guardrail.errors import InputError

__all__ = [
    "CALL_CLOSE",
    "CALL_OPEN",
    "ParsedOutput",
    "ToolCall",
    "ToolCallStreamFilter",
    "inert_json",
    "normalize_tool_call",
    "normalize_tools",
    "parse_tool_calls",
    "tool_names",
]

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


class ToolCall(BaseModel):
    """One call the model asked for: which offered tool, with which arguments."""

    id: str = Field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)

    def as_message_call(self) -> dict[str, Any]:
        """The call in the form an assistant message carries it (``tool_calls``)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


# ----------------------------------------------------------------------------- definitions


def normalize_tools(tools: Any) -> list[dict[str, Any]]:
    """Validate tool definitions and return them in the ``{"type": "function", ...}``
    form the chat template receives. Raises :class:`InputError` naming the fix."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise InputError(
            f"tools must be a list of tool definitions, got {type(tools).__name__}; wrap a "
            "single tool as tools=[tool]"
        )
    if len(tools) > MAX_TOOLS:
        raise InputError(f"{len(tools)} tools exceed the limit of {MAX_TOOLS}; offer fewer")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        function = _function(tool, i)
        name = function["name"]
        if name in seen:
            raise InputError(f"tool {i}: the name {name!r} is offered twice; names must be unique")
        seen.add(name)
        out.append({"type": "function", "function": function})
    return out


def _function(tool: Any, index: int) -> dict[str, Any]:
    where = f"tool {index}"
    if callable(tool) and not isinstance(tool, Mapping):
        from transformers.utils import get_json_schema

        try:
            schema = get_json_schema(tool)
        except Exception as exc:  # transformers raises its own DocstringParsingException
            raise InputError(
                f"{where}: cannot derive a JSON schema from {getattr(tool, '__name__', tool)!r} "
                f"({exc}); give it type hints and a docstring with an Args: section, or pass a "
                "{'type': 'function', 'function': {...}} dict"
            ) from exc
        tool = schema
    if not isinstance(tool, Mapping):
        raise InputError(
            f"{where} is a {type(tool).__name__}; pass a dict {{'type': 'function', "
            "'function': {'name': ..., 'description': ..., 'parameters': {...}}} or a function"
        )
    if "function" in tool or tool.get("type") == "function":
        if tool.get("type", "function") != "function":
            raise InputError(f"{where} has an unsupported type; only 'function' tools exist")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise InputError(f"{where}: 'function' must be a dict with 'name' and 'parameters'")
    else:
        function = tool
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(
            f"{where}: the tool name must be 1-64 characters of letters, digits, '_', '.' or "
            "'-', starting with a letter or '_'"
        )
    description = function.get("description", "")
    if not isinstance(description, str):
        raise InputError(f"{where} ({name}): 'description' must be a string")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
        raise InputError(
            f"{where} ({name}): 'parameters' must be a JSON schema of type 'object' "
            "(e.g. {'type': 'object', 'properties': {'city': {'type': 'string'}}})"
        )
    try:
        json.dumps(parameters)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where} ({name}): 'parameters' is not JSON-serialisable: {exc}") from exc
    return {
        "name": name,
        "description": description,
        "parameters": {"type": "object", **dict(parameters)},
    }


def tool_names(tools: Sequence[Mapping[str, Any]]) -> frozenset[str]:
    """The names of normalised tool definitions."""
    return frozenset(str(t["function"]["name"]) for t in tools)


def normalize_tool_call(call: Any, where: str) -> dict[str, Any]:
    """One ``tool_calls`` entry of an assistant message, in the form templates receive:
    ``{"id": ..., "type": "function", "function": {"name": ..., "arguments": {...}}}``."""
    if not isinstance(call, Mapping):
        raise InputError(f"{where} is a {type(call).__name__}; use a dict with a 'function'")
    function = call.get("function", call)
    if not isinstance(function, Mapping):
        raise InputError(f"{where}: 'function' must be a dict with 'name' and 'arguments'")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(f"{where}: the called tool's name must be a valid tool name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: 'arguments' is not valid JSON ({exc.msg})") from exc
    if not isinstance(arguments, Mapping):
        raise InputError(f"{where}: 'arguments' must be a JSON object (a dict)")
    out: dict[str, Any] = {
        "type": "function",
        "function": {"name": name, "arguments": dict(arguments)},
    }
    call_id = call.get("id")
    if call_id is not None:
        if not isinstance(call_id, str) or len(call_id) > 128:
            raise InputError(f"{where}: 'id' must be a string of at most 128 characters")
        out["id"] = call_id
    return out


# ----------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ParsedOutput:
    """A generated answer split into its text and its tool calls.

    ``text`` is what the model wrote outside the parsed call blocks (stripped when any
    call was found); ``unparsed`` counts blocks kept in ``text`` because they were
    not a valid call of an offered tool.
    """

    text: str
    calls: list[ToolCall]
    unparsed: int = 0


def _call(inner: str, names: frozenset[str]) -> ToolCall | None:
    """The call in one block's body, or None when it is not a valid call."""
    try:
        data = json.loads(inner)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    name = data.get("name")
    if not isinstance(name, str) or name not in names:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    call_id = data.get("id")
    if isinstance(call_id, str) and 0 < len(call_id) <= 128:
        return ToolCall(id=call_id, name=name, arguments=arguments)
    return ToolCall(name=name, arguments=arguments)


def parse_tool_calls(text: str, names: frozenset[str] | Sequence[str]) -> ParsedOutput:
    """Split ``text`` into the calls of offered tools (``names``) and the rest.

    Never raises: a block that is not a valid call stays in the text.
    """
    offered = frozenset(names)
    calls: list[ToolCall] = []
    pieces: list[str] = []
    unparsed = 0
    position = 0
    for match in _BLOCK.finditer(text):
        call = _call(match.group(1), offered)
        if call is None:
            unparsed += 1
            continue
        pieces.append(text[position : match.start()])
        position = match.end()
        calls.append(call)
    rest = text[position:]
    last_open = rest.rfind(CALL_OPEN)
    if last_open >= 0 and rest.find(CALL_CLOSE, last_open) < 0:
        unparsed += 1  # an unclosed block at the end: kept as text
    pieces.append(rest)
    outside = "".join(pieces)
    return ParsedOutput(outside.strip() if calls else outside, calls, unparsed)


class ToolCallStreamFilter:
    """Streams the text outside call blocks, as :func:`parse_tool_calls` would keep it.

    Text is passed on as it comes, except a possible start of ``<tool_call>`` at the
    end of what has arrived (held back until it is decided) and a block, held until it
    closes: a valid call is dropped (it arrives in the result), anything else is
    passed on word for word. :meth:`finish` passes on what is still held (an unclosed
    block is text).
    """

    def __init__(self, names: frozenset[str] | Sequence[str]):
        self.names = frozenset(names)
        self.buffer = ""

    def feed(self, chunk: str) -> str:
        self.buffer += chunk
        out: list[str] = []
        while True:
            start = self.buffer.find(CALL_OPEN)
            if start < 0:
                keep = _partial_suffix(self.buffer, CALL_OPEN)
                cut = len(self.buffer) - keep
                out.append(self.buffer[:cut])
                self.buffer = self.buffer[cut:]
                break
            out.append(self.buffer[:start])
            end = self.buffer.find(CALL_CLOSE, start)
            if end < 0:
                self.buffer = self.buffer[start:]
                break
            block_end = end + len(CALL_CLOSE)
            block = self.buffer[start:block_end]
            if _call(block[len(CALL_OPEN) : -len(CALL_CLOSE)], self.names) is None:
                out.append(block)
            self.buffer = self.buffer[block_end:]
        return "".join(out)

    def finish(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that starts ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def inert_json(value: Any, neutralise: Callable[[str], str]) -> Any:
    """``value`` (JSON-like) with every string, keys included, passed through ``neutralise``."""
    if isinstance(value, str):
        return neutralise(value)
    if isinstance(value, Mapping):
        return {neutralise(str(k)): inert_json(v, neutralise) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [inert_json(v, neutralise) for v in value]
    return value
