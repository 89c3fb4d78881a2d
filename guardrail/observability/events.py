"""Guardrail events: what MARS did to a request, delivered to pluggable sinks.

Two kinds of event, both pydantic models:

* :class:`InterventionEvent` - MARS steered the request (enforce mode, strength > 0),
  or in shadow mode *would have* steered it (its score is above the policy's gate
  ``tau``; ``would_intervene=True``, ``intervened=False``, output unchanged).
* :class:`RefusalEvent` - the returned output is a refusal, including fail-closed
  blocks (``blocked=True``, ``error`` carries the reason).
* :class:`DecisionRecord` - one per request, whatever happened: the decision log a
  rollout report compares arms on (requests that neither intervene nor refuse write
  no other event). Sinks opt in with ``decision_records=True``; :class:`JsonlSink`
  does by default, the others do not.

A sink is anything with ``emit(event) -> None`` (:class:`EventSink`), and optionally
``close()``. Built-in sinks: :class:`StructlogSink`, :class:`OpenTelemetrySink`,
:class:`JsonlSink`, :class:`WebhookSink` and :class:`CallbackSink`. Sinks are
configured on the guardrail (``Guardrail(..., sinks=[...])``) and per call
(``generate(..., sinks=[...])`` adds to them). A sink that raises never breaks
generation: :class:`EventDispatcher` catches the error, counts it
(``sink_errors``) and logs a warning.

The prompt and output text are put on events only when content capture is switched
on (``Guardrail(..., capture_content=True)``); by default events carry metadata only.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field
from tenacity import (
    RetryCallState,
)

from guardrail.errors import GuardrailError
from guardrail.http import HTTPStatusError, retrying, transient
from guardrail.logs import get_logger, request_logger

if TYPE_CHECKING:
    from guardrail.result import GuardrailResult

__all__ = [
    "CallbackSink",
    "DecisionRecord",
    "EventDispatcher",
    "EventSink",
    "GuardrailEvent",
    "InterventionEvent",
    "JsonlSink",
    "OpenTelemetrySink",
    "RefusalEvent",
    "StructlogSink",
    "WebhookSink",
    "build_events",
    "would_intervene",
]


# ---------------------------------------------------------------------------- events


class GuardrailEvent(BaseModel):
    """Fields shared by every guardrail event."""

    model_config = ConfigDict(frozen=True)

    kind: str
    request_id: str
    timestamp: datetime = Field(default_factory=lambda: datetime.now(UTC))
    policy_name: str | None = None
    policy_version: str | None = None
    mode: str
    layer: int | None = None
    score: float | None = None
    strength: float = 0.0
    modalities: list[str] = Field(default_factory=list)
    refused: bool = Field(description="whether the returned output is a refusal")
    latency_s: float = 0.0
    error: str | None = Field(None, description="why the policy could not be applied, if so")
    prompt: str | None = Field(None, description="the prompt's text; only with content capture")
    output: str | None = Field(None, description="the output text; only with content capture")
    rollout_arm: str | None = Field(None, description="canary / shadow arm that served the request")
    trace_id: str | None = Field(None, description="hex id of the generation span's trace")
    span_id: str | None = Field(None, description="hex id of the generation span")

    @property
    def name(self) -> str:
        """The event's name in logs and spans: ``guardrail.<kind>``."""
        return f"guardrail.{self.kind}"


class InterventionEvent(GuardrailEvent):
    """MARS steered the request, or in shadow mode would have."""

    kind: Literal["intervention"] = "intervention"
    intervened: bool = Field(description="True when steering changed the generation (enforce mode)")
    would_intervene: bool = Field(
        True, description="the score crossed the gate; in shadow mode the output was left unchanged"
    )
    tau: float | None = Field(None, description="the policy's gate the score was compared with")


class RefusalEvent(GuardrailEvent):
    """The returned output refuses the request."""

    kind: Literal["refusal"] = "refusal"
    refused: bool = True
    intervened: bool = False
    blocked: bool = Field(
        False,
        description="fail-closed: the policy could not be applied and the request was blocked",
    )


class DecisionRecord(GuardrailEvent):
    """The guardrail's decision on one request, written for every request."""

    kind: Literal["decision"] = "decision"
    intervened: bool = Field(description="steering changed the generation (enforce mode)")
    would_intervene: bool = Field(
        False, description="the score crossed the gate (in shadow mode the output was unchanged)"
    )
    blocked: bool = Field(False, description="fail-closed: the request was blocked")


def would_intervene(result: GuardrailResult, tau: float | None) -> bool:
    """Whether MARS steered ``result`` (enforce) or would have (shadow: score above ``tau``).

    Fail-closed blocks are not interventions (nothing was steered); they are refusals.
    """
    if result.error is not None and result.finish_reason == "guardrail_error":
        return False
    if result.mode == "enforce":
        return result.strength > 0
    if result.mode == "shadow":
        if result.would_intervene:
            return True
        return result.score is not None and tau is not None and result.score > tau
    return False


