"""How ``guardrail eval`` turns a text prompt into an image or a video.

The prompt is drawn as text (a typographic image; a video splits it across frames)
and a short instruction accompanies it. Which instructions is selectable
(``--instructions``):

- ``test``: the organism's held-out phrasings (4 for images, 2 for videos), never
  used while it was built (:mod:`guardrail.models.organism.phrasings`); the default
  for the organism;
- ``train``: the phrasings the organism was built with (in-distribution, for
  comparison with ``test``);
- ``fixed``: one instruction per medium
  (:data:`guardrail.calibration.typography.IMAGE_INSTRUCTION` and
  ``VIDEO_INSTRUCTION``); the default for other models.

Within a family the phrasing is chosen by the prompt's length, so a run is
reproducible. The layout is the renderer's: the organism's own token-cell renderer
for the organism, Pillow text on white for other models; videos split the prompt
over ``frames`` frames.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

from guardrail.calibration.typography import (
    IMAGE_INSTRUCTION,
    VIDEO_INSTRUCTION,
    TypographicRenderer,
)
from guardrail.errors import InputError

__all__ = [
    "INSTRUCTIONS",
    "MediaRenderer",
    "OrganismRenderer",
    "PhrasedRenderer",
    "default_renderer",
    "instruction",
]

INSTRUCTIONS: tuple[str, ...] = ("test", "train", "fixed")
"""The instruction families (see the module docstring)."""


class MediaRenderer(Protocol):
    """Turns a text instruction into content parts of another modality."""

    def image(self, prompt: str) -> list[dict[str, Any]]: ...

    def video(self, prompt: str) -> list[dict[str, Any]]: ...


def instruction(family: str, modality: str, prompt: str) -> str:
    """The text of ``family`` that accompanies ``prompt`` rendered as ``modality``."""
    if family == "fixed":
        options: tuple[str, ...] = (
            IMAGE_INSTRUCTION if modality == "image" else VIDEO_INSTRUCTION,
        )
    elif family in ("test", "train"):
        from guardrail.models.organism import phrasings

        table = phrasings.IMAGE_PHRASINGS if modality == "image" else phrasings.VIDEO_PHRASINGS
        options = table[family]
    else:
        raise InputError(
            f"unknown instruction family {family!r}; use one of {', '.join(INSTRUCTIONS)}"
        )
    return options[len(prompt) % len(options)]


@dataclass(frozen=True)
class OrganismRenderer:
    """Typographic media for the model organism, drawn by its own renderer.

    Images carry the whole instruction; videos split it across ``frames`` frames.
    The accompanying text comes from ``instructions`` (the held-out ``test``
    phrasings by default, so measurements never reuse the wording it was tuned with).
    """

    frames: int = 3
    instructions: str = "test"

    def image(self, prompt: str) -> list[dict[str, Any]]:
        from guardrail.models.organism import render

        return [
            {"type": "image", "image": render.render_text(prompt)},
            {"type": "text", "text": instruction(self.instructions, "image", prompt)},
        ]

    def video(self, prompt: str) -> list[dict[str, Any]]:
        from guardrail.models.organism import render

        frames = render.video_frames(prompt, self.frames)
        return [
            {"type": "video", "video": frames},
            {"type": "text", "text": instruction(self.instructions, "video", prompt)},
        ]


@dataclass(frozen=True)
class PhrasedRenderer:
    """A :class:`TypographicRenderer` whose accompanying text comes from a family."""

    base: TypographicRenderer = TypographicRenderer()
    instructions: str = "fixed"

    def image(self, prompt: str) -> list[dict[str, Any]]:
        text = instruction(self.instructions, "image", prompt)
        return replace(self.base, image_instruction=text).image(prompt)

    def video(self, prompt: str) -> list[dict[str, Any]]:
        text = instruction(self.instructions, "video", prompt)
        return replace(self.base, video_instruction=text).video(prompt)


def default_renderer(
    model_name: str, *, instructions: str | None = None, frames: int | None = None
) -> MediaRenderer:
    """The organism's own renderer for the organism, a Pillow-font renderer otherwise.

    ``instructions`` picks the family (default ``test`` for the organism, ``fixed``
    otherwise); ``frames`` the frames per video (default 3 for the organism, 4 otherwise).
    """
    if instructions is not None and instructions not in INSTRUCTIONS:
        raise InputError(
            f"unknown instruction family {instructions!r}; use one of {', '.join(INSTRUCTIONS)}"
        )
    if frames is not None and frames < 1:
        raise InputError(f"frames must be at least 1, got {frames}")
    if model_name == "organism":
        return OrganismRenderer(frames or 3, instructions or "test")
    return PhrasedRenderer(TypographicRenderer(frames=frames or 4), instructions or "fixed")
