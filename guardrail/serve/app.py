"""The FastAPI application: OpenAI-compatible chat completions with the guardrail's decision.

:func:`create_app` wires a :class:`~guardrail.serve.engine.ChatEngine` to HTTP:

* ``POST /v1/chat/completions`` (``stream=true``: server-sent events, OpenAI chunks,
  ``data: [DONE]``), ``GET /v1/models``;
* ``GET /health`` (the process answers), ``GET /ready`` (model and policy loaded and
  a self-test generation through the queue passed; chat requests get 503 before),
  ``GET /metrics`` (Prometheus);
* the admin API (:mod:`guardrail.serve.admin`) when an admin token is configured.

Every response to a completion carries the guardrail's decision under ``guardrail``
(:meth:`~guardrail.result.GuardrailResult.decision`); a stream carries it on its final
chunk. The rollout key is the ``X-Guardrail-Key`` header when present (set it at a
trusted gateway), else the request's ``user``. The generation spans join the
caller's trace: a ``traceparent`` header (W3C trace context) is the parent of the
request's server span, which is the parent of its ``chat`` span. Access logs are
structlog JSON lines without prompt or answer content.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from guardrail.errors import GuardrailError, InputError
from guardrail.logs import get_logger
from guardrail.result import GuardrailResult
from guardrail.serve.engine import ChatEngine, EngineRequest
from guardrail.serve.errors import (
    ModelNotFoundError,
    NotReadyError,
    RequestTimeoutError,
    ServerBusyError,
    describe,
    error_body,
)
from guardrail.serve.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from guardrail.serve.schema import (
    ChatCompletionRequest,
    GenerationSettings,
    chunk_body,
    completion_body,
    to_conversation,
)

__all__ = ["KEY_HEADER", "ServeConfig", "create_app"]

KEY_HEADER = "x-guardrail-key"
_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics"})


@dataclass(frozen=True)
class ServeConfig:
    """Server settings (the ``guardrail serve`` flags).

    ``model_name`` is the model id clients send and ``/v1/models`` lists;
    ``max_new_tokens`` the default answer length and ``max_tokens_limit`` the most a
    request may ask for; ``request_timeout_s`` bounds queueing plus generation;
    ``allow_remote_images`` lets ``image_url`` parts name http(s) URLs (off: only
    ``data:`` URIs); ``admin_token`` switches the admin API on.
    """

    model_name: str
    max_new_tokens: int = 128
    max_tokens_limit: int = 1024
    request_timeout_s: float = 60.0
    allow_remote_images: bool = False
    remote_image_max_bytes: int = 20 * 1024 * 1024
    remote_image_timeout_s: float = 10.0
    admin_token: str | None = None
    self_test: bool = True


def create_app(
    engine: ChatEngine,
    config: ServeConfig,
    *,
    logger: Any | None = None,
    metrics: ServerMetrics | None = None,
) -> FastAPI:
    """The server's ASGI app around ``engine`` (started and stopped with the app)."""
    log = logger if logger is not None else get_logger(component="serve")
    metrics = metrics or ServerMetrics(queue_depth=engine.queue_depth)
    guard = engine.guardrail
    tracer = guard.telemetry.tracer
    propagator = TraceContextTextMapPropagator()
    created = int(time.time())
    fetch = _fetcher(config) if config.allow_remote_images else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        task = asyncio.create_task(_self_test(app)) if config.self_test else None
        if task is None:
            app.state.ready, app.state.ready_error = True, None
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()
            await engine.stop()

    async def _self_test(app: FastAPI) -> None:
        try:
            result = await engine.self_test()
        except Exception as exc:
            app.state.ready_error = f"{type(exc).__name__}: {exc}"
            log.error("guardrail.serve.self_test_failed", error=app.state.ready_error)
            return
        app.state.self_test = result.decision()
        app.state.ready = True
        log.info("guardrail.serve.ready", model=config.model_name, policy=_policy_ref(guard))

    app = FastAPI(title="mars-guardrail", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ready, app.state.ready_error, app.state.self_test = False, None, None
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.add_middleware(_AccessLog, log=log, metrics=metrics)

    # ------------------------------------------------------------------ errors

    @app.exception_handler(GuardrailError)
    async def guardrail_error(request: Request, exc: GuardrailError) -> JSONResponse:
        status, body = describe(exc)
        headers = {}
        if isinstance(exc, ServerBusyError):
            headers["Retry-After"] = str(exc.retry_after)
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if status >= 500:
            log.error("guardrail.serve.error", error_type=type(exc).__name__, status=status)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}"
            for err in exc.errors()
        )
        return JSONResponse(
            error_body(f"invalid request: {problems}", "invalid_request_error"), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.error("guardrail.serve.crash", error_type=type(exc).__name__, error=repr(exc))
        status, body = describe(exc)
        return JSONResponse(body, status_code=status)

    # ------------------------------------------------------------------ operations

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if not app.state.ready:
            reason = app.state.ready_error or "the start-up self-test has not finished"
            return JSONResponse(
                error_body(f"not ready: {reason}", "service_unavailable"), status_code=503
            )
        return JSONResponse(
            {
                "status": "ready",
                "model": config.model_name,
                "mode": guard.mode,
                "policy": _policy_ref(guard),
                "self_test": app.state.self_test,
            }
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(config.model_name, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != config.model_name:
            raise ModelNotFoundError(
                f"this server serves the model {config.model_name!r} only; GET /v1/models lists it"
            )
        return _model_card(config.model_name, created)

    # ------------------------------------------------------------------ completions

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        started = time.perf_counter()
        if not app.state.ready:
            metrics.rejected.labels("not_ready").inc()
            raise NotReadyError("the server is starting (the self-test has not passed); retry")
        if body.model != config.model_name:
            raise ModelNotFoundError(
                f"this server serves the model {config.model_name!r}; set model to it "
                "(GET /v1/models lists it)"
            )
        why = body.unsupported()
        if why is not None:
            raise InputError(why)
        wanted = body.max_completion_tokens or body.max_tokens or config.max_new_tokens
        if wanted > config.max_tokens_limit:
            raise InputError(
                f"max_tokens {wanted} is over this server's limit of {config.max_tokens_limit}; "
                "ask for fewer tokens"
            )
        temperature = body.temperature or 0.0
        settings = GenerationSettings(
            max_new_tokens=wanted,
            temperature=temperature,
            top_p=body.top_p if temperature > 0 else None,
        )
        messages = await asyncio.to_thread(to_conversation, body.messages, fetch=fetch)
        parent = propagator.extract(carrier=dict(request.headers))
        span = tracer.start_span(
            "POST /v1/chat/completions",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": "POST",
                "url.path": "/v1/chat/completions",
                "gen_ai.request.model": config.model_name,
            },
        )
        engine_request = EngineRequest(
            messages=messages,
            settings=settings,
            key=request.headers.get(KEY_HEADER) or body.user,
            trace_context=trace.set_span_in_context(span, parent),
        )
        try:
            await asyncio.to_thread(engine.check, engine_request)
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                stream = engine.stream(engine_request)  # queued now: a full queue is a 429
                return EventSourceResponse(
                    _sse(stream, span, include_usage, started, request),
                    ping=15,
                    send_timeout=30,
                )
            result = await _wait(request, engine.submit(engine_request), config.request_timeout_s)
        except _Disconnected as exc:
            _end_span(span, exc)
            _count_rejection(exc)
            return Response(status_code=499)  # nobody reads it: the client is gone
        except BaseException as exc:
            _end_span(span, exc)
            _count_rejection(exc)
            raise
        _end_span(span, None)
        _finished(request, result, started)
        return completion_body(result, config.model_name)

    async def _sse(
        stream: AsyncIterator[str | GuardrailResult],
        span: Any,
        include_usage: bool,
        started: float,
        request: Request,
    ) -> AsyncIterator[str]:
        rid = uuid.uuid4().hex
        stamp = int(time.time())
        name = config.model_name
        sent = ""
        error: BaseException | None = None
        try:
            async with asyncio.timeout(config.request_timeout_s):
                yield json.dumps(chunk_body(rid, name, stamp, delta={"role": "assistant"}))
                result: GuardrailResult | None = None
                async for item in stream:
                    if isinstance(item, str):
                        sent += item
                        yield json.dumps(chunk_body(rid, name, stamp, delta={"content": item}))
                    else:
                        result = item
                if result is None:
                    raise GuardrailError("the engine ended the stream without a result")
                # What the stream could not send: the fail-closed refusal of a withheld
                # row, or text whose decoding changed when the last token arrived.
                rest = result.text[len(sent) :] if result.text.startswith(sent) else ""
                if rest:
                    yield json.dumps(chunk_body(rid, name, stamp, delta={"content": rest}))
                yield json.dumps(chunk_body(rid, name, stamp, result=result))
                if include_usage:
                    yield json.dumps(chunk_body(rid, name, stamp, result=result, usage_only=True))
                yield "[DONE]"
                _finished(request, result, started)
        except TimeoutError as exc:
            error = RequestTimeoutError(
                f"the request did not finish within {config.request_timeout_s:g} s"
            )
            error.__cause__ = exc
            yield json.dumps(describe(error)[1])
        except GuardrailError as exc:
            error = exc
            yield json.dumps(describe(exc)[1])
        except asyncio.CancelledError as exc:  # the client went away
            error = exc
            raise
        finally:
            await _close(stream)
            _end_span(span, error)
            if error is not None:
                _count_rejection(error)

    def _finished(request: Request, result: GuardrailResult, started: float) -> None:
        metrics.completed(result, time.perf_counter() - started)
        request.state.access = {
            "policy_version": result.policy_version,
            "rollout_arm": result.rollout_arm,
            "mode": result.mode,
            "intervened": result.intervened,
            "refused": result.refused,
            "finish_reason": result.finish_reason,
            "guardrail_request_id": result.request_id,
            "completion_tokens": result.usage.output_tokens,
        }

    def _count_rejection(exc: BaseException) -> None:
        if isinstance(exc, ServerBusyError):
            metrics.rejected.labels("queue_full").inc()
        elif isinstance(exc, RequestTimeoutError):
            metrics.rejected.labels("timeout").inc()
        elif isinstance(exc, (_Disconnected, asyncio.CancelledError)):
            metrics.rejected.labels("disconnect").inc()

    if config.admin_token:
        from guardrail.serve.admin import admin_router

        app.include_router(admin_router(guard, config.admin_token, log))
    return app


class _Disconnected(Exception):
    """The client closed the connection before its answer was ready."""


async def _wait(request: Request, work: Awaitable[GuardrailResult], timeout: float) -> Any:
    """``work``'s result; cancels it when the client disconnects or the timeout passes."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait(
            {task, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            return task.result()
        if gone in done:
            raise _Disconnected()
        raise RequestTimeoutError(
            f"the request did not finish within {timeout:g} s; retry later or ask for fewer tokens"
        )
    finally:
        for pending in (task, gone):
            if not pending.done():
                pending.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _close(stream: Any) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


def _end_span(span: Any, error: BaseException | None) -> None:
    if error is not None and not isinstance(error, asyncio.CancelledError):
        span.set_attribute("error.type", type(error).__name__)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.end()


def _policy_ref(guard: Any) -> str | None:
    if guard.rollout is not None:
        return repr(guard.rollout)
    return guard.policy.ref if guard.policy is not None else None


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "mars-guardrail"}


def _fetcher(config: ServeConfig) -> Callable[[str, str], bytes]:
    """Fetch http(s) images with a timeout and a size cap (remote images on)."""

    def fetch(url: str, where: str) -> bytes:
        import httpx

        data = bytearray()
        try:
            with httpx.Client(timeout=config.remote_image_timeout_s) as client:
                with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise InputError(
                            f"{where}: fetching the image URL gave HTTP {response.status_code}"
                        )
                    for chunk in response.iter_bytes():
                        data += chunk
                        if len(data) > config.remote_image_max_bytes:
                            raise InputError(
                                f"{where}: the image at the URL is over "
                                f"{config.remote_image_max_bytes} bytes; send a smaller one"
                            )
        except httpx.HTTPError as exc:
            raise InputError(
                f"{where}: the image URL could not be fetched ({type(exc).__name__}); send the "
                "image inline as a data: URI"
            ) from None
        return bytes(data)

    return fetch


class _AccessLog:
    """One structlog line per HTTP request: method, path, status, duration, ids and, for
    completions, the decision's metadata. Never the prompt, the answer or a header value
    other than the request id."""

    def __init__(self, app: Any, *, log: Any, metrics: ServerMetrics):
        self.app = app
        self.log = log
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        status = {"code": 500}
        state = scope.setdefault("state", {})

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in _ENDPOINTS or path.startswith("/admin/") else "other"
            self.metrics.http.labels(endpoint, str(status["code"])).inc()
            client = scope.get("client")
            self.log.info(
                "http.request",
                method=scope.get("method"),
                path=endpoint,
                status=status["code"],
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
                request_id=request_id,
                client=client[0] if client else None,
                **(state.get("access") or {}),
            )
