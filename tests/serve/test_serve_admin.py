"""The admin API on a live server: the token, verified rollout changes, the record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from guardrail.observability.events import CallbackSink
from guardrail.testing import cached_tiny_model, tiny_guardrail, tiny_policy
from tests.serve.conftest import live_server

TOKEN = "a" * 40


class Logger:
    """A structlog-like logger that keeps what it is given."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))

    warning = error = exception = debug = info


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model, processor = cached_tiny_model("llama")
    root = tmp_path_factory.mktemp("admin")
    out = {
        v: tiny_policy(model, processor, name="tiny", version=v).save_pretrained(root / v)
        for v in ("1.0.0", "1.1.0")
    }
    other_model, other_processor = cached_tiny_model("qwen2_vl")
    out["other"] = tiny_policy(
        other_model, other_processor, name="tiny", version="2.0.0"
    ).save_pretrained(root / "other")
    return out


def call(live: Any, method: str, path: str, token: str | None = TOKEN, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    headers.update(kw.pop("headers", {}))
    return httpx.request(method, live.url + path, headers=headers, timeout=30, **kw)


def test_without_a_token_the_admin_api_does_not_exist() -> None:
    with live_server(tiny_guardrail("llama")) as live:
        assert call(live, "GET", "/admin/rollout").status_code == 404


def test_the_token_is_enforced_and_never_logged(bundles: dict[str, Path]) -> None:
    log = Logger()
    with live_server(tiny_guardrail("llama"), admin_token=TOKEN, logger=log) as live:
        for path in ("/admin/rollout", "/admin/policies", "/admin/events"):
            missing = call(live, "GET", path, token=None)
            assert missing.status_code == 401
            assert missing.json()["error"]["type"] == "authentication_error"
            wrong = call(live, "GET", path, token="b" * 40)
            assert wrong.status_code == 403
        changed = call(
            live, "POST", "/admin/rollout/kill-switch", token="b" * 40, json={"on": True}
        )
        assert changed.status_code == 403
        assert call(live, "GET", "/admin/rollout").json()["rollout"] is None  # nothing changed
    assert TOKEN not in repr(log.lines) and "b" * 40 not in repr(log.lines)


def test_rollout_changes_are_verified_applied_and_recorded(bundles: dict[str, Path]) -> None:
    seen: list[Any] = []
    guard = tiny_guardrail("llama", sinks=[CallbackSink(seen.append)])
    with live_server(guard, admin_token=TOKEN) as live:
        config = {
            "stable": str(bundles["1.0.0"]),
            "canary": {"ref": str(bundles["1.1.0"]), "share": 0.1},
        }
        put = call(live, "PUT", "/admin/rollout", json=config)
        assert put.status_code == 200, put.text
        assert put.json()["serving"] == {
            "stable": "tiny@1.0.0",
            "canary": "tiny@1.1.0",
            "shadow": [],
            "kill_switch": False,
        }
        # YAML is accepted too
        yaml_body = f"stable: {bundles['1.0.0']}\ncanary: {{ref: {bundles['1.1.0']}, share: 0.2}}\n"
        put = call(
            live,
            "PUT",
            "/admin/rollout",
            content=yaml_body,
            headers={"Content-Type": "application/yaml"},
        )
        assert put.status_code == 200 and put.json()["rollout"]["canary"]["share"] == 0.2

        share = call(live, "POST", "/admin/rollout/canary-share", json={"share": 0.5})
        assert share.status_code == 200 and share.json()["rollout"]["canary"]["share"] == 0.5
        bad = call(live, "POST", "/admin/rollout/canary-share", json={"share": "half"})
        assert bad.status_code == 400

        # a bundle calibrated for another model is refused; the rollout keeps serving
        wrong = {
            "stable": str(bundles["1.0.0"]),
            "canary": {"ref": str(bundles["other"]), "share": 0.1},
        }
        refused = call(live, "PUT", "/admin/rollout", json=wrong)
        assert refused.status_code == 422, refused.text
        state = call(live, "GET", "/admin/rollout").json()
        assert (
            state["serving"]["canary"] == "tiny@1.1.0"
            and state["rollout"]["canary"]["share"] == 0.5
        )

        promoted = call(live, "POST", "/admin/rollout/promote")
        assert promoted.status_code == 200 and promoted.json()["serving"]["stable"] == "tiny@1.1.0"
        killed = call(live, "POST", "/admin/rollout/kill-switch", json={"on": True})
        assert killed.json()["serving"]["kill_switch"] is True
        response = live.post(
            {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        )
        assert response.json()["guardrail"]["intervened"] is False  # the kill switch holds
        call(live, "POST", "/admin/rollout/kill-switch", json={"on": False})

        policies = call(live, "GET", "/admin/policies").json()
        assert policies["rollout"]["stable"]["version"] == "1.1.0"
        assert policies["rollout"]["stable"]["digest"].startswith("sha256:")

        events = call(live, "GET", "/admin/events").json()
        actions = [(e["action"], e["outcome"]) for e in events]
        assert actions == [
            ("set_rollout", "applied"),
            ("set_rollout", "applied"),
            ("canary_share", "applied"),
            ("set_rollout", "rejected"),
            ("promote", "applied"),
            ("kill_switch_on", "applied"),
            ("kill_switch_off", "applied"),
        ]
        assert events[3]["error"] and events[3]["before"] == events[3]["after"]
    assert [e.action for e in seen if getattr(e, "kind", None) == "rollout_change"] == [
        a for a, _ in actions
    ]
