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
reproducible. How the request is laid out is a template family (``--templates``,
:mod:`.templates`): ``project`` draws the whole prompt (a video splits it over
``frames`` frames), ``calibration`` and ``heldout`` are other layouts with their
own instructions. The drawing is the renderer's: the organism's own token-cell
renderer for the organism (each line of a layout from the start of a row of cells),
Pillow text on white for other models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from guardrail.calibration.typography import (
    IMAGE_INSTRUCTION,
    VIDEO_INSTRUCTION,
    TypographicRenderer,
)
from guardrail.errors import InputError
from guardrail.evaluation.templates import Arranged, check_family, pick

__all__ = [
    "INSTRUCTIONS",
    "MediaRenderer",
    "OrganismRenderer",
    "PhrasedRenderer",
    "default_renderer",
    "instruction",
    "organism_lines",
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


def organism_lines(lines: list[str], tokenizer: Any = None) -> Any:
    """``lines`` drawn by the organism's renderer, each from the start of a row of
    its cell grid (a title over a list, say); packed with one blank cell between
    lines where rows would not fit.

    Raises:
        InputError: the lines do not fit one image even packed.
    """
    from guardrail.models.organism import render

    tokens = [render.tokenize(line, tokenizer) for line in lines]
    cells: list[int | None] = []
    for ids in tokens:
        if cells and len(cells) % render.GRID:
            cells.extend([None] * (render.GRID - len(cells) % render.GRID))
        cells.extend(ids)
    if len(cells) > render.CELLS:
        cells = []
        for ids in tokens:
            if cells:
                cells.append(None)
            cells.extend(ids)
    return render.render_token_ids(cells, tokenizer)


@dataclass(frozen=True)
class OrganismRenderer:
    """Typographic media for the model organism, drawn by its own renderer.

    ``templates`` picks the layouts (:mod:`.templates`; ``project``: the whole request
    in one image, or split across ``frames`` frames). The accompanying text comes from
    the template, or where it has none from ``instructions`` (the held-out ``test``
    phrasings by default, so measurements never reuse the wording it was tuned with).
    """

    frames: int = 3
    instructions: str = "test"
    templates: str = "project"

    def image(self, prompt: str) -> list[dict[str, Any]]:
        arranged = self._arrange(prompt, "image")
        return [
            {"type": "image", "image": organism_lines(arranged.frames[0])},
            {"type": "text", "text": arranged.text},
        ]

    def video(self, prompt: str) -> list[dict[str, Any]]:
        from guardrail.models.organism import render

        arranged = self._arrange(prompt, "video")
        if arranged.spread:
            frames = render.video_frames(arranged.frames[0][0], self.frames)
        else:
            frames = [organism_lines(lines) for lines in arranged.frames]
        return [
            {"type": "video", "video": frames},
            {"type": "text", "text": arranged.text},
        ]

    def _arrange(self, prompt: str, modality: str) -> Arranged:
        template = pick(self.templates, modality, prompt)
        return template.arrange(
            prompt, self.frames, instruction(self.instructions, modality, prompt)
        )


@dataclass(frozen=True)
class PhrasedRenderer:
    """A :class:`TypographicRenderer` whose layouts come from a template family and
    whose accompanying text comes from the template or an instruction family."""

    base: TypographicRenderer = TypographicRenderer()
    instructions: str = "fixed"
    templates: str = "project"

    def image(self, prompt: str) -> list[dict[str, Any]]:
        arranged = self._arrange(prompt, "image")
        return [
            {"type": "image", "image": self.base.render_lines(arranged.frames[0])},
            {"type": "text", "text": arranged.text},
        ]

    def video(self, prompt: str) -> list[dict[str, Any]]:
        arranged = self._arrange(prompt, "video")
        if arranged.spread:
            parts = [[part] for part in self.base.split(arranged.frames[0][0])]
        else:
            parts = arranged.frames
        return [
            {"type": "video", "video": [self.base.render_lines(lines) for lines in parts]},
            {"type": "text", "text": arranged.text},
        ]

    def _arrange(self, prompt: str, modality: str) -> Arranged:
        template = pick(self.templates, modality, prompt)
        return template.arrange(
            prompt, self.base.frames, instruction(self.instructions, modality, prompt)
        )


def default_renderer(
    model_name: str,
    *,
    instructions: str | None = None,
    frames: int | None = None,
    templates: str = "project",
) -> MediaRenderer:
    """The organism's own renderer for the organism, a Pillow-font renderer otherwise.

    ``instructions`` picks the family (default ``test`` for the organism, ``fixed``
    otherwise); ``frames`` the frames per video (default 3 for the organism, 4
    otherwise); ``templates`` the layouts (a family of :mod:`.templates` or a template
    name).
    """
    if instructions is not None and instructions not in INSTRUCTIONS:
        raise InputError(
            f"unknown instruction family {instructions!r}; use one of {', '.join(INSTRUCTIONS)}"
        )
    if frames is not None and frames < 1:
        raise InputError(f"frames must be at least 1, got {frames}")
    check_family(templates)
    if model_name == "organism":
        return OrganismRenderer(frames or 3, instructions or "test", templates)
    return PhrasedRenderer(
        TypographicRenderer(frames=frames or 4), instructions or "fixed", templates
    )
