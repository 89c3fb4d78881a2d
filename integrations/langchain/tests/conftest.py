"""Fixtures for the LangChain integration tests (helpers live in lc_support.py)."""

from __future__ import annotations

import base64

import pytest
from lc_support import llava_guardrail, png_bytes

from guardrail.guardrail import Guardrail


@pytest.fixture(scope="session")
def guard() -> Guardrail:
    return llava_guardrail(refusal_detector=lambda prompt, response: False)


@pytest.fixture(scope="session")
def refusing_guard() -> Guardrail:
    return llava_guardrail(refusal_detector=lambda prompt, response: True)


@pytest.fixture
def image_b64() -> str:
    return base64.b64encode(png_bytes()).decode("ascii")
