"""Prometheus metrics of the server (``GET /metrics``), in a registry of its own.

Per policy version and rollout arm (``none`` where a request had neither):
``guardrail_server_completions_total`` (with ``mode``), ``..._interventions_total``,
``..._refusals_total`` and the ``..._request_latency_seconds`` histogram. Server-wide:
``guardrail_server_http_requests_total`` by endpoint and status,
``guardrail_server_rejected_total`` by reason (``queue_full``, ``timeout``,
``disconnect``, ``not_ready``), ``guardrail_server_queue_depth``,
``guardrail_server_batch_size`` and ``guardrail_server_batch_seconds``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from guardrail.result import GuardrailResult
from guardrail.serve.engine import BatchRecord

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServerMetrics:
    """The server's instruments; ``render()`` is the ``/metrics`` body."""

    def __init__(self, queue_depth: Callable[[], int] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = ("policy_version", "arm")
        self.completions = Counter(
            "guardrail_server_completions",
            "Chat completions served, by policy version, rollout arm and mode",
            (*labels, "mode"),
            registry=r,
        )
        self.interventions = Counter(
            "guardrail_server_interventions",
            "Completions MARS steered",
            labels,
            registry=r,
        )
        self.refusals = Counter(
            "guardrail_server_refusals", "Completions whose answer refused", labels, registry=r
        )
        self.latency = Histogram(
            "guardrail_server_request_latency_seconds",
            "Time from arrival to the last byte of a completion",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http = Counter(
            "guardrail_server_http_requests",
            "HTTP requests by endpoint and status",
            ("endpoint", "status"),
            registry=r,
        )
        self.rejected = Counter(
            "guardrail_server_rejected",
            "Chat requests not served: queue_full, timeout, disconnect, not_ready",
            ("reason",),
            registry=r,
        )
        self.queue_depth = Gauge(
            "guardrail_server_queue_depth", "Requests waiting for a batch", registry=r
        )
        if queue_depth is not None:
            self.queue_depth.set_function(lambda: float(queue_depth()))
        self.batch_size = Histogram(
            "guardrail_server_batch_size",
            "Requests per generate call",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "guardrail_server_batch_seconds",
            "Duration of one batched generate call",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def completed(self, result: GuardrailResult, seconds: float) -> None:
        labels = (result.policy_version or "none", result.rollout_arm or "none")
        self.completions.labels(*labels, result.mode).inc()
        if result.intervened and result.finish_reason != "guardrail_error":
            self.interventions.labels(*labels).inc()
        if result.refused:
            self.refusals.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def batch(self, record: BatchRecord) -> None:
        self.batch_size.observe(record.size)
        self.batch_seconds.observe(record.seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
