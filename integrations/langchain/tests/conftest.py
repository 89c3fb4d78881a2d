"""Fixtures for the LangChain integration tests (helpers live in lc_support.py)."""

from __future__ import annotations

import base64

import pytest

from guardrail import Guardrail
from guardrail.testing import png_bytes, tiny_guardrail


@pytest.fixture(scope="session")
def guard() -> Guardrail:
    return tiny_guardrail(
        "llava", name="lc-test", version="1.2.3", refusal_detector=lambda prompt, response: False
    )


@pytest.fixture(scope="session")
def refusing_guard() -> Guardrail:
    return tiny_guardrail(
        "llava", name="lc-test", version="1.2.3", refusal_detector=lambda prompt, response: True
    )


@pytest.fixture
def image_b64() -> str:
    return base64.b64encode(png_bytes()).decode("ascii")


# Standard integration tests that need a model able to follow a tool schema or write
# JSON on request. The tiny guardrail's random weights cannot; the same paths are
# tested with forced decoding in test_tool_calling.py. Marked non-strict: they run,
# and pass if the model happens to comply.
NEEDS_A_CAPABLE_MODEL = {
    "test_tool_calling",
    "test_tool_calling_async",
    "test_bind_runnables_as_tools",
    "test_tool_calling_with_no_arguments",
    "test_structured_output",
    "test_structured_output_async",
    "test_structured_output_pydantic_2_v1",
    "test_structured_output_optional_param",
    "test_json_mode",
    "test_agent_loop",
    "test_unicode_tool_call_integration",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name = getattr(item, "originalname", item.name)
        if item.cls is not None and item.cls.__name__ == "TestChatMarsGuardrailIntegration":
            if name in NEEDS_A_CAPABLE_MODEL:
                item.add_marker(
                    pytest.mark.xfail(
                        reason="needs a model that follows tool schemas; the tiny test model "
                        "has random weights (see test_tool_calling.py)",
                        strict=False,
                    )
                )
