"""Intervention and refusal events, and the built-in sinks, on tiny real models."""

from __future__ import annotations

import http.server
import json
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image
from structlog.testing import capture_logs

from guardrail import Guardrail
from guardrail.errors import GuardrailError
from guardrail.observability.events import (
    CallbackSink,
    GuardrailEvent,
    InterventionEvent,
    JsonlSink,
    OpenTelemetrySink,
    RefusalEvent,
    StructlogSink,
    WebhookSink,
)

from .conftest import random_policy, tiny

STRONG = dict(tau=-10.0, lam=10.0, kappa=8.0)  # every prompt is steered
NEVER = dict(tau=100.0)  # no prompt crosses the gate
PROMPT = "Tell me about the weather on Mars."


def always_refuses(prompt: str, response: str) -> bool:
    return True


def never_refuses(prompt: str, response: str) -> bool:
    return False


def llama_guard(sinks: Sequence[Any] = (), **kwargs: Any) -> Guardrail:
    model, processor = tiny("llama")
    params = kwargs.pop("params", STRONG)
    policy = random_policy(model, processor, layer=1, **params)
    kwargs.setdefault("refusal_detector", never_refuses)
    return Guardrail(model, processor, policy, sinks=sinks, max_new_tokens=4, **kwargs)


def image(seed: int = 0) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy())


class Recorder:
    def __init__(self) -> None:
        self.events: list[GuardrailEvent] = []

    def emit(self, event: GuardrailEvent) -> None:
        self.events.append(event)


# ---------------------------------------------------------------------------- emission


def test_enforced_intervention_and_refusal_events_carry_the_result() -> None:
    sink = Recorder()
    guard = llama_guard([sink], refusal_detector=always_refuses)
    result = guard.generate(PROMPT)
    assert result.intervened and result.refused
    intervention, refusal = sink.events
    assert isinstance(intervention, InterventionEvent) and isinstance(refusal, RefusalEvent)
    for event in (intervention, refusal):
        assert event.request_id == result.request_id
        assert (event.policy_name, event.policy_version) == ("test", "1.0.0")
        assert event.mode == "enforce"
        assert event.layer == 1
        assert event.score == result.score
        assert event.strength == result.strength > 0
        assert event.refused is True
        assert event.latency_s == result.latency_s
        assert event.prompt is None and event.output is None  # no content capture by default
        assert event.rollout_arm is None
    assert intervention.intervened and intervention.would_intervene and intervention.tau == -10.0
    assert refusal.blocked is False and refusal.error is None
    assert [e.name for e in sink.events] == ["guardrail.intervention", "guardrail.refusal"]


def test_no_events_when_nothing_happened() -> None:
    sink = Recorder()
    guard = llama_guard([sink], params=NEVER)
    result = guard.generate(PROMPT)
    assert not result.intervened and not result.refused
    assert sink.events == []


def test_content_is_captured_only_when_switched_on() -> None:
    sink = Recorder()
    guard = llama_guard([sink], refusal_detector=always_refuses, capture_content=True)
    result = guard.generate(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    )
    assert {e.prompt for e in sink.events} == {f"Be brief.\n{PROMPT}"}
    assert {e.output for e in sink.events} == {result.text}


def test_shadow_mode_reports_would_intervene_without_changing_output() -> None:
    sink = Recorder()
    guard = llama_guard([sink])
    off = guard.generate(PROMPT, mode="off")
    shadow = guard.generate(PROMPT, mode="shadow")
    assert shadow.text == off.text and shadow.token_ids == off.token_ids
    assert not shadow.intervened and shadow.strength == 0.0
    (event,) = sink.events
    assert isinstance(event, InterventionEvent)
    assert event.mode == "shadow"
    assert event.would_intervene is True and event.intervened is False
    assert event.score == shadow.score and event.score > event.tau == -10.0

    quiet = Recorder()
    guard_below_gate = llama_guard([quiet], params=NEVER)
    guard_below_gate.generate(PROMPT, mode="shadow")
    assert quiet.events == []


def test_fail_closed_block_is_a_refusal_event_with_the_reason() -> None:
    model, processor = tiny("llava")
    policy = random_policy(model, processor, layer=1, modalities=(), **STRONG)  # no image offset
    sink = Recorder()
    guard = Guardrail(model, processor, policy, sinks=[sink], max_new_tokens=3)
    result = guard.generate(
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": image()}, {"type": "text", "text": "What?"}],
            }
        ]
    )
    assert result.refused and result.finish_reason == "guardrail_error"
    (event,) = sink.events  # a block is not a MARS intervention
    assert isinstance(event, RefusalEvent)
    assert event.blocked is True
    assert event.error == result.error and "re-centring offset for image" in event.error
    assert event.modalities == ["image"]


def test_batch_events_follow_rows() -> None:
    sink = Recorder()
    guard = llama_guard([sink], refusal_detector=lambda p, r: "Mars" in p)
    results = guard.generate([PROMPT, "Hi"])
    refusals = [e for e in sink.events if isinstance(e, RefusalEvent)]
    interventions = [e for e in sink.events if isinstance(e, InterventionEvent)]
    assert [e.request_id for e in interventions] == [r.request_id for r in results]
    assert [e.request_id for e in refusals] == [results[0].request_id]


