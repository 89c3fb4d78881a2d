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
