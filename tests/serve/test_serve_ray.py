"""Scale-out on Ray Serve: a real local Ray instance, two replicas, real HTTP clients.

One module-scoped deployment (tiny-llama, 2 replicas, Serve's proxy on 127.0.0.1 and a
free port); the tests run in file order and share its rollout. Ray is shut down at
the end. Without ray installed the deployment tests skip; the CLI checks still run.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")

from guardrail.serve.server import free_port  # noqa: E402
from guardrail.testing import cached_tiny_model, tiny_policy  # noqa: E402
from tests.serve.conftest import run_json  # noqa: E402

MODEL = "tiny-llama"
TOKEN = "r" * 40
APP = "guardrail"
POLL_S = 0.2
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


class Cluster:
    def __init__(self, url: str, bundles: dict[str, Path], store: str):
        self.url = url
        self.bundles = bundles
        self.store_name = store

    def chat(self, client: httpx.Client, **body: Any) -> httpx.Response:
        return client.post(self.url + "/v1/chat/completions", json={**BODY, **body})

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kw)

    def store(self) -> Any:
        from guardrail.serve.ray_app import rollout_store

        return rollout_store(self.store_name, create=False)


def retrying(client: httpx.Client, cluster: Cluster, attempts: int = 40) -> tuple[Any, int]:
    """A chat request retried on transport errors and 5xx (the client's side of 'no
    accepted request is lost'); returns the response and the number of tries."""
    for attempt in range(1, attempts + 1):
        try:
            response = cluster.chat(client, max_tokens=8)
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code < 500:
            return response, attempt
        time.sleep(0.25)
    raise AssertionError(f"a request failed {attempts} times in a row")


def until(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def serving(cluster: Cluster, client: httpx.Client, requests: int = 16) -> dict[str, set[Any]]:
    """What each replica serves now: replica id -> {(policy_version, rollout_arm)}."""
    seen: dict[str, set[Any]] = {}
    for _ in range(requests):
        response = cluster.chat(client)
        assert response.status_code == 200, response.text
        decision = response.json()["guardrail"]
        replica = response.headers["x-guardrail-replica"]
        seen.setdefault(replica, set()).add((decision["policy_version"], decision["rollout_arm"]))
    return seen


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    ray = pytest.importorskip("ray", reason="ray[serve] is not installed (the 'ray' extra)")
    serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
    from guardrail.serve.ray_app import RaySpec, deploy

    model, processor = cached_tiny_model("llama")
    root = tmp_path_factory.mktemp("ray")
    bundles = {
        v: tiny_policy(model, processor, name="tiny", version=v).save_pretrained(root / v)
        for v in ("1.0.0", "1.1.0")
    }
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        spec = RaySpec.create(
            MODEL,
            policy=bundles["1.0.0"],
            admin_token=TOKEN,
            max_new_tokens=4,
            max_batch_size=4,
            poll_interval_s=POLL_S,
        )
        url = deploy(
            spec,
            host="127.0.0.1",
            port=free_port(),
            app_name=APP,
            num_replicas=2,
            ray_actor_options={"num_cpus": 0.5},
        )
        yield Cluster(url, bundles, f"guardrail-rollout-{APP}")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# ----------------------------------------------------------------------------- without a cluster
# (first: they run before the module's Ray instance starts)


def test_ray_without_ray_installed_names_the_extra(
    no_model: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code, out = run_json(["serve", "--model", "tiny-llama", "--ray", "--replicas", "2"], capsys)
    assert code == 1 and out["error"]["type"] == "GuardrailError"
    assert "pip install 'mars-guardrail[ray]'" in out["error"]["message"]


def test_ray_flags_are_checked_before_the_model_loads(
    no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["serve", "--model", "tiny-llama", "--mode", "off"]
    code, out = run_json([*base, "--replicas", "2"], capsys)
    assert code == 1 and "need --ray" in out["error"]["message"]
    pytest.importorskip("ray", reason="ray[serve] is not installed (the 'ray' extra)")
    code, out = run_json([*base, "--ray", "--ray-autoscaling", "{min"], capsys)
    assert code == 1 and "--ray-autoscaling is not JSON" in out["error"]["message"]
    code, out = run_json(
        [*base, "--ray", "--replicas", "2", "--ray-autoscaling", '{"max_replicas": 2}'], capsys
    )
    assert code == 1 and "exclude each other" in out["error"]["message"]


def test_the_spec_carries_absolute_paths_and_the_parsed_rollout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from guardrail.policy.rollout import RolloutConfigError
    from guardrail.serve.ray_app import RaySpec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    rollout = tmp_path / "conf" / "rollout.yaml"
    rollout.write_text("stable: ./b1\ncanary: {ref: ./b2, share: 0.25}\n")
    spec = RaySpec.create(MODEL, policy="./b1", rollout="conf/rollout.yaml", registry="reg")
    assert spec.policy == str(tmp_path / "b1") and spec.registry == str(tmp_path / "reg")
    assert spec.rollout == {
        "config": {
            "stable": "./b1",
            "canary": {"ref": "./b2", "share": 0.25, "sticky_key": "user"},
            "shadow": [],
            "kill_switch": False,
            "salt": None,
        },
        "base_dir": str(tmp_path / "conf"),  # relative refs resolve next to the file
    }
    assert TOKEN not in repr(RaySpec.create(MODEL, admin_token=TOKEN))  # never in a log line
    with pytest.raises(RolloutConfigError, match="canary.share"):
        RaySpec.create(MODEL, rollout={"stable": "./b1", "canary": {"ref": "./b2", "share": 2}})


def test_app_builder_checks_its_arguments(tmp_path: Path) -> None:
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed (the 'ray' extra)")
    from ray import serve

    from guardrail.errors import InputError
    from guardrail.serve.ray_app import app_builder

    with pytest.raises(InputError, match="unknown app_builder argument"):
        app_builder({"model": MODEL, "replica": "2"})
    with pytest.raises(InputError, match="needs model="):
        app_builder({"replicas": "2"})
    with pytest.raises(InputError, match="is not a number"):
        app_builder({"model": MODEL, "mode": "off", "replicas": "two"})
    app = app_builder({"model": MODEL, "mode": "off", "replicas": "3"})
    assert isinstance(app, serve.Application)


# ----------------------------------------------------------------------------- on the cluster


def test_requests_are_spread_over_both_replicas(cluster: Cluster) -> None:
    import openai

    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: cluster.chat(client), range(24)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    replicas = {r.headers["x-guardrail-replica"] for r in responses}
    assert len(replicas) == 2, replicas
    assert {r.json()["guardrail"]["policy_version"] for r in responses} == {"1.0.0"}
    assert {r.headers["x-guardrail-rollout-version"] for r in responses} == {"0"}

    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=2
    )
    assert raw.headers["x-guardrail-replica"] in replicas
    assert raw.parse().model_extra["guardrail"]["policy_version"] == "1.0.0"

    ready = httpx.get(cluster.url + "/ready", timeout=10)
    assert ready.status_code == 200
    replica = ready.json()["replica"]
    assert replica["id"] in replicas and replica["rollout_version"] == 0
    assert replica["sync_error"] is None and replica["store_error"] is None


def test_a_rollout_change_on_one_replica_reaches_every_replica(cluster: Cluster) -> None:
    b = cluster.bundles
    canary = {"stable": str(b["1.0.0"]), "canary": {"ref": str(b["1.1.0"]), "share": 1.0}}
    put = cluster.admin("PUT", "/admin/rollout", json=canary)
    assert put.status_code == 200, put.text
    assert put.headers["x-guardrail-rollout-version"] == "1"
    changed_at = time.monotonic()
    with httpx.Client(timeout=30) as client:
        # within the consistency window every replica serves the canary to every key
        def on(arm: tuple[str, str]) -> bool:
            now = serving(cluster, client)
            return len(now) == 2 and all(arms == {arm} for arms in now.values())

        until("both replicas on the canary", lambda: on(("1.1.0", "canary")), timeout=15)
        window = time.monotonic() - changed_at

        # an arm change (promote) made through whichever replica gets it
        promoted = cluster.admin("POST", "/admin/rollout/promote")
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["serving"]["stable"] == "tiny@1.1.0"
        assert promoted.headers["x-guardrail-rollout-version"] == "2"
        until("both replicas on the promoted stable", lambda: on(("1.1.0", "stable")), timeout=15)

        # a change that fails verification on its replica reaches nobody
        missing = {"stable": str(b["1.0.0"].parent / "no-such-bundle")}
        refused = cluster.admin("PUT", "/admin/rollout", json=missing)
        assert refused.status_code in (404, 422), refused.text
        version, _ = ray_get(cluster.store().get.remote())[1:]
        assert version == 2
        time.sleep(3 * POLL_S)
        assert on(("1.1.0", "stable"))
    assert window < 10, f"the change took {window:.1f} s to reach both replicas"


def ray_get(ref: Any) -> Any:
    import ray

    return ray.get(ref, timeout=30)


def test_a_replica_that_cannot_apply_the_rollout_fails_closed(cluster: Cluster) -> None:
    # As if another node had verified a bundle path that does not exist on this one.
    store = cluster.store()
    epoch, version, good = ray_get(store.get.remote())
    bad = {"config": {"stable": "/nonexistent/bundle"}, "base_dir": "/"}
    written, *_ = ray_get(store.put.remote(bad, epoch, version))
    assert written
    with httpx.Client(timeout=30) as client:

        def refused_everywhere() -> bool:
            responses = [cluster.chat(client) for _ in range(8)]
            return all(
                r.status_code == 503 and r.json()["error"]["code"] == "RolloutSyncError"
                for r in responses
            )

        until("every replica refusing", refused_everywhere, timeout=10)
        ready = httpx.get(cluster.url + "/ready", timeout=10)
        assert ready.status_code == 503
        assert f"rollout version {version + 1}" in ready.json()["replica"]["sync_error"]
        # the fix, written through the store, brings them back
        written, *_ = ray_get(store.put.remote(good, epoch, version + 1))
        assert written

        def recovered() -> bool:
            responses = [cluster.chat(client) for _ in range(8)]
            replicas = {r.headers["x-guardrail-replica"] for r in responses}
            return all(r.status_code == 200 for r in responses) and len(replicas) == 2

        until("both replicas serving again", recovered, timeout=15)
        assert httpx.get(cluster.url + "/ready", timeout=10).status_code == 200


def test_killing_a_replica_loses_no_request_and_its_successor_syncs(cluster: Cluster) -> None:
    import ray

    ready = httpx.get(cluster.url + "/ready", timeout=10).json()["replica"]
    victim, version = ready["id"], ready["rollout_version"]
    results: list[tuple[httpx.Response, int]] = []
    lock = threading.Lock()
    started = threading.Event()

    def worker() -> None:
        with httpx.Client(timeout=30) as client:
            for _ in range(8):
                outcome = retrying(client, cluster)
                with lock:
                    results.append(outcome)
                    if len(results) >= 4:
                        started.set()

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(worker) for _ in range(4)]
        assert started.wait(60)
        ray.kill(ray.get_actor(ready["actor"], namespace="serve"), no_restart=True)
        for future in futures:
            future.result(timeout=120)
    assert len(results) == 32
    assert all(r.status_code == 200 for r, _ in results), [r.text for r, _ in results]
    assert {r.json()["guardrail"]["policy_version"] for r, _ in results} == {"1.1.0"}

    # Serve replaces the replica; the new one starts on the stored rollout, not the spec's
    known = {r.headers["x-guardrail-replica"] for r, _ in results} | {victim}

    def successor() -> dict[str, Any] | None:
        for _ in range(6):
            r = httpx.get(cluster.url + "/ready", timeout=10)
            if r.status_code == 200 and r.json()["replica"]["id"] not in known:
                return r.json()["replica"]
        return None

    new = until("a replacement replica", successor, timeout=90)
    assert new["rollout_version"] == version and new["sync_error"] is None
    with httpx.Client(timeout=30) as client:
        seen = until(
            "the replacement serving",
            lambda: (now := serving(cluster, client)) and new["id"] in now and now,
            timeout=30,
        )
    assert victim not in seen
    assert seen[new["id"]] == {("1.1.0", "stable")}
