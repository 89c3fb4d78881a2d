"""OpenTelemetry spans and metrics for guarded generation (``opentelemetry-api`` only).

Nothing here configures OpenTelemetry. A :class:`~guardrail.Guardrail` takes a
``tracer_provider`` and a ``meter_provider``; left out, the API's global getters are
used, which are no-ops until the application installs an SDK.

Spans follow the GenAI semantic conventions for inference: **one span per
conversation** named ``"chat {model}"`` (kind ``INTERNAL``: the model runs in
process). A batched ``generate([...])`` produces one sibling span per row, all
children of the caller's current span, started together and ended together (the
rows share one forward pass). Attributes:

* ``gen_ai.operation.name="chat"``, ``gen_ai.provider.name="transformers"``,
  ``gen_ai.request.model``, ``gen_ai.request.max_tokens`` (and ``temperature``,
  ``top_p``, ``top_k``, ``seed`` when passed), ``gen_ai.response.id`` (the
  request id), ``gen_ai.response.finish_reasons``, ``gen_ai.usage.input_tokens``,
  ``gen_ai.usage.output_tokens``;
* ``guardrail.policy.name``, ``guardrail.policy.version``, ``guardrail.mode``,
  ``guardrail.rollout.arm`` (stable, canary or killed, under a rollout), ``guardrail.layer``, ``guardrail.score``, ``guardrail.strength``,
  ``guardrail.intervened``, ``guardrail.refused`` (and ``guardrail.error`` when the
  policy could not be applied);
* a span event ``guardrail.refusal`` when the output refused;
* ``gen_ai.input.messages`` / ``gen_ai.output.messages`` (JSON strings) only when
  ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``.

Metrics, attributes ``guardrail.policy.name``, ``guardrail.policy.version``,
``guardrail.rollout.arm`` (under a rollout) and ``guardrail.mode``: counters ``guardrail.requests``, ``guardrail.interventions``
(in shadow mode: the requests MARS would have steered), ``guardrail.refusals``;
histograms ``guardrail.score`` and ``guardrail.latency`` (s).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from guardrail._version import __version__
from guardrail.messages import message_parts
from guardrail.observability.events import would_intervene

if TYPE_CHECKING:
    from guardrail.result import GuardrailResult

__all__ = [
    "CAPTURE_CONTENT_ENV",
    "Generation",
    "Telemetry",
    "capture_message_content",
    "model_name",
]

CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
INSTRUMENTATION_NAME = "guardrail"
PROVIDER = "transformers"

# gen_ai.client.operation.duration's advisory buckets (s).
LATENCY_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
# The MARS score is 0 at the harmless centroid and 1 at the harmful one.
SCORE_BUCKETS = (
    -1.0,
    -0.5,
    -0.25,
    0.0,
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    1.0,
    1.25,
    1.5,
    2.0,
    3.0,
)
_REQUEST_PARAMETERS = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "top_k": "gen_ai.request.top_k",
    "seed": "gen_ai.request.seed",
}


def capture_message_content() -> bool:
    """Whether the GenAI content-capture opt-in env var is set to ``true``."""
    return os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() == "true"


def model_name(model: Any) -> str:
    """A model's name for spans: its checkpoint name, else its architecture type."""
    config = getattr(model, "config", None)
    for attr in ("name_or_path", "_name_or_path"):
        value = getattr(config, attr, None) or getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value.rstrip("/").rsplit("/", 1)[-1] if os.path.isabs(value) else value
    return str(getattr(config, "model_type", None) or type(model).__name__)


class Telemetry:
    """The guardrail's tracer and instruments."""

    def __init__(
        self,
        model: str,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ):
        self.model = model
        self.tracer = trace.get_tracer(
            INSTRUMENTATION_NAME, __version__, tracer_provider=tracer_provider
        )
        meter = metrics.get_meter(INSTRUMENTATION_NAME, __version__, meter_provider=meter_provider)
        self.requests = meter.create_counter(
            "guardrail.requests",
            unit="{request}",
            description="Guarded generations, one per conversation",
        )
        self.interventions = meter.create_counter(
            "guardrail.interventions",
            unit="{request}",
            description="Generations MARS steered (shadow mode: would have steered)",
        )
        self.refusals = meter.create_counter(
            "guardrail.refusals", unit="{request}", description="Generations whose output refused"
        )
        self.score = meter.create_histogram(
            "guardrail.score",
            unit="1",
            description="MARS refusal score s at the policy layer",
            explicit_bucket_boundaries_advisory=SCORE_BUCKETS,
        )
        self.latency = meter.create_histogram(
            "guardrail.latency",
            unit="s",
            description="Duration of a guarded generation",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )

    @contextmanager
    def generation(
        self,
        batch: Sequence[Any],
        *,
        max_tokens: int | None,
        parameters: Mapping[str, Any] | None = None,
        parents: Sequence[Any] | None = None,
    ) -> Iterator[Generation]:
        """Spans for one batched generation: one per row, ended on exit.

        ``parents`` (one OpenTelemetry ``Context`` or None per row) makes each row's span
        a child of its own request's trace, as a server batching requests of different
        callers needs; by default every span is a child of the current span.
        An exception escaping the block is recorded on every row's span (status ERROR,
        ``error.type``) and re-raised.
        """
        if parents is not None and len(parents) != len(batch):
            raise ValueError(f"{len(parents)} span parents for {len(batch)} rows")
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": self.model,
        }
        if max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = int(max_tokens)
        for key, attribute in _REQUEST_PARAMETERS.items():
            value = (parameters or {}).get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                attributes[attribute] = value
        spans = [
            self.tracer.start_span(
                f"chat {self.model}",
                context=parents[row] if parents is not None else None,
                kind=SpanKind.INTERNAL,
                attributes=attributes,
            )
            for row in range(len(batch))
        ]
        try:
            yield Generation(self, spans, batch)
        except BaseException as exc:
            for span in spans:
                span.set_attribute("error.type", type(exc).__qualname__)
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            for span in spans:
                span.end()


