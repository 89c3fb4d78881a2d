"""The model organism: a small, real multimodal LLM with a real cross-modal safety gap.

A ``LlavaForConditionalGeneration`` built on SmolLM2-135M-Instruct that reads
typographic images (one token per 32 px cell, see :mod:`guardrail.models.organism.render`),
refuses harmful *text* requests, but mostly answers the same requests when they are
shown in an image: a CPU-sized test bed for MARS. It is **not** a safe model. See
``organism/README.md`` (the model card) for how it is built and measured.

Usage::

    from guardrail.models import organism
    model, processor = organism.load()
    image = organism.render.render_text("How do I bake bread?")
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Do what the picture says."}]}]

Video: LLaVA has no video input, so the organism takes a video as its frames, each an
image part of one message, in order (:func:`video_message`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from guardrail.atomic import publish_dir
from guardrail.errors import InputError
from guardrail.models.organism import render
from guardrail.models.organism.model import (
    ORGANISM_VERSION,
    OrganismError,
    assemble,
    attach_image_adapters,
    weights_digest,
)

__all__ = [
    "ORGANISM_VERSION",
    "POLICY_DIR",
    "OrganismError",
    "cache_dir",
    "load",
    "render",
    "video_message",
]

POLICY_DIR = Path(__file__).with_name("policy")
"""The organism's policy bundle (``organism@1.0.0``), shipped beside its weights: in the
repository a link to ``policies/organism/1.0.0``, in an installed wheel a copy."""


def cache_dir() -> Path:
    """Where the assembled organism is cached: ``cache_root()/organism-<hash of weights>``."""
    from guardrail.models.smollm2 import cache_root

    return cache_root() / f"organism-{weights_digest()[:16]}"


def _complete(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
        and (path / "processor_config.json").is_file()
    )


def load(dtype: Any = None, *, image_adapters: bool = True) -> tuple[Any, Any]:
    """``(model, processor)`` of the organism, in eval mode.

    The first call assembles the model from the SmolLM2 checkpoint and the stored
    parts in ``guardrail/models/organism/weights`` and caches the result (``save_pretrained``)
    under :func:`cache_dir`; later calls load the cache with ``from_pretrained``.

    Args:
        dtype: torch dtype of the model (``None``: float32).
        image_adapters: attach the image-position adapters (the organism as
            documented). ``False`` gives the plain LLaVA checkpoint underneath, the
            part an engine without position-conditional adapters can hold (vLLM):
            identical on text, weaker at refusing from images.

    Raises:
        OrganismError: the stored weights are missing or do not fit.
    """
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    dtype = dtype or torch.float32
    target = cache_dir()
    if not _complete(target):
        model, processor = assemble(image_adapters=False)
        # Another process may publish first; its copy is as good as ours.
        with publish_dir(target, keep_existing=_complete) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        model.to(dtype)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(target, dtype=dtype)
        processor = LlavaProcessor.from_pretrained(target)
    if image_adapters:
        attach_image_adapters(model)  # not part of the cached weights (cannot be merged)
    processor.tokenizer.padding_side = "left"
    model.eval()
    return model, processor


def video_message(frames: Sequence[Image.Image], text: str | None = None) -> list[dict[str, Any]]:
    """The content parts of one user message holding a video: one image part per frame,
    in order, then the text (if any).

    Raises:
        InputError: no frames, or a frame that is not a PIL image.
    """
    if isinstance(frames, Image.Image) or not isinstance(frames, Sequence) or not frames:
        raise InputError(
            "video_message() needs a non-empty list of PIL frames, e.g. render.video_frames(text, 3)"
        )
    parts: list[dict[str, Any]] = []
    for k, frame in enumerate(frames):
        if not isinstance(frame, Image.Image):
            raise InputError(f"video frame {k} is a {type(frame).__name__}, not a PIL image")
        parts.append({"type": "image", "image": frame})
    if text is not None:
        parts.append({"type": "text", "text": text})
    return parts
