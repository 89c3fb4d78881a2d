"""Chat messages: parsing, validation and normalisation.

A conversation is a list of ``{"role": ..., "content": ...}`` dicts in the
transformers chat format. ``content`` is a string or a list of parts:

* ``{"type": "text", "text": "..."}``
* ``{"type": "image", "image": PIL.Image | path | bytes}`` (``"path"`` is accepted too)
* ``{"type": "video", "video": [frame, ...] | directory of frames | animated GIF}``,
  frames being PIL images, paths or bytes.

:func:`parse_conversation` checks everything a hostile or careless caller can get
wrong and raises :class:`~guardrail.errors.InputError` naming the problem and the
fix; what it returns is safe to hand to a processor: RGB images of bounded size.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from guardrail.errors import InputError

ROLES = ("system", "user", "assistant")
MODALITIES = ("text", "image", "video")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class InputLimits:
    """Bounds applied to every request (hostile-input protection)."""

    max_image_pixels: int = 4096 * 4096
    max_video_frames: int = 64
    max_messages: int = 256
    max_text_chars: int = 200_000


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
        return "\n".join(
            part["text"]
            for message in self.messages
            for part in message["content"]
            if part["type"] == "text"
        )


def is_single_conversation(obj: Any) -> bool:
    """True for one conversation (a list of message dicts) or a bare string."""
    if isinstance(obj, str):
        return True
    return isinstance(obj, Sequence) and (len(obj) == 0 or isinstance(obj[0], Mapping))


def parse_conversation(messages: Any, *, limits: InputLimits | None = None) -> Conversation:
    """Validate ``messages`` and return a :class:`Conversation`.

    A bare string is accepted as a single user message.
    """
    limits = limits or InputLimits()
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
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
    conv = Conversation(messages=[])
    total_chars = 0
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(
                f"message {i} is a {type(message).__name__}, expected a dict with 'role' and 'content'"
            )
        role = message.get("role")
        if role not in ROLES:
            raise InputError(f"message {i} has role {role!r}; use one of {ROLES}")
        if "content" not in message:
            raise InputError(f"message {i} has no 'content'; add a string or a list of parts")
        parts = _parse_content(message["content"], i, conv, limits)
        total_chars += sum(len(p["text"]) for p in parts if p["type"] == "text")
        conv.messages.append({"role": role, "content": parts})
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
    return conv


def _parse_content(
    content: Any, index: int, conv: Conversation, limits: InputLimits
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
            conv.images.append(load_image(source, where=where, limits=limits))
            parts.append({"type": "image"})
        elif kind == "video":
            source = part.get("video", part.get("path"))
            conv.videos.append(load_video(source, where=where, limits=limits))
            parts.append({"type": "video"})
        else:
            raise InputError(f"{where} has type {kind!r}; use one of {MODALITIES}")
    return parts


def load_image(
    source: Any, *, where: str = "image", limits: InputLimits | None = None
) -> Image.Image:
    """Open and fully decode an image as RGB, refusing decompression bombs."""
    limits = limits or InputLimits()
    if source is None:
        raise InputError(f"{where}: image part has no 'image'; give a PIL image, a path or bytes")
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (bytes, bytearray)):
        if not source:
            raise InputError(f"{where}: image bytes are empty (zero-byte image)")
        image = _open(io.BytesIO(source), where)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{where}: image file {str(path)!r} does not exist")
        if path.stat().st_size == 0:
            raise InputError(f"{where}: image file {str(path)!r} is empty (zero bytes)")
        image = _open(path, where)
    else:
        raise InputError(
            f"{where}: image is a {type(source).__name__}; give a PIL image, a path or bytes"
        )
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InputError(f"{where}: image has no pixels ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise InputError(
            f"{where}: image of {width}x{height} = {width * height} pixels exceeds the limit "
            f"of {limits.max_image_pixels} (possible decompression bomb); downscale it or "
            "raise InputLimits.max_image_pixels"
        )
    try:
        image.load()
        return image.convert("RGB") if image.mode != "RGB" else image
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(
            f"{where}: image could not be decoded ({exc}); the file is truncated or corrupt"
        ) from exc


def _open(fp: Any, where: str) -> Image.Image:
    try:
        return Image.open(fp)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{where}: {exc}; the image is too large to decode safely") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(
            f"{where}: not a readable image ({exc}); use PNG, JPEG, GIF, BMP or WebP"
        ) from exc


def load_video(
    source: Any, *, where: str = "video", limits: InputLimits | None = None
) -> list[Image.Image]:
    """Load a video as a list of RGB frames.

    Accepts a list of frames, a directory of image files (sorted by name) or an
    animated image file (GIF/WebP/TIFF).
    """
    limits = limits or InputLimits()
    frames: list[Any]
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            frames = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            frames = _animated_frames(path, where, limits)
        else:
            raise InputError(f"{where}: video path {str(path)!r} does not exist")
    elif isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray, str)):
        frames = list(source)
    else:
        raise InputError(
            f"{where}: video is a {type(source).__name__}; give a list of frames, a directory "
            "of frame images or an animated GIF"
        )
    if not frames:
        raise InputError(f"{where}: video has zero frames; give at least one frame")
    if len(frames) > limits.max_video_frames:
        raise InputError(
            f"{where}: video has {len(frames)} frames, over the limit of "
            f"{limits.max_video_frames}; sample fewer frames or raise InputLimits.max_video_frames"
        )
    loaded = [
        load_image(f, where=f"{where} frame {k}", limits=limits) for k, f in enumerate(frames)
    ]
    sizes = {f.size for f in loaded}
    if len(sizes) > 1:
        raise InputError(
            f"{where}: frames have different sizes {sorted(sizes)}; resize them to one size"
        )
    return loaded


def _animated_frames(path: Path, where: str, limits: InputLimits) -> list[Any]:
    if path.stat().st_size == 0:
        raise InputError(f"{where}: video file {str(path)!r} is empty (zero bytes)")
    image = _open(path, where)
    count = getattr(image, "n_frames", 1)
    if count > limits.max_video_frames:
        raise InputError(
            f"{where}: video has {count} frames, over the limit of {limits.max_video_frames}"
        )
    frames = []
    for k in range(count):
        image.seek(k)
        frames.append(image.copy())
    return frames
