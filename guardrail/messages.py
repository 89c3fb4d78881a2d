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

import base64
import binascii
import io
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from guardrail.errors import InputError

ROLES = ("system", "user", "assistant")
MODALITIES = ("text", "image", "video")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_DATA_URI = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)
_SOURCES = "a PIL image, bytes, a data:image/...;base64 URI or a path"
_IN_MEMORY = "a PIL image, bytes or a data:image/...;base64 URI"
# Pillow errors while opening or decoding; EOFError comes from seeking animated files.
_PIL_ERRORS = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
)


@dataclass(frozen=True)
class InputLimits:
    """Bounds applied to every conversation (hostile-input protection).

    The media limits are checked from image headers before pixels are decoded, so an
    over-budget request costs neither the memory nor the time of decoding it.

    * ``max_image_pixels``: pixels of one image or one video frame.
    * ``max_video_frames``: frames of one video.
    * ``max_images``: image parts of one conversation.
    * ``max_videos``: video parts of one conversation.
    * ``max_total_pixels``: pixels of all images and video frames of one conversation
      together (2**25, about 100 MB once decoded as RGB).
    * ``allow_paths``: accept ``str``/``Path`` references to local files and frame
      directories. Set it to ``False`` when requests come from untrusted callers: only
      PIL images, bytes and ``data:image/...;base64`` URIs are then accepted.
    """

    max_image_pixels: int = 4096 * 4096
    max_video_frames: int = 64
    max_messages: int = 256
    max_text_chars: int = 200_000
    max_images: int = 16
    max_videos: int = 8
    max_total_pixels: int = 2**25
    allow_paths: bool = True


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


# ----------------------------------------------------------------------------- budget


@dataclass
class _Budget:
    """Pixels of one conversation's media, charged from headers before decoding."""

    limits: InputLimits
    pixels: int = 0

    def charge(self, size: tuple[int, int], where: str, *, count: int = 1) -> None:
        """Charge ``count`` images of ``size``; raise before anything is decoded."""
        width, height = size
        if width <= 0 or height <= 0:
            raise InputError(f"{where}: image has no pixels ({width}x{height})")
        each = width * height
        if each > self.limits.max_image_pixels:
            what = "image" if count == 1 else "each frame"
            raise InputError(
                f"{where}: {what} of {width}x{height} = {each} pixels exceeds the limit of "
                f"{self.limits.max_image_pixels} pixels per image or frame (possible "
                "decompression bomb); downscale it or raise InputLimits.max_image_pixels"
            )
        total = self.pixels + each * count
        if total > self.limits.max_total_pixels:
            raise InputError(
                f"{where}: the images and video frames of this conversation add up to at "
                f"least {total} pixels, over the limit of {self.limits.max_total_pixels} "
                "(InputLimits.max_total_pixels); send fewer or smaller images or frames, or "
                "raise InputLimits.max_total_pixels"
            )
        self.pixels = total


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
        if "content" not in message:
            raise InputError(f"message {i} has no 'content'; add a string or a list of parts")
        parts = _parse_content(message["content"], i, pending, budget)
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
    # Everything is validated and within budget: only now are pixels decoded.
    for media in pending:
        if isinstance(media, _Image):
            conv.images.append(media.decode())
        else:
            conv.videos.append(media.decode())
    return conv


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


# ----------------------------------------------------------------------------- sources


def _is_path(source: Any) -> bool:
    """A ``str`` that is not a ``data:`` URI, or an ``os.PathLike``."""
    if isinstance(source, str):
        return source[:5].lower() != "data:"
    return isinstance(source, os.PathLike)


