"""MARS computed a second, independent way agrees with the hook-based Guardrail.

The reference below does not use ``guardrail.steering``: it reads the residual stream
entering layer ``l*`` from ``output_hidden_states`` of a plain forward pass, applies
the method's rule in float64 (re-centre, score, trust-region strength, push along
``u``), and decodes greedily by re-running the *whole* sequence each step with the
steered residual written at ``(l*, t*)`` (no KV cache). The Guardrail instead steers
once, inside the cached prefill. Both must give the same score, strength and tokens,
on every tiny architecture and modality.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from guardrail import Guardrail
from guardrail.messages import parse_conversation
from guardrail.testing import ARCHITECTURES

from .conftest import tiny
from .test_guardrail_plumbing import conversations, strong_policy

NEW_TOKENS = 4


def _reference_rule(
    h: torch.Tensor, bundle: Any, modalities: frozenset[str]
) -> tuple[float, float, torch.Tensor]:
    """The method's rule on one activation, in float64, from the bundle's tensors."""
    t = {k: v.double() for k, v in bundle.tensors.items()}
    p = bundle.parameters
    delta = torch.zeros_like(t["u"])
    for m in sorted(modalities):
        delta = delta + t[f"delta_{m}"]
    h64 = h.double()
    h_c = h64 - delta  # recenter="full"
    s = float((h_c @ t["u"] - t["p_S"]) / t["g"])
    g = float(t["g"])
    a = min(p.kappa * g, p.lam * g * max(s - p.tau, 0.0))
    return s, a, h64 + a * t["u"]


def _forward_with(
    model: Any, layer: torch.nn.Module, inputs: dict, t_star: int, value: torch.Tensor
) -> torch.Tensor:
    """Logits of the last position with ``layer``'s input at ``t_star`` replaced by ``value``."""

    def replace(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] <= t_star:  # not a full-sequence pass
            return None
        hidden = hidden.clone()
        hidden[0, t_star] = value.to(hidden.dtype)
        if args:
            return ((hidden, *args[1:]), kwargs)
        return (args, {**kwargs, "hidden_states": hidden})

    handle = layer.register_forward_pre_hook(replace, with_kwargs=True)
    try:
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits[0, -1]
    finally:
        handle.remove()


def _extend(inputs: dict, token: int) -> dict:
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
    out["attention_mask"] = torch.cat(
        [inputs["attention_mask"], torch.ones(1, 1, dtype=inputs["attention_mask"].dtype)], dim=1
    )
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in out and out[key] is not None:
            out[key] = torch.cat([out[key], torch.zeros(1, 1, dtype=out[key].dtype)], dim=1)
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hook_based_guardrail_matches_an_independent_float64_reference(arch):
    model, processor = tiny(arch)
    bundle = strong_policy(model, processor, tau=-0.5, lam=2.0, kappa=1.5)
    guard = Guardrail(model, processor, bundle, max_new_tokens=NEW_TOKENS)
    layer = guard.adapter.layers[bundle.layer]
    eos = model.generation_config.eos_token_id
    strengths = []
    for conv in conversations(arch):
        parsed = parse_conversation(conv)
        inputs = guard.adapter.build_inputs([parsed])
        t_star = int(inputs["input_ids"].shape[1]) - 1
        with torch.no_grad():
            states = model(**inputs, use_cache=False, output_hidden_states=True).hidden_states
        h = states[bundle.layer][0, t_star]
        s, a, steered = _reference_rule(h, bundle, parsed.modalities)
        strengths.append(a)

        tokens: list[int] = []
        step_inputs = inputs
        for _ in range(NEW_TOKENS):
            token = int(_forward_with(model, layer, step_inputs, t_star, steered).argmax())
            if token == eos:
                break
            tokens.append(token)
            step_inputs = _extend(step_inputs, token)

        result = guard.generate(conv)
        assert result.score == pytest.approx(s, rel=1e-4, abs=1e-5), (arch, parsed.modalities)
        assert result.strength == pytest.approx(a, rel=1e-4, abs=1e-5)
        assert result.intervened == (a > 0)
        assert result.token_ids == tokens, (arch, parsed.modalities)
    assert sum(a > 0 for a in strengths) >= 2  # the comparison covers steered rows
