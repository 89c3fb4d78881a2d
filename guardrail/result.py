"""What a guarded generation returns: :class:`GuardrailResult` and its parts."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, Field

from guardrail.tools import ToolCall

__all__ = ["DECISION_FIELDS", "GuardrailResult", "ShadowScore", "ToolCall", "Usage"]


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class ShadowScore(BaseModel):
    """A shadow policy's verdict on a request: scored, never applied."""

    policy_name: str
    policy_version: str
    layer: int
    score: float | None = None
    would_intervene: bool = False


class GuardrailResult(BaseModel):
    """The outcome of one guarded generation."""

    text: str
    refused: bool
    intervened: bool
    score: float | None = None
    strength: float = 0.0
    layer: int | None = None
    policy_name: str | None = None
    policy_version: str | None = None
    mode: str = "enforce"
    modalities: list[str] = Field(default_factory=list)
    usage: Usage
    finish_reason: str = "stop"
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    latency_s: float = 0.0
    error: str | None = None
    tau: float | None = None
    would_intervene: bool = False
    rollout_arm: str | None = None
    shadow: list[ShadowScore] = Field(default_factory=list)
    token_ids: list[int] = Field(default_factory=list, repr=False)
    texts: list[str] = Field(default_factory=list)
    """Every returned sequence of this conversation, best first, when ``generate`` was
    asked for several (``num_return_sequences > 1``); ``text`` is ``texts[0]``."""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    """The calls of offered tools the model emitted (requests with ``tools=`` only);
    ``text`` is then what it wrote outside them. Empty when the guardrail withheld
    them (``tool_calls_withheld``)."""
    refusal_logodds: float | None = None
    """The model's refusal first-token log-odds in this generation (``log P(refusal
    first token) - log P(any other)`` at the first generated position, the tokens of
    :data:`guardrail.refusal.REFUSAL_STARTS`), read off the logits the same pass
    computed, under steering where it applied; ``None`` where no token was generated
    (a blocked request) or the tokenizer spells no refusal start."""
    tool_calls_withheld: int = 0
    """How many parsed calls were withheld because, in enforce mode, the guardrail
    intervened on the request or the answer is a refusal (fail closed: a request the
    policy flags never reaches a tool)."""

    def decision(self) -> dict[str, Any]:
        """The guardrail's decision as a JSON-ready dict (no answer text): what the
        framework integrations attach to their responses as ``"guardrail"`` metadata."""
        return self.model_dump(mode="json", include=set(DECISION_FIELDS))


DECISION_FIELDS = frozenset(
    {
        "request_id",
        "score",
        "strength",
        "intervened",
        "refused",
        "layer",
        "policy_name",
        "policy_version",
        "rollout_arm",
        "mode",
        "modalities",
        "latency_s",
        "error",
        "tool_calls_withheld",
        "refusal_logodds",
    }
)
