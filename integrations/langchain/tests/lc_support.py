"""Tiny random-weight guardrails and test images for the LangChain integration tests."""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image

from guardrail.adapters import ModelAdapter
from guardrail.guardrail import Guardrail
from guardrail.policy import ModelFingerprint, PolicyBundle, SteeringParameters
from guardrail.tiny import tiny_model

_MODELS: dict[str, tuple[Any, Any]] = {}


def tiny(arch: str) -> tuple[Any, Any]:
    if arch not in _MODELS:
        _MODELS[arch] = tiny_model(arch, seed=0)
    return _MODELS[arch]


def make_policy(
    model: Any,
    processor: Any,
    *,
    layer: int = 1,
    modalities: tuple[str, ...] | None = None,
    **params: Any,
) -> PolicyBundle:
    """A well-formed bundle with random statistics (for plumbing, not behaviour).

    ``modalities``: those with a re-centring offset; all the model's by default.
    """
    adapter = ModelAdapter(model, processor)
    if modalities is None:
        modalities = tuple(sorted(adapter.modalities))
    gen = torch.Generator().manual_seed(0)
    d = adapter.hidden_size
    mu_S = torch.randn(d, generator=gen)
    mu_H = mu_S + 2 * torch.randn(d, generator=gen)
    mu_m = {m: mu_S + 0.5 * torch.randn(d, generator=gen) for m in modalities}
    return PolicyBundle.from_statistics(
        name="lc-test",
        version="1.2.3",
        layer=layer,
        mu_H=mu_H,
        mu_S=mu_S,
        mu_modalities=mu_m,
        model=ModelFingerprint.of(adapter),
        parameters=SteeringParameters(**params),
    )


def llava_guardrail(**kwargs: Any) -> Guardrail:
    """Tiny LLaVA with a policy that steers every prompt (tau far below any score)."""
    model, processor = tiny("llava")
    policy = make_policy(model, processor, tau=-10.0, lam=10.0, kappa=8.0)
    kwargs.setdefault("max_new_tokens", 8)
    return Guardrail(model, processor, policy, **kwargs)


def png_image(seed: int = 1, size: int = 32) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def png_bytes(seed: int = 1) -> bytes:
    buffer = io.BytesIO()
    png_image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


# END
