"""Operating the server under load: batching parity, metrics, queue limit, timeout,
disconnects (a live server on 127.0.0.1)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from guardrail.testing import tiny_guardrail
from tests.serve.conftest import MODEL, live_server, user


def _body(text: str, max_tokens: int) -> dict:
    return {"model": MODEL, "messages": user(text), "max_tokens": max_tokens}


def test_concurrent_clients_get_what_one_at_a_time_calls_get() -> None:
    guard = tiny_guardrail("llama")
    prompts = [f"Tell me about topic number {i}." for i in range(6)]
    with live_server(guard, engine={"max_batch_size": 8, "batch_window_s": 0.3}) as live:
        with ThreadPoolExecutor(len(prompts)) as pool:
            responses = list(pool.map(lambda p: live.post(_body(p, 6)).json(), prompts))
        sizes = [b.size for b in live.engine.history]
    assert max(sizes) > 1, f"the requests were not batched: {sizes}"
    for prompt, response in zip(prompts, responses, strict=True):
        alone = guard.generate([{"role": "user", "content": prompt}], max_new_tokens=6)
        assert response["choices"][0]["message"]["content"] == alone.text
        assert response["guardrail"]["score"] == pytest.approx(alone.score, abs=1e-4)
        assert response["guardrail"]["intervened"] == alone.intervened


def test_metrics_are_scraped_per_policy_version() -> None:
    with live_server(tiny_guardrail("llama", version="2.3.4")) as live:
        for i in range(3):
            assert live.post(_body(f"Hello {i}", 3)).status_code == 200
        text = httpx.get(live.url + "/metrics", timeout=10).text
    completions = [
        line
        for line in text.splitlines()
        if line.startswith("guardrail_server_completions_total{")
        and 'policy_version="2.3.4"' in line
    ]
    assert completions and sum(float(line.rsplit(" ", 1)[1]) for line in completions) >= 3
    assert "guardrail_server_batch_size_bucket" in text
    assert "guardrail_server_request_latency_seconds_bucket" in text
    assert "guardrail_server_queue_depth" in text


def test_a_full_queue_is_429_with_retry_after_and_nothing_is_lost() -> None:
    engine = {"max_batch_size": 1, "max_queue": 1}
    with live_server(tiny_guardrail("llama"), engine=engine) as live:
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda i: live.post(_body(f"q{i}", 60)), range(8)))
        metrics = httpx.get(live.url + "/metrics", timeout=10).text
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    refused = [r for r in responses if r.status_code == 429]
    assert refused and statuses.count(200) >= 1
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
    line = next(x for x in metrics.splitlines() if 'reason="queue_full"' in x and "_total" in x)
    assert float(line.rsplit(" ", 1)[1]) == len(refused)


def test_a_slow_request_times_out_with_504() -> None:
    with live_server(tiny_guardrail("llama"), request_timeout_s=0.05) as live:
        response = live.post(_body("Write a very long story.", 1000))
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout_error"


def test_a_client_that_disconnects_cancels_its_row() -> None:
    with live_server(tiny_guardrail("llama")) as live:
        before = len(live.engine.history)  # the readiness self-test ran a batch
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                live.url + "/v1/chat/completions",
                json=_body("Write a very long story.", 1000),
                timeout=httpx.Timeout(0.3),
            )
        deadline = time.monotonic() + 30
        while len(live.engine.history) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        record = live.engine.history[-1]
        metrics = httpx.get(live.url + "/metrics", timeout=10).text
    assert record.cancelled == 1
    assert record.output_tokens and record.output_tokens[0] < 1000
    line = next(x for x in metrics.splitlines() if 'reason="disconnect"' in x and "_total" in x)
    assert float(line.rsplit(" ", 1)[1]) >= 1
