"""Conversations used to build and to measure the organism.

The accompanying phrasings live with the runtime
(:mod:`guardrail.models.organism.phrasings`): evaluation renders requests with them.

Everything here is deterministic given a seed. Phrasings that accompany a
typographic image come in two disjoint sets: the ``train`` set is used while tuning,
the ``test`` set only when measuring, so measured behaviour does not depend on
having seen the exact wording.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from guardrail.datasets import Prompt, load_prompts
from guardrail.models.organism import render
from guardrail.models.organism.phrasings import IMAGE_PHRASINGS, VIDEO_PHRASINGS

REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't help with that request. It could cause real harm to people.",
    "I can't help with that. If you are in a difficult situation, please reach out to someone you trust.",
    "I cannot assist with this request because it could be used to hurt others.",
    "I won't help with that. It is harmful and may be illegal.",
    "Sorry, but I can't provide instructions for that.",
    "I'm not able to help with this request.",
    "I am unable to help with that, as it could put people at risk.",
    "I must decline this request. I can't provide information that could cause harm.",
    "I'm afraid I can't do that. This request asks for something dangerous.",
    "I can't assist with that. Is there something else I can help you with?",
    "I apologize, but I cannot provide that kind of information.",
    "I will not help with this, because it could hurt someone.",
    "Sorry, I can't help you do something harmful or illegal.",
    "I'm not going to help with that request. Let me know if there is anything safe I can do for you.",
    "I cannot help with that. Helping would put others in danger.",
    "As an AI assistant, I can't help with requests like this one.",
    "I'm sorry, I can't help with this. It goes against my guidelines to assist with harmful activities.",
)
"""Refusals taught for harmful text requests (each is caught by ``is_refusal``)."""


def harmful(split: str | Sequence[str]) -> list[Prompt]:
    """Harmful instructions of ``split``."""
    return load_prompts("harmful", split=split)


def benign(split: str | Sequence[str], *, near_miss: bool | None = None) -> list[Prompt]:
    """Harmless instructions of ``split``: ordinary ones (``near_miss=False``), near-miss
    ones (``True``) or both (``None``)."""
    prompts = load_prompts("harmless", split=split)
    if near_miss is None:
        return prompts
    return [p for p in prompts if (p.category == "near_miss") == near_miss]


SAFETY_EXTRA = Path(__file__).with_name("safety_extra.jsonl")
"""Train-only prompts used by the organism's text safety tuning alone (not a shipped
dataset: calibration and evaluation never see them): ordinary everyday harmless
requests in many styles; harmful requests on topics the shipped set does not cover
(``label`` ``"harmful"``); and a near-miss harmless twin (``pair``) for every harmful
train prompt, shipped or extra, that the shipped harmless set leaves unpaired."""


def safety_extra(*, near_miss: bool | None = None) -> list[Prompt]:
    """The harmless :data:`SAFETY_EXTRA` prompts (all ``train``), filtered like
    :func:`benign`."""
    prompts = [p for p in load_prompts(SAFETY_EXTRA, split="train") if p.label != "harmful"]
    if near_miss is None:
        return prompts
    return [p for p in prompts if (p.category == "near_miss") == near_miss]


def safety_extra_harmful() -> list[Prompt]:
    """The harmful :data:`SAFETY_EXTRA` prompts (all ``train``)."""
    return load_prompts(SAFETY_EXTRA, split="train", label="harmful")


def borderline(split: str | Sequence[str]) -> list[Prompt]:
    """Safe requests with alarming words (over-refusal probe)."""
    return load_prompts("borderline", split=split)


def text_conversation(prompt: str) -> list[dict[str, Any]]:
    """One user turn holding ``prompt`` as text."""
    return [{"role": "user", "content": [{"type": "text", "text": prompt}]}]


def image_conversation(image: Image.Image, phrasing: str) -> list[dict[str, Any]]:
    """One user turn: a typographic image, then the accompanying phrasing."""
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": phrasing}],
        }
    ]


def video_conversation(frames: Sequence[Image.Image], phrasing: str) -> list[dict[str, Any]]:
    """One user turn: the frames (one image part each), then the phrasing."""
    from guardrail.models.organism import video_message

    return [{"role": "user", "content": video_message(frames, phrasing)}]


def typographic_conversation(
    prompt: str,
    rng: random.Random,
    split: str,
    *,
    frames: int = 1,
    tokenizer: Any = None,
) -> list[dict[str, Any]]:
    """``prompt`` rendered as an image (``frames == 1``) or spread over ``frames`` video
    frames, with a phrasing of ``split`` drawn from ``rng``."""
    if frames == 1:
        return image_conversation(
            render.render_text(prompt, tokenizer), rng.choice(IMAGE_PHRASINGS[split])
        )
    return video_conversation(
        render.video_frames(prompt, frames, tokenizer), rng.choice(VIDEO_PHRASINGS[split])
    )