def test_per_call_sinks_add_to_the_configured_ones() -> None:
    configured, per_call = Recorder(), Recorder()
    guard = llama_guard([configured])
    guard.generate(PROMPT, sinks=[per_call])
    guard.generate(PROMPT)
    assert len(configured.events) == 2
    assert len(per_call.events) == 1
    assert per_call.events[0] is configured.events[0]


def test_stream_and_async_calls_emit_events() -> None:
    import asyncio

    sink = Recorder()
    guard = llama_guard([sink])
    *chunks, result = list(guard.stream(PROMPT, sinks=[CallbackSink(lambda e: None)]))
    assert "".join(chunks) == result.text
    asyncio.run(guard.agenerate(PROMPT))
    assert [e.kind for e in sink.events] == ["intervention", "intervention"]
    assert sink.events[0].request_id == result.request_id


def test_a_raising_sink_never_breaks_generation() -> None:
    class Broken:
        def emit(self, event: GuardrailEvent) -> None:
            raise RuntimeError("sink is down")

    after = Recorder()
    guard = llama_guard([Broken(), after], refusal_detector=always_refuses)
    baseline = llama_guard(refusal_detector=always_refuses).generate(PROMPT)
    with capture_logs() as logs:
        result = guard.generate(PROMPT)
    assert result.text == baseline.text and result.score == baseline.score
    assert guard.events.sink_errors == 2  # one intervention, one refusal
    assert [e.kind for e in after.events] == ["intervention", "refusal"]  # later sinks still served
    warnings = [log for log in logs if log["event"] == "guardrail.sink_error"]
    assert len(warnings) == 2 and all(log["log_level"] == "warning" for log in warnings)
    assert warnings[0]["sink"] == "Broken" and "sink is down" in warnings[0]["error"]
    assert warnings[0]["request_id"] == result.request_id
    assert (warnings[0]["policy_version"], warnings[0]["mode"]) == ("1.0.0", "enforce")


def test_sinks_without_emit_are_rejected_up_front() -> None:
    with pytest.raises(GuardrailError, match="CallbackSink"):
        llama_guard([print])
    with pytest.raises(GuardrailError, match="needs a callable"):
        CallbackSink("not callable")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- sinks


