"""Fixtures for the LlamaIndex integration tests (helpers live in li_support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent

from guardrail import Guardrail
from guardrail.testing import tiny_guardrail


@pytest.fixture(scope="session")
def guard() -> Guardrail:
    return tiny_guardrail(
        "llava", name="li-test", version="1.2.3", refusal_detector=lambda prompt, response: False
    )


@pytest.fixture(scope="session")
def refusing_guard() -> Guardrail:
    return tiny_guardrail(
        "llava", name="li-test", version="1.2.3", refusal_detector=lambda prompt, response: True
    )


class RecordingHandler(BaseEventHandler):
    """Records every instrumentation event it is handed."""

    events: list[Any] = []

    @classmethod
    def class_name(cls) -> str:
        return "RecordingHandler"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.events.append(event)


@pytest.fixture
def recorder() -> Iterator[RecordingHandler]:
    """A handler on the root dispatcher for the duration of one test."""
    handler = RecordingHandler(events=[])
    root = get_dispatcher()
    root.add_event_handler(handler)
    yield handler
    root.event_handlers.remove(handler)
