"""Images and videos from untrusted input: sources, budgets, then decoding.

A media part is first *probed*: its source is checked (PIL image, bytes,
``data:image/...;base64`` URI, or a path when :attr:`InputLimits.allow_paths`) and
its size and frame count are read from headers, charging the request's
:class:`Budget`. Only when every part of a conversation fits are pixels decoded
(:meth:`decode` of each probe), one frame at a time, to RGB. Error messages never
repeat paths or other caller values, and a path that cannot be used gets one
message whether it is missing, unreadable or not an image.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from guardrail.errors import InputError
from guardrail.limits import InputLimits

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
