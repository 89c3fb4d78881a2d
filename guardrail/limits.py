"""Bounds applied to every request: :class:`InputLimits`."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["InputLimits"]


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