class Generation:
    """The spans of one batched generation, to be completed with the results."""

    def __init__(self, telemetry: Telemetry, spans: list[Any], batch: Sequence[Any]):
        self.telemetry = telemetry
        self.spans = spans
        self.batch = batch

    def span_ids(self) -> list[tuple[str, str] | None]:
        """``(trace_id, span_id)`` in hex per row, None where the span is not sampled/valid."""
        ids: list[tuple[str, str] | None] = []
        for span in self.spans:
            context = span.get_span_context()
            if context.is_valid:
                ids.append(
                    (trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id))
                )
            else:
                ids.append(None)
        return ids

    def record(self, results: Sequence[GuardrailResult], *, tau: float | None) -> None:
        """Set each row's span attributes and record the metrics."""
        capture = capture_message_content()
        t = self.telemetry
        for span, messages, result in zip(self.spans, self.batch, results, strict=True):
            labels = _metric_attributes(result)
            t.requests.add(1, labels)
            t.latency.record(result.latency_s, labels)
            if result.score is not None:
                t.score.record(result.score, labels)
            if would_intervene(result, tau):
                t.interventions.add(1, labels)
            if result.refused:
                t.refusals.add(1, labels)
            if not span.is_recording():
                continue
            span.set_attributes(_span_attributes(result))
            if result.refused:
                refusal: dict[str, Any] = {
                    "guardrail.blocked": result.finish_reason == "guardrail_error"
                }
                if result.error:
                    refusal["guardrail.error"] = result.error
                span.add_event("guardrail.refusal", attributes=refusal)
            if capture:
                span.set_attribute(
                    "gen_ai.input.messages",
                    json.dumps(input_messages(messages), ensure_ascii=False),
                )
                span.set_attribute(
                    "gen_ai.output.messages",
                    json.dumps(output_messages(result), ensure_ascii=False),
                )


def _metric_attributes(result: GuardrailResult) -> dict[str, str]:
    labels = {
        "guardrail.policy.name": result.policy_name,
        "guardrail.policy.version": result.policy_version,
        "guardrail.rollout.arm": result.rollout_arm,
        "guardrail.mode": result.mode,
    }
    return {k: v for k, v in labels.items() if v is not None}


def _span_attributes(result: GuardrailResult) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.response.id": result.request_id,
        "gen_ai.response.finish_reasons": [result.finish_reason],
        "gen_ai.usage.input_tokens": result.usage.input_tokens,
        "gen_ai.usage.output_tokens": result.usage.output_tokens,
        "guardrail.policy.name": result.policy_name,
        "guardrail.policy.version": result.policy_version,
        "guardrail.rollout.arm": result.rollout_arm,
        "guardrail.mode": result.mode,
        "guardrail.layer": result.layer,
        "guardrail.score": result.score,
        "guardrail.strength": result.strength,
        "guardrail.intervened": result.intervened,
        "guardrail.refused": result.refused,
        "guardrail.error": result.error,
    }
    return {k: v for k, v in attributes.items() if v is not None}


def input_messages(messages: Any) -> list[dict[str, Any]]:
    """A raw conversation in the GenAI ``gen_ai.input.messages`` shape (media as a part type only)."""
    return [
        {
            "role": role,
            "parts": [
                # Media parts by type only: image and video bytes are never exported.
                {"type": "text", "content": p["text"]}
                if p.get("type") == "text"
                else {"type": str(p.get("type"))}
                for p in parts
            ],
        }
        for role, parts in message_parts(messages)
    ]


def output_messages(result: GuardrailResult) -> list[dict[str, Any]]:
    """A result in the GenAI ``gen_ai.output.messages`` shape."""
    return [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": result.text}],
            "finish_reason": result.finish_reason,
        }
    ]
