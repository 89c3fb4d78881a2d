"""Guardrail events as LlamaIndex instrumentation events.

Every intervention and refusal of a call is dispatched through
``get_dispatcher(__name__)`` (which propagates to the root dispatcher) as a
:class:`GuardrailInterventionEvent` or :class:`GuardrailRefusalEvent`; the guardrail's
own event is in the ``event`` field. Listen with a ``BaseEventHandler`` added to
``llama_index.core.instrumentation.get_dispatcher()``.
"""

from __future__ import annotations

from collections.abc import Sequence

from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events import BaseEvent

from guardrail.observability.events import GuardrailEvent, InterventionEvent, RefusalEvent

__all__ = [
    "GuardrailInterventionEvent",
    "GuardrailRefusalEvent",
    "adispatch",
    "dispatch",
    "dispatcher",
]

dispatcher = get_dispatcher(__name__)


class GuardrailInterventionEvent(BaseEvent):
    """MARS steered a request (or, in shadow mode, would have)."""

    event: InterventionEvent

    @classmethod
    def class_name(cls) -> str:
        return "GuardrailInterventionEvent"


class GuardrailRefusalEvent(BaseEvent):
    """The guarded answer refused the request (``event.blocked``: a fail-closed block)."""

    event: RefusalEvent

    @classmethod
    def class_name(cls) -> str:
        return "GuardrailRefusalEvent"


def _wrap(event: GuardrailEvent) -> BaseEvent:
    if isinstance(event, InterventionEvent):
        return GuardrailInterventionEvent(event=event)
    if isinstance(event, RefusalEvent):
        return GuardrailRefusalEvent(event=event)
    raise TypeError(f"unknown guardrail event {type(event).__name__}")


def dispatch(events: Sequence[GuardrailEvent]) -> None:
    for event in events:
        dispatcher.event(_wrap(event))


async def adispatch(events: Sequence[GuardrailEvent]) -> None:
    for event in events:
        await dispatcher.aevent(_wrap(event))