def _data_uri_bytes(source: str, where: str) -> bytes:
    match = _DATA_URI.match(source)
    if match is None:
        raise InputError(
            f"{where}: the data: URI is not a base64 image; use 'data:image/<format>;base64,<data>'"
        )
    try:
        data = base64.b64decode(source[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            f"{where}: the data: URI does not hold valid base64; encode the image bytes "
            "with standard, padded base64"
        ) from None
    if not data:
        raise InputError(f"{where}: image bytes are empty (zero-byte image)")
    return data


def _path(source: Any, where: str, what: str, limits: InputLimits) -> Path:
    if not limits.allow_paths:
        raise InputError(
            f"{where}: {what} paths are not accepted (InputLimits.allow_paths is False); "
            f"pass {_IN_MEMORY}"
        )
    try:
        return Path(source)
    except (TypeError, ValueError):
        raise _unusable_path(where, what) from None


def _unusable_path(where: str, what: str) -> InputError:
    """The one message for every unusable path: it does not repeat the path nor tell
    whether it exists (missing, unreadable, empty and non-image files read alike)."""
    if what == "video":
        usable = "a directory of frame images or an animated GIF, WebP or TIFF file"
    else:
        usable = "a readable image file (PNG, JPEG, GIF, BMP, WebP or TIFF)"
    return InputError(
        f"{where}: the {what} path cannot be used; it must name {usable}. Check the "
        f"path, or pass {_IN_MEMORY}"
    )


def _too_large(where: str) -> InputError:
    return InputError(
        f"{where}: the image is too large to decode safely (possible decompression bomb); "
        "downscale it"
    )


def _kind(path: Path) -> str | None:
    """``"file"`` (regular file), ``"dir"`` or ``None`` (missing, unreadable, other)."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):
        return None
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else None


def _open_path(path: Path, where: str, what: str = "image") -> Image.Image:
    """Open an image file lazily (header only); one message for every failure."""
    if _kind(path) != "file":  # also keeps FIFOs and devices out
        raise _unusable_path(where, what)
    try:
        return Image.open(path)
    except Image.DecompressionBombError:
        raise _too_large(where) from None
    except _PIL_ERRORS:
        raise _unusable_path(where, what) from None


def _open_bytes(data: bytes, where: str) -> Image.Image:
    """Open image bytes lazily (header only)."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _too_large(where) from None
    except _PIL_ERRORS as exc:
        raise InputError(
            f"{where}: not a readable image; use PNG, JPEG, GIF, BMP, WebP or TIFF"
        ) from exc


# ----------------------------------------------------------------------------- images


class _Image:
    """An image whose header has been read and charged to the budget; its pixels
    are decoded by :meth:`decode`. Files are re-opened then rather than held open."""

    def __init__(
        self,
        size: tuple[int, int],
        where: str,
        *,
        image: Image.Image | None = None,
        path: Path | None = None,
    ) -> None:
        self.size = size
        self.where = where
        self.image = image
        self.path = path

    def decode(self) -> Image.Image:
        """The image fully decoded, as RGB."""
        if self.path is not None:
            image = _open_path(self.path, self.where)
            if image.size != self.size:  # the file changed since its header was read
                image.close()
                raise _unusable_path(self.where, "image")
        else:
            assert self.image is not None
            image = self.image
        try:
            image.load()
            return image.convert("RGB") if image.mode != "RGB" else image
        except _PIL_ERRORS as exc:
            if self.path is not None:
                raise _unusable_path(self.where, "image") from None
            raise InputError(
                f"{self.where}: image could not be decoded; the data is truncated or corrupt"
            ) from exc


def _probe(source: Any, where: str, limits: InputLimits) -> _Image:
    """Read an image's header (its size) without decoding its pixels."""
    if source is None:
        raise InputError(f"{where}: image part has no 'image'; give {_SOURCES}")
    if isinstance(source, Image.Image):
        return _Image(source.size, where, image=source)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise InputError(f"{where}: image bytes are empty (zero-byte image)")
        image = _open_bytes(bytes(source), where)
        return _Image(image.size, where, image=image)
    if isinstance(source, str) and not _is_path(source):
        image = _open_bytes(_data_uri_bytes(source, where), where)
        return _Image(image.size, where, image=image)
    if _is_path(source):
        path = _path(source, where, "image", limits)
        with _open_path(path, where) as image:
            size = image.size
        return _Image(size, where, path=path)
    raise InputError(f"{where}: image is a {type(source).__name__}; give {_SOURCES}")


def _probe_image(source: Any, where: str, budget: _Budget) -> _Image:
    image = _probe(source, where, budget.limits)
    budget.charge(image.size, where)
    return image


def load_image(
    source: Any, *, where: str = "image", limits: InputLimits | None = None
) -> Image.Image:
    """Open and fully decode an image as RGB, refusing decompression bombs.

    Its size is checked against ``limits`` from the header, before decoding.
    """
    return _probe_image(source, where, _Budget(limits or InputLimits())).decode()


# ----------------------------------------------------------------------------- videos


class _Frames:
    """A video given as frames (a list or a directory), headers read and charged."""

    def __init__(self, frames: list[_Image]) -> None:
        self.frames = frames

    def decode(self) -> list[Image.Image]:
        return [frame.decode() for frame in self.frames]


class _Animated:
    """A video given as an animated image (GIF, WebP, TIFF), frame count and size
    read from its headers and charged; frames are decoded one at a time."""

    def __init__(
        self,
        opener: Callable[[], Image.Image],
        where: str,
        *,
        count: int,
        size: tuple[int, int],
        is_path: bool,
    ) -> None:
        self.opener = opener
        self.where = where
        self.count = count
        self.size = size
        self.is_path = is_path

    def decode(self) -> list[Image.Image]:
        frames: list[Image.Image] = []
        try:
            with self.opener() as image:
                for k in range(self.count):
                    image.seek(k)
                    if image.size != self.size:  # TIFF pages may differ; seek reads the header
                        raise InputError(
                            f"{self.where}: frame {k} is {image.size[0]}x{image.size[1]}, not "
                            f"{self.size[0]}x{self.size[1]} like frame 0; give frames of one size"
                        )
                    frames.append(image.convert("RGB"))  # decodes this frame only
        except _PIL_ERRORS as exc:
            if isinstance(exc, InputError):
                raise
            if self.is_path:
                raise _unusable_path(self.where, "video") from None
            raise InputError(
                f"{self.where}: the animated image could not be decoded; the data is "
                "truncated or corrupt"
            ) from exc
        return frames


def _probe_animated(
    opener: Callable[[], Image.Image], where: str, budget: _Budget, *, is_path: bool
) -> _Animated:
    try:
        with opener() as image:
            size = image.size
            # n_frames walks the frame headers (for GIF it skips the LZW data): no decoding.
            count = int(getattr(image, "n_frames", 1))
    except Image.DecompressionBombError:
        raise _too_large(where) from None
    except _PIL_ERRORS as exc:
        if isinstance(exc, InputError):
            raise
        if is_path:
            raise _unusable_path(where, "video") from None
        raise InputError(
            f"{where}: not a readable animated image; use an animated GIF, WebP or TIFF, or "
            "give a list of frames"
        ) from exc
    _check_frame_count(count, where, budget.limits)
    budget.charge(size, where, count=count)
    return _Animated(opener, where, count=count, size=size, is_path=is_path)


def _check_frame_count(count: int, where: str, limits: InputLimits, *, more: bool = False) -> None:
    if count > limits.max_video_frames:
        has = f"more than {limits.max_video_frames}" if more else str(count)
        raise InputError(
            f"{where}: video has {has} frames, over the limit of {limits.max_video_frames}; "
            "sample fewer frames or raise InputLimits.max_video_frames"
        )


def _frame_files(path: Path, where: str, limits: InputLimits) -> list[Path]:
    """The image files of a frame directory, sorted by name; they are counted (up to
    one over the limit) before any is opened."""
    found: list[Path] = []
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                    found.append(Path(entry.path))
                    _check_frame_count(len(found), where, limits, more=True)
    except OSError:
        raise _unusable_path(where, "video") from None
    if not found:
        raise _unusable_path(where, "video")
    return sorted(found)


def _probe_video(source: Any, where: str, budget: _Budget) -> _Frames | _Animated:
    limits = budget.limits
    if isinstance(source, (bytes, bytearray)) or (isinstance(source, str) and not _is_path(source)):
        if isinstance(source, str):
            data = _data_uri_bytes(source, where)
        elif source:
            data = bytes(source)
        else:
            raise InputError(f"{where}: video bytes are empty (zero bytes)")
        return _probe_animated(lambda: Image.open(io.BytesIO(data)), where, budget, is_path=False)
    frames: list[Any]
    if _is_path(source):
        path = _path(source, where, "video", limits)
        kind = _kind(path)
        if kind == "dir":
            frames = list(_frame_files(path, where, limits))
        elif kind == "file":
            return _probe_animated(lambda: Image.open(path), where, budget, is_path=True)
        else:
            raise _unusable_path(where, "video")
    elif isinstance(source, Sequence) and not isinstance(source, str):
        frames = list(source)
    else:
        raise InputError(
            f"{where}: video is a {type(source).__name__}; give a list of frames, a directory "
            "of frame images or an animated GIF (a path, bytes or a data: URI)"
        )
    if not frames:
        raise InputError(f"{where}: video has zero frames; give at least one frame")
    _check_frame_count(len(frames), where, limits)
    probed = [_probe(f, f"{where} frame {k}", limits) for k, f in enumerate(frames)]
    sizes = {f.size for f in probed}
    if len(sizes) > 1:
        raise InputError(
            f"{where}: frames have different sizes {sorted(sizes)}; resize them to one size"
        )
    budget.charge(probed[0].size, where, count=len(probed))
    return _Frames(probed)


def load_video(
    source: Any, *, where: str = "video", limits: InputLimits | None = None
) -> list[Image.Image]:
    """Load a video as a list of RGB frames.

    Accepts a list of frames, a directory of image files (sorted by name) or an
    animated image (GIF/WebP/TIFF) as a path, bytes or ``data:`` URI. The frame count
    and sizes are checked against ``limits`` from headers, before decoding.
    """
    return _probe_video(source, where, _Budget(limits or InputLimits())).decode()
