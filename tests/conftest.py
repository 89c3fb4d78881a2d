"""Shared fixtures: tiny random models of real architectures, built once per session."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from guardrail.adapters import ModelAdapter
from guardrail.policy import ModelFingerprint, PolicyBundle, SteeringParameters


@functools.cache
def tiny(arch: str, seed: int = 0) -> tuple[Any, Any]:
    from guardrail.tiny import tiny_model

    return tiny_model(arch, seed=seed)


def random_policy(
    model: Any,
    processor: Any,
    *,
    layer: int = 2,
    seed: int = 0,
    modalities: tuple[str, ...] = (),
    name: str = "test",
    version: str = "1.0.0",
    **params: Any,
) -> PolicyBundle:
    """A well-formed bundle with random statistics (plumbing tests, not behaviour)."""
    adapter = ModelAdapter(model, processor)
    gen = torch.Generator().manual_seed(seed)
    d = adapter.hidden_size
    mu_S = torch.randn(d, generator=gen)
    mu_H = mu_S + 2 * torch.randn(d, generator=gen)
    mu_m = {m: mu_S + 0.5 * torch.randn(d, generator=gen) for m in modalities}
    return PolicyBundle.from_statistics(
        name=name,
        version=version,
        layer=layer,
        mu_H=mu_H,
        mu_S=mu_S,
        mu_modalities=mu_m,
        model=ModelFingerprint.of(adapter),
        parameters=SteeringParameters(**params),
    )


@pytest.fixture(scope="session")
def tiny_llama() -> tuple[Any, Any]:
    return tiny("llama")
