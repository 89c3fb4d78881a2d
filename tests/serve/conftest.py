"""A live uvicorn server on 127.0.0.1 and a free port, around a tiny guardrail."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")

from guardrail.serve import ServeConfig, TransformersEngine, create_app  # noqa: E402
from guardrail.serve.server import BackgroundServer  # noqa: E402
from guardrail.testing import png_bytes, tiny_guardrail  # noqa: E402

MODEL = "tiny"


class Live:
    """A running server: its URL, engine and app."""

    def __init__(self, server: BackgroundServer, engine: TransformersEngine, app: Any):
        self.server = server
        self.url = server.url
        self.engine = engine
        self.app = app

    def openai(self, **kwargs: Any) -> Any:
        import openai

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 30)
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", **kwargs)

    def post(self, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
        kwargs.setdefault("timeout", 30)
        return httpx.post(self.url + "/v1/chat/completions", json=body, **kwargs)

    def wait_batches(self, count: int, timeout: float = 20.0) -> None:
        """Wait until the engine has run ``count`` batches in all."""
        deadline = time.monotonic() + timeout
        while len(self.engine.history) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.engine.history)} batches ran, expected {count}")
            time.sleep(0.02)


@contextmanager
def live_server(
    guard: Any = None,
    *,
    engine: dict[str, Any] | None = None,
    logger: Any = None,
    ready: bool = True,
    **config: Any,
) -> Iterator[Live]:
    guard = guard if guard is not None else tiny_guardrail("llama")
    eng = TransformersEngine(guard, **(engine or {}))
    config.setdefault("model_name", MODEL)
    app = create_app(eng, ServeConfig(**config), logger=logger)
    with BackgroundServer(app) as server:
        live = Live(server, eng, app)
        if ready:
            deadline = time.monotonic() + 30
            while httpx.get(server.url + "/ready", timeout=5).status_code != 200:
                if time.monotonic() > deadline:
                    raise AssertionError("the server did not become ready")
                time.sleep(0.02)
        yield live


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command gets as far as loading a model."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("guardrail.cli.common.load_model", refuse)


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    """Run the CLI with ``--json``; its exit code and the last JSON line it printed."""
    from guardrail.cli import main

    code = main([*argv, "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])


def user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


def data_uri(seed: int = 1, size: int = 32) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(seed, size)).decode()


@pytest.fixture(scope="module")
def llava_server() -> Iterator[Live]:
    """A tiny LLaVA (text, images, video frames) behind the server."""
    with live_server(tiny_guardrail("llava")) as live:
        yield live
