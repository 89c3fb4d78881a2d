"""LangChain's standard chat model suites against a tiny LLaVA guardrail.

Tool calling, structured output and JSON mode are declared and run; the integration
tests among them that need a model able to follow a tool schema are marked xfail in
conftest.py (the tiny model has random weights; test_tool_calling.py covers the same
paths with forced decoding). ``tool_choice`` is declared unsupported: nothing forces a
call (see the README). Capabilities the guardrail's models do not have are declared as
such, which makes the suites skip their tests: PDF / audio / video inputs (image is
the only media type the LangChain integration passes through), remote image URLs
(the guardrail never fetches from the network), per-call model override (a
guardrail wraps one loaded model). Serialisation (``test_serdes``) is skipped by the
suite because a chat model holding a loaded model is not ``lc_serializable``, and
``test_stream_time`` because it needs recorded HTTP cassettes (VCR).

``test_image_inputs`` downloads a PNG from the internet with ``httpx.get``; these
tests run offline, so the download is served from a local PNG instead (the fixture
below), and the standard test then runs unchanged on that image.
"""

from __future__ import annotations

import functools
from typing import Any

import httpx
import pytest
from langchain_mars_guardrail import ChatMarsGuardrail
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from guardrail import Guardrail
from guardrail.testing import png_bytes, tiny_guardrail


@functools.cache
def shared_guardrail() -> Guardrail:
    return tiny_guardrail(
        "llava", name="lc-test", version="1.2.3", refusal_detector=lambda prompt, response: False
    )


class _Capabilities:
    @property
    def chat_model_class(self) -> type[ChatMarsGuardrail]:
        return ChatMarsGuardrail

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"guardrail": shared_guardrail()}  # answers of 8 tokens (max_new_tokens)

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return False  # tool_choice narrows the offer; nothing forces a call (see the README)

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False


class TestChatMarsGuardrailUnit(_Capabilities, ChatModelUnitTests):
    pass


class _OfflineImage:
    def __init__(self, url: str) -> None:
        self.url = url
        self.content = png_bytes(seed=7)


# The suite's async tests need pytest-asyncio; the mark is set on the class (the
# tests themselves are not ours to decorate), so its sync tests carry it too.
@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:The test <Function .*> is marked with '@pytest.mark.asyncio'")
class TestChatMarsGuardrailIntegration(_Capabilities, ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _offline_image_download(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def get(url: str, **kwargs: Any) -> _OfflineImage:
            if not url.startswith("https://raw.githubusercontent.com/langchain-ai/"):
                raise AssertionError(f"unexpected download of {url}")
            return _OfflineImage(url)

        monkeypatch.setattr(httpx, "get", get)