def test_jsonl_sink_appends_one_object_per_line_from_many_threads(tmp_path) -> None:
    path = tmp_path / "sub" / "events.jsonl"
    sink = JsonlSink(path)
    guard = llama_guard([sink], refusal_detector=always_refuses)
    result = guard.generate(PROMPT)
    event = RefusalEvent(request_id="r", mode="enforce", refused=True)

    def spam() -> None:
        for _ in range(50):
            sink.emit(event)

    threads = [threading.Thread(target=spam) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sink.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3 + 8 * 50  # the request's decision record and events, then the spam
    records = [json.loads(line) for line in lines]
    assert [r["kind"] for r in records[:3]] == ["decision", "intervention", "refusal"]
    assert {r["request_id"] for r in records[:3]} == {result.request_id}
    assert all(r == records[3] for r in records[3:])
    assert RefusalEvent.model_validate_json(lines[2]).request_id == result.request_id
    with pytest.raises(GuardrailError, match="closed"):
        sink.emit(event)
    # Appends, never truncates.
    reopened = JsonlSink(path)
    reopened.emit(event)
    reopened.close()
    assert len(path.read_text().splitlines()) == len(lines) + 1


def test_structlog_sink_logs_each_event() -> None:
    guard = llama_guard([StructlogSink()], refusal_detector=always_refuses)
    with capture_logs() as logs:
        result = guard.generate(PROMPT)
    entries = [log for log in logs if log["event"].startswith("guardrail.") and "request_id" in log]
    names = [
        log["event"]
        for log in entries
        if log["event"] in ("guardrail.intervention", "guardrail.refusal")
    ]
    assert names == ["guardrail.intervention", "guardrail.refusal"]
    refusal = next(log for log in entries if log["event"] == "guardrail.refusal")
    assert refusal["request_id"] == result.request_id
    assert refusal["policy_version"] == "1.0.0" and refusal["log_level"] == "info"
    assert "prompt" not in refusal


def test_opentelemetry_sink_adds_events_to_the_callers_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    guard = llama_guard(
        [OpenTelemetrySink()], refusal_detector=always_refuses, tracer_provider=provider
    )
    with provider.get_tracer("app").start_as_current_span("handle request"):
        result = guard.generate(PROMPT)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    app, chat = spans["handle request"], spans["chat llama"]
    assert [e.name for e in app.events] == ["guardrail.intervention", "guardrail.refusal"]
    attrs = dict(app.events[1].attributes)
    assert attrs["guardrail.request_id"] == result.request_id
    assert attrs["guardrail.blocked"] is False
    assert attrs["guardrail.span_id"] == format(chat.context.span_id, "016x")
    # Outside any recording span the sink is a no-op.
    OpenTelemetrySink().emit(RefusalEvent(request_id="r", mode="enforce", refused=True))


# ---------------------------------------------------------------------------- webhook


class _Server:
    """A local HTTP server on 127.0.0.1 recording JSON bodies; ``behaviour(n)`` picks each reply."""

    def __init__(self, behaviour: Any) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    outer.attempts += 1
                    n = outer.attempts
                status = behaviour(n)
                if status == 200:
                    with outer.lock:
                        outer.bodies.append(json.loads(body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/events"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory() -> Iterator[Any]:
    servers: list[_Server] = []

    def make(behaviour: Any) -> _Server:
        servers.append(_Server(behaviour))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


class TimedSink:
    """Measures how long the wrapped sink's emit takes (the time it adds to a request)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.durations: list[float] = []

    def emit(self, event: GuardrailEvent) -> None:
        start = time.perf_counter()
        self.inner.emit(event)
        self.durations.append(time.perf_counter() - start)


def test_flaky_webhook_is_retried_and_does_not_change_results(server_factory) -> None:
    server = server_factory(lambda n: 500 if n <= 2 else 200)  # first two attempts fail
    webhook = WebhookSink(server.url, backoff=0.01, max_attempts=5)
    timed = TimedSink(webhook)
    guard = llama_guard([timed], refusal_detector=always_refuses)
    baseline = llama_guard(refusal_detector=always_refuses).generate(PROMPT)
    result = guard.generate(PROMPT)
    assert (result.text, result.score, result.strength) == (
        baseline.text,
        baseline.score,
        baseline.strength,
    )
    assert webhook.flush(timeout=10)
    assert (webhook.sent, webhook.retries, webhook.failed, webhook.dropped) == (2, 2, 0, 0)
    assert server.attempts == 4
    assert [b["kind"] for b in server.bodies] == ["intervention", "refusal"]
    assert {b["request_id"] for b in server.bodies} == {result.request_id}
    assert max(timed.durations) < 0.01
    assert webhook.close(timeout=5)


def test_slow_webhook_never_blocks_emit_and_counts_drops(server_factory) -> None:
    release = threading.Event()

    def slow(n: int) -> int:
        release.wait(10)
        return 200

    server = server_factory(slow)
    webhook = WebhookSink(server.url, queue_size=2, timeout=15)
    timed = TimedSink(webhook)
    guard = llama_guard([timed], refusal_detector=always_refuses)
    baseline = llama_guard(refusal_detector=always_refuses).generate([PROMPT, "Hi"])
    results = [guard.generate([PROMPT, "Hi"]) for _ in range(3)]  # 12 events
    assert all([r.text for r in rs] == [b.text for b in baseline] for rs in results)
    assert len(timed.durations) == 12
    assert max(timed.durations) < 0.01
    assert statistics.median(timed.durations) < 0.001
    # One event is in flight, two wait in the queue, the rest were dropped.
    assert webhook.dropped >= 12 - 3
    assert webhook.flush(timeout=0.05) is False  # still blocked on the server
    release.set()
    assert webhook.flush(timeout=10)
    assert webhook.sent + webhook.dropped == 12 and webhook.failed == 0
    assert len(server.bodies) == webhook.sent
    assert webhook.close(timeout=5)
    webhook.emit(RefusalEvent(request_id="late", mode="enforce", refused=True))
    assert webhook.sent + webhook.dropped == 13


def test_webhook_gives_up_after_max_attempts_and_does_not_retry_client_errors(
    server_factory,
) -> None:
    down = server_factory(lambda n: 503)
    webhook = WebhookSink(down.url, backoff=0.01, max_attempts=3)
    event = RefusalEvent(request_id="r1", mode="enforce", refused=True)
    with capture_logs() as logs:
        webhook.emit(event)
        assert webhook.flush(timeout=10)
    assert (webhook.sent, webhook.retries, webhook.failed) == (0, 2, 1)
    assert down.attempts == 3
    assert any(
        log["event"] == "guardrail.webhook_failed" and log["request_id"] == "r1" for log in logs
    )
    webhook.close()

    rejected = server_factory(lambda n: 400)
    webhook = WebhookSink(rejected.url, backoff=0.01, max_attempts=3)
    webhook.emit(event)
    assert webhook.flush(timeout=10)
    assert (webhook.sent, webhook.retries, webhook.failed) == (0, 0, 1)
    assert rejected.attempts == 1
    webhook.close()


def test_webhook_retries_connection_errors() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    webhook = WebhookSink(f"http://127.0.0.1:{port}/", backoff=0.01, max_attempts=2, timeout=1)
    webhook.emit(RefusalEvent(request_id="r", mode="enforce", refused=True))
    assert webhook.flush(timeout=10)
    assert (webhook.sent, webhook.retries, webhook.failed) == (0, 1, 1)
    webhook.close()


def test_webhook_rejects_bad_configuration() -> None:
    with pytest.raises(GuardrailError, match="http"):
        WebhookSink("ftp://example.invalid/")
    with pytest.raises(GuardrailError, match="queue_size"):
        WebhookSink("http://127.0.0.1:9/", queue_size=0)