def build_events(
    results: Sequence[GuardrailResult],
    *,
    tau: float | None,
    prompts: Sequence[str | None] | None = None,
    capture_content: bool = False,
    rollout_arm: str | None = None,
    span_ids: Sequence[tuple[str, str] | None] | None = None,
) -> list[GuardrailEvent]:
    """The events of a batch of results, in row order: each request's decision record,
    then its intervention and refusal events."""
    events: list[GuardrailEvent] = []
    for row, result in enumerate(results):
        ids = span_ids[row] if span_ids is not None else None
        common: dict[str, Any] = dict(
            request_id=result.request_id,
            policy_name=result.policy_name,
            policy_version=result.policy_version,
            mode=result.mode,
            layer=result.layer,
            score=result.score,
            strength=result.strength,
            modalities=list(result.modalities),
            refused=result.refused,
            latency_s=result.latency_s,
            error=result.error,
            rollout_arm=rollout_arm or result.rollout_arm,
            trace_id=ids[0] if ids else None,
            span_id=ids[1] if ids else None,
        )
        if capture_content:
            common["prompt"] = prompts[row] if prompts is not None else None
            common["output"] = result.text
        gate = tau if tau is not None else result.tau
        events.append(
            DecisionRecord(
                **common,
                intervened=result.intervened and result.finish_reason != "guardrail_error",
                would_intervene=would_intervene(result, tau),
                blocked=result.finish_reason == "guardrail_error",
            )
        )
        if would_intervene(result, tau):
            events.append(
                InterventionEvent(
                    **common, intervened=result.intervened, would_intervene=True, tau=gate
                )
            )
        for shadow in result.shadow:  # rollout shadow versions: scored, never applied
            if shadow.would_intervene:
                shadow_fields = {
                    **common,
                    "policy_name": shadow.policy_name,
                    "policy_version": shadow.policy_version,
                    "mode": "shadow",
                    "layer": shadow.layer,
                    "score": shadow.score,
                    "strength": 0.0,
                    "rollout_arm": "shadow",
                }
                events.append(
                    InterventionEvent(**shadow_fields, intervened=False, would_intervene=True)
                )
        if result.refused:
            blocked = result.finish_reason == "guardrail_error"
            events.append(
                RefusalEvent(
                    **common,
                    intervened=result.intervened and not blocked,
                    blocked=blocked,
                )
            )
    return events


# ---------------------------------------------------------------------------- sinks


@runtime_checkable
class EventSink(Protocol):
    """Anything that accepts guardrail events. ``close()`` is optional."""

    def emit(self, event: GuardrailEvent) -> None: ...


class EventDispatcher:
    """Delivers events to sinks; a sink that raises is counted and logged, never raised."""

    def __init__(self, sinks: Iterable[EventSink] = (), *, capture_content: bool = False):
        self.sinks: list[EventSink] = list(sinks)
        for sink in self.sinks:
            _check_sink(sink)
        self.capture_content = capture_content
        self.sink_errors = 0
        self._lock = threading.Lock()

    def dispatch(self, events: Iterable[GuardrailEvent], extra: Sequence[EventSink] = ()) -> None:
        for sink in extra:
            _check_sink(sink)
        sinks = [*self.sinks, *extra]
        if not sinks:
            return
        for event in events:
            for sink in sinks:
                if event.kind == "decision" and not getattr(sink, "decision_records", False):
                    continue
                try:
                    sink.emit(event)
                except Exception as exc:  # a sink must never break generation
                    with self._lock:
                        self.sink_errors += 1
                    request_logger(
                        event.request_id, policy_version=event.policy_version, mode=event.mode
                    ).warning(
                        "guardrail.sink_error",
                        sink=type(sink).__name__,
                        event_kind=event.kind,
                        error=repr(exc),
                    )


def _check_sink(sink: Any) -> None:
    if not callable(getattr(sink, "emit", None)):
        raise GuardrailError(
            f"sink {sink!r} has no emit(event) method; wrap a function as CallbackSink(fn)"
        )


def _span_attributes(event: GuardrailEvent) -> dict[str, Any]:
    """Event fields as OpenTelemetry attribute values (primitives and lists, no None)."""
    out: dict[str, Any] = {}
    for key, value in event.model_dump(mode="json", exclude={"kind"}).items():
        if value is None or (isinstance(value, list) and not value):
            continue
        out[f"guardrail.{key}"] = value
    return out


class CallbackSink:
    """Calls ``fn(event)`` for every event."""

    def __init__(self, fn: Callable[[GuardrailEvent], Any], *, decision_records: bool = False):
        self.decision_records = decision_records
        if not callable(fn):
            raise GuardrailError(f"CallbackSink needs a callable, got {type(fn).__name__}")
        self.fn = fn

    def emit(self, event: GuardrailEvent) -> None:
        self.fn(event)


class StructlogSink:
    """Logs each event with structlog (``guardrail.intervention`` / ``guardrail.refusal``).

    Uses the library logger unless ``logger`` is given; never configures structlog.
    """

    def __init__(
        self, logger: Any | None = None, *, level: str = "info", decision_records: bool = False
    ):
        self.decision_records = decision_records
        self.logger = logger if logger is not None else get_logger()
        self.level = level

    def emit(self, event: GuardrailEvent) -> None:
        fields = event.model_dump(mode="json", exclude={"kind"}, exclude_none=True)
        getattr(self.logger, self.level)(event.name, **fields)


