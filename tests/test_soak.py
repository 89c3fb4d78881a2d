"""A bounded soak: thousands of short requests, mixed modes, injected faults."""

from __future__ import annotations

import gc
import random
import resource

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from transformers import StoppingCriteria, StoppingCriteriaList

from guardrail import Guardrail
from guardrail.observability.events import CallbackSink

from .conftest import random_policy, tiny
from .test_guardrail_plumbing import assert_no_hooks

pytestmark = pytest.mark.slow

REQUESTS = 2000
MEMORY_BOUND_MB = 64  # growth of peak RSS allowed after warm-up


class Fault(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        raise RuntimeError("injected fault")


def test_soak_mixed_modes_with_faults():
    model, tok = tiny("llama")
    policy = random_policy(model, tok, layer=1, tau=0.0, lam=2.0, kappa=1.0)
    events = []
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    guard = Guardrail(
        model,
        tok,
        policy,
        sinks=[CallbackSink(events.append)],
        max_new_tokens=2,
        tracer_provider=provider,
    )
    rng = random.Random(0)
    outcomes = {"ok": 0, "fault": 0, "input_error": 0}
    request_ids = set()
    baseline_rss = None
    for i in range(REQUESTS):
        mode = rng.choice(["enforce", "shadow", "off"])
        roll = rng.random()
        try:
            if roll < 0.05:
                guard.generate(
                    f"request {i}", mode=mode, stopping_criteria=StoppingCriteriaList([Fault()])
                )
            elif roll < 0.08:
                guard.generate(
                    [{"role": "user", "content": [{"type": "image", "image": b""}]}], mode=mode
                )
            elif roll < 0.10:
                stream = guard.stream(f"stream {i}", mode=mode, max_new_tokens=4)
                next(stream)
                stream.close()
                outcomes["ok"] += 1
            else:
                result = guard.generate(f"Tell me about item {i % 50}.", mode=mode)
                request_ids.add(result.request_id)
                outcomes["ok"] += 1
        except RuntimeError as exc:
            assert "injected fault" in str(exc)
            outcomes["fault"] += 1
        except Exception as exc:  # noqa: BLE001
            assert type(exc).__name__ == "InputError", exc
            outcomes["input_error"] += 1
        if i == 200:
            gc.collect()
            baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gc.collect()
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) / 1024
    assert_no_hooks(model)
    assert sum(outcomes.values()) == REQUESTS
    assert outcomes["fault"] > 50 and outcomes["input_error"] > 20
    assert growth_mb < MEMORY_BOUND_MB, f"peak RSS grew {growth_mb:.1f} MB"
    # every request is accounted for: one span each, errors marked with their type
    spans = exporter.get_finished_spans()
    assert len(spans) == REQUESTS
    failed = [s for s in spans if s.status.status_code == StatusCode.ERROR]
    assert len(failed) == outcomes["fault"] + outcomes["input_error"]
    assert sorted({s.attributes["error.type"] for s in failed}) == ["InputError", "RuntimeError"]
    # every event belongs to a request that completed
    completed = {
        s.attributes.get("gen_ai.response.id")
        for s in spans
        if s.status.status_code != StatusCode.ERROR
    }
    assert events and {e.request_id for e in events} <= completed
    assert request_ids <= completed
    # the guardrail still answers exactly like a fresh one
    fresh = Guardrail(model, tok, policy, max_new_tokens=2)
    assert guard.generate("final check").token_ids == fresh.generate("final check").token_ids
