"""Tiny random-weight guardrails and test images for the LlamaIndex integration tests."""

from __future__ import annotations

import io
from typing import Any

from guardrail.adapters import ModelAdapter
from guardrail.guardrail import Guardrail
from guardrail.policy import PolicyBundle
from guardrail.tiny import random_image, random_policy, tiny_model

_MODELS: dict[str, tuple[Any, Any]] = {}


def tiny(arch: str) -> tuple[Any, Any]:
    if arch not in _MODELS:
        _MODELS[arch] = tiny_model(arch, seed=0)
    return _MODELS[arch]


def make_policy(
    model: Any, processor: Any, *, layer: int = 1, modalities: tuple[str, ...] | None = None, **params: Any
) -> PolicyBundle:
    """A random-statistics bundle with offsets for ``modalities`` (default: all the model takes)."""
    if modalities is None:
        modalities = tuple(sorted(ModelAdapter(model, processor).modalities))
    return random_policy(model, processor, layer=layer, modalities=modalities, name="li-test",
                         version="1.2.3", **params)


def llava_guardrail(**kwargs: Any) -> Guardrail:
    """Tiny LLaVA with a policy that steers every prompt (tau far below any score)."""
    model, processor = tiny("llava")
    policy = make_policy(model, processor, tau=-10.0, lam=10.0, kappa=8.0)
    kwargs.setdefault("max_new_tokens", 8)
    return Guardrail(model, processor, policy, **kwargs)


png_image = random_image


def png_bytes(seed: int = 1) -> bytes:
    buffer = io.BytesIO()
    png_image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


# END
