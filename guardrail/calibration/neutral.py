"""Neutral images and videos for calibrating the re-centring offsets.

Calibration never needs unsafe multimodal data: the harmless prompts are paired
with *neutral* media generated here — solid colours, noise and simple shapes for
images, a few such frames for videos — from a seeded generator, so a calibration
run is reproducible and its record names the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

KINDS = ("solid", "noise", "shapes")


@dataclass(frozen=True)
class NeutralMedia:
    """Settings of the neutral-media generator (recorded in the calibration record)."""

    seed: int = 0
    image_size: tuple[int, int] = (224, 224)
    video_frames: int = 4


def neutral_image(
    rng: random.Random, size: tuple[int, int], kind: str | None = None
) -> Image.Image:
    """One neutral RGB image: a solid colour, uniform noise or a few simple shapes."""
    kind = kind or rng.choice(KINDS)
    width, height = size
    colour = tuple(rng.randrange(256) for _ in range(3))
    if kind == "solid":
        return Image.new("RGB", size, colour)
    if kind == "noise":
        return Image.frombytes("RGB", size, rng.randbytes(width * height * 3))
    if kind == "shapes":
        image = Image.new("RGB", size, colour)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 4)):
            x0, y0 = rng.randrange(width), rng.randrange(height)
            x1, y1 = rng.randrange(x0, width + 1), rng.randrange(y0, height + 1)
            fill = tuple(rng.randrange(256) for _ in range(3))
            if rng.random() < 0.5:
                draw.rectangle((x0, y0, x1, y1), fill=fill)
            else:
                draw.ellipse((x0, y0, x1, y1), fill=fill)
        return image
    raise ValueError(f"neutral image kind {kind!r} is not one of {KINDS}")


def neutral_video(rng: random.Random, size: tuple[int, int], frames: int) -> list[Image.Image]:
    """A short neutral clip: frames of one kind with slowly changing content."""
    kind = rng.choice(KINDS)
    return [neutral_image(rng, size, kind) for _ in range(frames)]


def neutral_media(modality: str, rng: random.Random, settings: NeutralMedia) -> dict[str, object]:
    """A content part with neutral media of ``modality`` (``"image"`` or ``"video"``)."""
    if modality == "image":
        return {"type": "image", "image": neutral_image(rng, settings.image_size)}
    if modality == "video":
        return {
            "type": "video",
            "video": neutral_video(rng, settings.image_size, settings.video_frames),
        }
    raise ValueError(f"no neutral generator for modality {modality!r}")
