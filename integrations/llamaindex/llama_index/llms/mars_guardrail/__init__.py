"""LlamaIndex integration of mars-guardrail: a guarded local multimodal LLM."""

from llama_index.llms.mars_guardrail.base import (
    GuardrailWithheldToolCallsError,
    MarsGuardrailLLM,
    to_conversation,
)
from llama_index.llms.mars_guardrail.events import (
    GuardrailInterventionEvent,
    GuardrailRefusalEvent,
)

__all__ = [
    "GuardrailInterventionEvent",
    "GuardrailRefusalEvent",
    "GuardrailWithheldToolCallsError",
    "MarsGuardrailLLM",
    "to_conversation",
]
