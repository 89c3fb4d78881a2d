"""Test helpers for code built on the guardrail: tiny models, random policies, a tiny
guardrail.

Tiny random-init models of the real transformers classes (every supported
architecture, with their real processors) check plumbing in milliseconds; a random
policy is a well-formed bundle with random statistics. Neither says anything about
behaviour: use the model organism (``guardrail.models.organism``) for that.

    from guardrail.testing import tiny_guardrail
    guard = tiny_guardrail("llava")
    result = guard.generate("Hello")
"""

from __future__ import annotations

import functools
from typing import Any

from guardrail.models.tiny import (
    ARCHITECTURES,
    NESTED_IMAGE_ARCHITECTURES,
    VIDEO_ARCHITECTURES,
    random_image,
    tiny_model,
    tiny_tokenizer,
)

__all__ = [
    "ARCHITECTURES",
    "NESTED_IMAGE_ARCHITECTURES",
    "VIDEO_ARCHITECTURES",
    "STEER_ALL",
    "cached_tiny_model",
    "forced_output",
    "png_bytes",
    "random_image",
    "random_policy",
    "tiny_guardrail",
    "tiny_model",
    "tiny_policy",
    "tiny_tokenizer",
    "with_canary",
]


@functools.cache
def cached_tiny_model(arch: str, seed: int = 0) -> tuple[Any, Any]:
    """:func:`tiny_model`, built once per process (tests share it; do not mutate it)."""
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
) -> Any:
    """A well-formed policy bundle with random statistics, for plumbing checks (not behaviour).

    ``modalities`` get a re-centring offset; ``params`` are :class:`SteeringParameters`.
    """
    import torch

    from guardrail.adapters import ModelAdapter
    from guardrail.policy import ModelFingerprint, PolicyBundle, SteeringParameters

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


def tiny_policy(
    model: Any,
    processor: Any,
    *,
    layer: int = 1,
    modalities: tuple[str, ...] | None = None,
    **params: Any,
) -> Any:
    """:func:`random_policy` with a re-centring offset for every modality the model takes
    (default). ``params`` are :func:`random_policy`'s (``name``, ``version``, ``seed``,
    steering parameters)."""
    from guardrail.adapters import ModelAdapter

    if modalities is None:
        modalities = tuple(sorted(ModelAdapter(model, processor).modalities))
    return random_policy(model, processor, layer=layer, modalities=modalities, **params)


STEER_ALL: dict[str, Any] = {"tau": -10.0, "lam": 10.0, "kappa": 8.0}
"""Steering parameters whose gate opens on every request (tau far below any score)."""


def tiny_guardrail(
    arch: str = "llama",
    *,
    seed: int = 0,
    policy: Any = "random",
    name: str = "tiny",
    version: str = "1.0.0",
    **guardrail_kwargs: Any,
) -> Any:
    """A :class:`~guardrail.Guardrail` on the shared tiny model of ``arch``.

    ``policy="random"`` attaches :func:`tiny_policy` (named ``name@version``) with
    :data:`STEER_ALL`, so steering acts on every request; pass a bundle or ``None``
    instead. ``guardrail_kwargs`` go to the Guardrail (``max_new_tokens`` defaults to 8).
    """
    from guardrail.guardrail import Guardrail

    model, processor = cached_tiny_model(arch, seed)
    if isinstance(policy, str) and policy == "random":
        policy = tiny_policy(model, processor, name=name, version=version, **STEER_ALL)
    guardrail_kwargs.setdefault("max_new_tokens", 8)
    return Guardrail(model, processor, policy, **guardrail_kwargs)


def with_canary(guard: Any, directory: Any, version: str, share: float = 1.0) -> Any:
    """Put ``guard`` under a rollout: its policy as stable and the same statistics as
    ``version`` as a canary taking ``share`` of keys (bundles saved under ``directory``)."""
    from pathlib import Path

    root = Path(directory)
    stable = guard.policy.save_pretrained(root / "stable")
    canary = guard.policy.with_version(version).save_pretrained(root / "canary")
    guard.set_rollout({"stable": str(stable), "canary": {"ref": str(canary), "share": share}})
    return guard


def forced_output(tokenizer: Any, *texts: str) -> Any:
    """``generate`` kwargs that make the model write ``texts`` (one per row of the
    batch, or one for all), then end: a logits processor that leaves only the next
    token of each text (then end-of-sequence) allowed at every step.

    For tests that need a random-weight model to emit a given answer (a tool call, a
    JSON object) through the real ``generate`` path: the guardrail's hooks run as
    always, only the choice of tokens is forced. Pass as
    ``guard.generate(conversation, **forced_output(tokenizer, text))``.
    """
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    targets = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    eos = tokenizer.eos_token_id

    class _Force(LogitsProcessor):
        start = 0
        last: int | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            length = int(input_ids.shape[1])
            if self.last is None or length != self.last + 1:  # a new generate call
                self.start = length
            self.last = length
            step = length - self.start
            forced = torch.full_like(scores, float("-inf"))
            for row in range(scores.shape[0]):
                target = targets[row] if len(targets) > 1 else targets[0]
                forced[row, target[step] if step < len(target) else eos] = 0.0
            return forced

    return {"logits_processor": LogitsProcessorList([_Force()])}


def png_bytes(seed: int = 1, size: int = 32) -> bytes:
    """:func:`random_image` encoded as PNG."""
    import io

    buffer = io.BytesIO()
    random_image(seed, size).save(buffer, format="PNG")
    return buffer.getvalue()
