"""LangChain integration of mars-guardrail: a guarded local multimodal chat model."""

from langchain_mars_guardrail.chat_models import (
    ChatMarsGuardrail,
    GuardrailRefusedError,
    guardrail_metadata,
)
from langchain_mars_guardrail.content import to_conversation

__all__ = ["ChatMarsGuardrail", "GuardrailRefusedError", "guardrail_metadata", "to_conversation"]
__version__ = "0.1.0"
