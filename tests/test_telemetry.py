"""OpenTelemetry spans and metrics, captured with the SDK's in-memory exporter and reader."""

from __future__ import annotations

import json
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from structlog.testing import capture_logs

from guardrail import Guardrail
from guardrail.errors import InputError
from guardrail.logs import get_logger, request_logger
from guardrail.observability.telemetry import CAPTURE_CONTENT_ENV, model_name

from .conftest import random_policy, tiny
from .test_events import PROMPT, STRONG, Recorder, always_refuses, image, never_refuses


class Otel:
    """A TracerProvider and MeterProvider of our own, with in-memory export."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self, name: str | None = None) -> list[Any]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        out = []
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == metric:
                        out.extend((m.unit, p) for p in m.data.data_points)
        return out

    def by_mode(self, metric: str) -> dict[str, Any]:
        return {dict(p.attributes)["guardrail.mode"]: p for _, p in self.points(metric)}


@pytest.fixture
def otel() -> Otel:
    return Otel()


def guard_for(otel: Otel, arch: str = "llama", **kwargs: Any) -> Guardrail:
    model, processor = tiny(arch)
    params = kwargs.pop("params", STRONG)
    policy = random_policy(
        model, processor, layer=1, modalities=kwargs.pop("modalities", ()), **params
    )
    kwargs.setdefault("refusal_detector", never_refuses)
    return Guardrail(
        model,
        processor,
        policy,
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
        max_new_tokens=4,
        **kwargs,
    )


def test_one_span_per_generation_with_genai_and_guardrail_attributes(otel: Otel) -> None:
    guard = guard_for(otel, refusal_detector=always_refuses)
    result = guard.generate(PROMPT, temperature=0.0)
    (span,) = otel.spans()
    assert span.name == "chat llama"
    assert span.kind is SpanKind.INTERNAL
    assert span.status.status_code is StatusCode.UNSET
    assert span.instrumentation_scope.name == "guardrail"
    assert dict(span.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "transformers",
        "gen_ai.request.model": "llama",
        "gen_ai.request.max_tokens": 4,
        "gen_ai.request.temperature": 0.0,
        "gen_ai.response.id": result.request_id,
        "gen_ai.response.finish_reasons": (result.finish_reason,),
        "gen_ai.usage.input_tokens": result.usage.input_tokens,
        "gen_ai.usage.output_tokens": result.usage.output_tokens,
        "guardrail.policy.name": "test",
        "guardrail.policy.version": "1.0.0",
        "guardrail.mode": "enforce",
        "guardrail.layer": 1,
        "guardrail.score": result.score,
        "guardrail.strength": result.strength,
        "guardrail.intervened": True,
        "guardrail.refused": True,
    }
    assert result.usage.output_tokens == 4
    (event,) = span.events
    assert event.name == "guardrail.refusal"
    assert dict(event.attributes) == {"guardrail.blocked": False}


def test_no_refusal_event_without_refusal_and_max_tokens_override(otel: Otel) -> None:
    guard = guard_for(otel, model_name="my-model")
    guard.generate(PROMPT, max_new_tokens=2)
    (span,) = otel.spans()
    assert span.name == "chat my-model"
    assert span.attributes["gen_ai.request.model"] == "my-model"
    assert span.attributes["gen_ai.request.max_tokens"] == 2
    assert span.attributes["guardrail.refused"] is False
    assert span.events == ()


def test_fail_closed_span_carries_the_error_and_refusal_event(otel: Otel) -> None:
    guard = guard_for(otel, "llava")  # policy without an image offset
    parts = [{"type": "image", "image": image()}, {"type": "text", "text": "What?"}]
    result = guard.generate([{"role": "user", "content": parts}])
    (span,) = otel.spans()
    assert span.name == "chat llava"
    assert span.attributes["gen_ai.response.finish_reasons"] == ("guardrail_error",)
    assert span.attributes["guardrail.error"] == result.error
    (event,) = span.events
    assert event.name == "guardrail.refusal"
    assert dict(event.attributes) == {"guardrail.blocked": True, "guardrail.error": result.error}


def test_batch_gives_one_sibling_span_per_row_under_the_callers_span(otel: Otel) -> None:
    guard = guard_for(otel, refusal_detector=lambda p, r: "Mars" in p)
    tracer = otel.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("request") as parent:
        results = guard.generate([PROMPT, "Hi"])
    chats = otel.spans("chat llama")
    assert len(chats) == 2
    assert [s.attributes["gen_ai.response.id"] for s in chats] == [r.request_id for r in results]
    assert [s.attributes["gen_ai.usage.input_tokens"] for s in chats] == [
        r.usage.input_tokens for r in results
    ]
    assert all(s.parent.span_id == parent.get_span_context().span_id for s in chats)
    assert [len(s.events) for s in chats] == [1, 0]


def test_stream_span_is_a_child_of_the_callers_span(otel: Otel) -> None:
    guard = guard_for(otel)
    tracer = otel.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("request") as parent:
        *_, result = list(guard.stream(PROMPT))
    (chat,) = otel.spans("chat llama")
    assert chat.parent is not None and chat.parent.span_id == parent.get_span_context().span_id
    assert chat.attributes["gen_ai.response.id"] == result.request_id


def test_exception_is_recorded_on_the_span(otel: Otel) -> None:
    guard = guard_for(otel)
    with pytest.raises(InputError):
        guard.generate([{"role": "user", "content": [{"type": "audio"}]}])
    (span,) = otel.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "InputError"
    assert [e.name for e in span.events] == ["exception"]
    assert otel.points("guardrail.requests") == []


def test_metrics_are_labelled_by_policy_and_mode(otel: Otel) -> None:
    guard = guard_for(otel, refusal_detector=always_refuses)
    enforced = guard.generate([PROMPT, "Hi"])
    shadow = guard.generate(PROMPT, mode="shadow")
    labels = {"guardrail.policy.name": "test", "guardrail.policy.version": "1.0.0"}

    requests = otel.by_mode("guardrail.requests")
    assert {mode: p.value for mode, p in requests.items()} == {"enforce": 2, "shadow": 1}
    assert dict(requests["enforce"].attributes) == {**labels, "guardrail.mode": "enforce"}
    interventions = otel.by_mode("guardrail.interventions")  # shadow: would have steered
    assert {mode: p.value for mode, p in interventions.items()} == {"enforce": 2, "shadow": 1}
    refusals = otel.by_mode("guardrail.refusals")
    assert {mode: p.value for mode, p in refusals.items()} == {"enforce": 2, "shadow": 1}

    scores = otel.by_mode("guardrail.score")
    assert scores["enforce"].count == 2
    assert scores["enforce"].sum == pytest.approx(sum(r.score for r in enforced))
    assert scores["shadow"].sum == pytest.approx(shadow.score)
    latency = otel.by_mode("guardrail.latency")
    assert latency["enforce"].sum == pytest.approx(sum(r.latency_s for r in enforced))
    assert {unit for unit, _ in otel.points("guardrail.latency")} == {"s"}
    assert 0.01 in latency["enforce"].explicit_bounds  # the GenAI duration buckets


def test_no_interventions_counted_below_the_gate(otel: Otel) -> None:
    guard = guard_for(otel, params=dict(tau=100.0))
    guard.generate(PROMPT)
    guard.generate(PROMPT, mode="shadow")
    assert otel.points("guardrail.interventions") == []
    assert {m: p.value for m, p in otel.by_mode("guardrail.requests").items()} == {
        "enforce": 1,
        "shadow": 1,
    }


def test_message_content_only_with_the_opt_in_env_var(
    otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = guard_for(otel, "llava", modalities=("image",))
    conversation = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "image", "image": image()}, {"type": "text", "text": "What?"}],
        },
    ]
    monkeypatch.delenv(CAPTURE_CONTENT_ENV, raising=False)
    guard.generate(conversation)
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, "false")
    guard.generate(conversation)
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, "True")
    result = guard.generate(conversation)
    quiet1, quiet2, captured = otel.spans()
    for span in (quiet1, quiet2):
        assert "gen_ai.input.messages" not in span.attributes
        assert "gen_ai.output.messages" not in span.attributes
    assert json.loads(captured.attributes["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "image"}, {"type": "text", "content": "What?"}]},
    ]
    assert json.loads(captured.attributes["gen_ai.output.messages"]) == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": result.text}],
            "finish_reason": result.finish_reason,
        }
    ]


def test_without_an_sdk_the_guardrail_runs_and_emits_nothing(otel: Otel) -> None:
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        pytest.skip("a global TracerProvider was installed by another test")
    model, processor = tiny("llama")
    policy = random_policy(model, processor, layer=1, **STRONG)
    sink = Recorder()
    plain = Guardrail(
        model, processor, policy, sinks=[sink], max_new_tokens=4, refusal_detector=always_refuses
    )
    result = plain.generate(PROMPT)
    observed = guard_for(otel, refusal_detector=always_refuses).generate(PROMPT)
    assert (result.text, result.score, result.refused) == (
        observed.text,
        observed.score,
        observed.refused,
    )
    span = plain.telemetry.tracer.start_span("probe")
    assert not span.is_recording() and not span.get_span_context().is_valid
    assert len(sink.events) == 2 and {e.trace_id for e in sink.events} == {
        None
    }  # events saw no real span
    assert len(otel.spans()) == 1  # only the SDK-backed guardrail exported anything


def test_model_name_prefers_the_checkpoint_name() -> None:
    model, _ = tiny("llama")
    assert model_name(model) == "llama"

    class Config:
        name_or_path = "/models/SmolLM2-135M-Instruct/"
        model_type = "llama"

    assert model_name(type("M", (), {"config": Config()})()) == "SmolLM2-135M-Instruct"
    Config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (
        model_name(type("M", (), {"config": Config()})()) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_library_logger_binds_request_context() -> None:
    with capture_logs() as logs:
        request_logger("abc", policy_version="2.0.0", mode="shadow", policy_name=None).info("hello")
        get_logger().warning("plain")
    assert logs[0] == {
        "event": "hello",
        "log_level": "info",
        "request_id": "abc",
        "policy_version": "2.0.0",
        "mode": "shadow",
    }
    assert logs[1] == {"event": "plain", "log_level": "warning"}


def test_the_rollout_arm_is_on_every_span_and_metric(otel: Otel, tmp_path) -> None:
    from guardrail.testing import with_canary

    guard = with_canary(guard_for(otel), tmp_path, "1.1.0", share=0.5)
    keys = [f"user-{k}" for k in range(12)]
    results = guard.generate(["Hi"] * len(keys), key=keys)
    arms = {r.rollout_arm for r in results}
    assert arms == {"stable", "canary"}
    spans = otel.spans()
    assert len(spans) == len(keys)
    for span, result in zip(
        sorted(spans, key=lambda s: s.attributes["gen_ai.response.id"]),
        sorted(results, key=lambda r: r.request_id),
        strict=True,
    ):
        assert span.attributes["guardrail.rollout.arm"] == result.rollout_arm
        assert span.attributes["guardrail.policy.version"] == result.policy_version
    counted = {
        (
            dict(p.attributes)["guardrail.rollout.arm"],
            dict(p.attributes)["guardrail.policy.version"],
        ): p.value
        for _, p in otel.points("guardrail.requests")
    }
    expected: dict[tuple[str, str], int] = {}
    for r in results:
        expected[r.rollout_arm, r.policy_version] = (
            expected.get((r.rollout_arm, r.policy_version), 0) + 1
        )
    assert counted == expected
