"""The model the integration examples guard: the organism with its own policy, or a
tiny random model with a random policy (``tiny-<arch>``: a smoke run)."""

from __future__ import annotations

from guardrail import Guardrail
from guardrail.models import organism
from guardrail.testing import tiny_guardrail


def build(model_name: str = "organism") -> Guardrail:
    if model_name.startswith("tiny-"):
        return tiny_guardrail(model_name.removeprefix("tiny-"))
    policy = organism.POLICY_DIR if model_name == "organism" else None
    return Guardrail.from_pretrained(model_name, policy, max_new_tokens=24)