class OpenTelemetrySink:
    """Adds each event as a span event on the span current where the guardrail was called.

    Events are dispatched in the caller's context after the guardrail's own ``chat``
    span has ended, so they land on the application's span (a request handler's, a
    LangChain run's); the ``chat`` span itself already carries ``guardrail.refusal``.
    Without a recording span this sink does nothing.
    """

    def __init__(self, span: Any | None = None, *, decision_records: bool = False):
        self.decision_records = decision_records
        self.span = span

    def emit(self, event: GuardrailEvent) -> None:
        from opentelemetry import trace

        span = self.span if self.span is not None else trace.get_current_span()
        if not span.is_recording():
            return
        timestamp = int(event.timestamp.timestamp() * 1e9)
        span.add_event(event.name, attributes=_span_attributes(event), timestamp=timestamp)


class JsonlSink:
    """Appends each event as one JSON object per line to ``path`` (thread-safe, flushed).

    Writes a :class:`DecisionRecord` for every request by default (the log
    ``guardrail rollout report`` compares arms on); ``decision_records=False`` keeps
    only intervention and refusal events.
    """

    def __init__(self, path: str | os.PathLike[str], *, decision_records: bool = True):
        self.decision_records = decision_records
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file: Any = self.path.open("a", encoding="utf-8")

    def emit(self, event: GuardrailEvent) -> None:
        line = event.model_dump_json() + "\n"
        with self._lock:
            if self._file is None:
                raise GuardrailError(f"JsonlSink({str(self.path)!r}) is closed; create a new sink")
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


_CLOSE = object()


class WebhookSink:
    """POSTs each event as JSON to ``url`` from a background thread.

    ``emit`` only puts the event on a bounded queue: it never blocks and never
    raises. A daemon thread drains the queue and delivers each event with
    exponential-backoff retries (tenacity) on connection errors, timeouts and HTTP
    408 / 429 / 5xx; other 4xx answers fail at once. Counters: ``sent``,
    ``retries`` (re-attempts made), ``failed`` (events given up on) and ``dropped``
    (events refused because the queue was full or the sink closed).

    Uses the standard library's ``urllib``; ``flush(timeout)`` waits for the queue
    to drain, ``close(timeout)`` flushes and stops the thread.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        max_attempts: int = 4,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
        queue_size: int = 1000,
        decision_records: bool = False,
    ):
        self.decision_records = decision_records
        if not url.startswith(("http://", "https://")):
            raise GuardrailError(f"webhook url {url!r} must start with http:// or https://")
        if max_attempts < 1:
            raise GuardrailError(f"max_attempts={max_attempts} must be at least 1")
        if queue_size < 1:
            raise GuardrailError(f"queue_size={queue_size} must be at least 1")
        self.url = url
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.sent = 0
        self.retries = 0
        self.failed = 0
        self.dropped = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self._closed = False
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="guardrail-webhook", daemon=True)
        self._thread.start()

    def emit(self, event: GuardrailEvent) -> None:
        with self._lock:
            if self._closed:
                self.dropped += 1
                return
            try:
                self._queue.put_nowait(event)
            except queue.Full:
                self.dropped += 1
                return
            self._pending += 1

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued event is delivered or given up; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def close(self, timeout: float | None = 5.0) -> bool:
        """Flush, then stop the delivery thread. Events emitted afterwards are dropped."""
        with self._lock:
            if self._closed:
                return not self._pending
            self._closed = True
        drained = self.flush(timeout)
        if not drained:
            self._abort.set()  # cut retry back-off short; the rest fail
        self._queue.put(_CLOSE)
        self._thread.join(timeout)
        return drained

    # ------------------------------------------------------------------ delivery thread

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                return
            ok = self._deliver(item)
            with self._idle:
                if ok:
                    self.sent += 1
                else:
                    self.failed += 1
                self._pending -= 1
                self._idle.notify_all()

    def _deliver(self, event: GuardrailEvent) -> bool:
        body = event.model_dump_json().encode("utf-8")

        def count_retry(state: RetryCallState) -> None:
            with self._lock:
                self.retries += 1

        try:
            retrying(
                attempts=self.max_attempts,
                backoff=self.backoff,
                max_backoff=self.max_backoff,
                retry_if=lambda exc: transient(exc) and not self._abort.is_set(),
                before_sleep=count_retry,
                sleep=self._sleep,
            )(self._post, body)
            return True
        except Exception as exc:
            get_logger(request_id=event.request_id).warning(
                "guardrail.webhook_failed", url=self.url, error=repr(exc)
            )
            return False

    def _sleep(self, seconds: float) -> None:
        self._abort.wait(seconds)  # back-off that close() can cut short

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            if transient(HTTPStatusError(self.url, exc.code)):
                raise HTTPStatusError(self.url, exc.code, f"from {self.url}") from exc
            raise GuardrailError(f"webhook {self.url} rejected the event: HTTP {exc.code}") from exc
