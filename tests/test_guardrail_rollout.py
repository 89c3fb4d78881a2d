"""Rollouts inside the Guardrail: mixed batches, shadow, kill switch, swaps under load."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from guardrail import Guardrail
from guardrail.errors import PolicySignatureError
from guardrail.observability.events import CallbackSink
from guardrail.policy.rollout import Rollout
from guardrail.policy.signing import TrustStore, generate_keypair, sign_bundle

from .conftest import random_policy, tiny
from .test_guardrail_plumbing import assert_no_hooks

PROMPTS = [f"Tell me something about topic number {k}." for k in range(8)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, tok = tiny("llama")
    root = tmp_path_factory.mktemp("policies")
    v1 = random_policy(
        model, tok, layer=1, seed=11, name="p", version="1.0.0", tau=-0.5, lam=4.0, kappa=2.0
    )
    v2 = random_policy(
        model, tok, layer=2, seed=22, name="p", version="2.0.0", tau=-0.5, lam=4.0, kappa=2.0
    )
    paths = {v: b.save_pretrained(root / "p" / v) for v, b in (("1.0.0", v1), ("2.0.0", v2))}
    guard = Guardrail(model, tok)
    solo = {
        v: [
            guard.generate(p, policy=guard.load_policy(paths[v]), max_new_tokens=5) for p in PROMPTS
        ]
        for v in paths
    }
    return model, tok, paths, solo


def _config(paths, share=0.5, shadow=(), kill=False):
    config = {
        "stable": str(paths["1.0.0"]),
        "shadow": [str(paths[s]) for s in shadow],
        "kill_switch": kill,
    }
    if share is not None:
        config["canary"] = {"ref": str(paths["2.0.0"]), "share": share, "sticky_key": "user"}
    return config


def test_mixed_batch_runs_in_one_forward_pass_with_per_row_versions(setup):
    model, tok, paths, solo = setup
    guard = Guardrail(model, tok, rollout=_config(paths, share=0.5))
    keys = [f"user-{k}" for k in range(len(PROMPTS))]
    prefills = []
    handle = guard.adapter.layers[0].register_forward_pre_hook(
        lambda m, args: prefills.append(args[0].shape[1]) if args[0].shape[1] > 1 else None
    )
    try:
        results = guard.generate(PROMPTS, key=keys, max_new_tokens=5)
    finally:
        handle.remove()
    assert len(prefills) == 1  # one prefill for the whole mixed batch
    versions = {r.policy_version for r in results}
    assert versions == {"1.0.0", "2.0.0"}, "both arms should appear among 8 users at 50 %"
    for k, result in enumerate(results):
        expected = solo[result.policy_version][k]
        assert result.rollout_arm == ("canary" if result.policy_version == "2.0.0" else "stable")
        assert result.token_ids == expected.token_ids
        assert result.score == pytest.approx(expected.score, rel=1e-4, abs=1e-5)
        assert result.layer == (2 if result.policy_version == "2.0.0" else 1)
    again = guard.generate(PROMPTS, key=keys, max_new_tokens=5)
    assert [r.policy_version for r in again] == [r.policy_version for r in results]  # sticky


def test_shadow_never_changes_output_and_reports_would_intervene(setup):
    model, tok, paths, solo = setup
    events = []
    guard = Guardrail(
        model,
        tok,
        rollout=_config(paths, share=0.0, shadow=("2.0.0",)),
        sinks=[CallbackSink(events.append)],
    )
    results = guard.generate(PROMPTS, key="someone", max_new_tokens=5)
    shadow_only = Guardrail(model, tok)
    v2 = guard.load_policy(paths["2.0.0"])
    for k, result in enumerate(results):
        assert result.token_ids == solo["1.0.0"][k].token_ids  # output entirely from stable
        assert result.policy_version == "1.0.0" and result.rollout_arm == "stable"
        (shadow,) = result.shadow
        assert shadow.policy_version == "2.0.0"
        reference = shadow_only.generate(PROMPTS[k], policy=v2, mode="shadow", max_new_tokens=5)
        assert shadow.score == pytest.approx(reference.score, rel=1e-4, abs=1e-5)
        assert shadow.would_intervene == reference.would_intervene
    shadow_events = [e for e in events if e.rollout_arm == "shadow"]
    assert len(shadow_events) == sum(r.shadow[0].would_intervene for r in results) > 0
    assert all(e.policy_version == "2.0.0" and not e.intervened for e in shadow_events)


def test_kill_switch_serves_unguarded(setup):
    model, tok, paths, _ = setup
    guard = Guardrail(model, tok, rollout=_config(paths, kill=True))
    plain = guard.generate(PROMPTS[:3], mode="off", max_new_tokens=5)
    killed = guard.generate(PROMPTS[:3], key="u", max_new_tokens=5)
    for a, b in zip(plain, killed, strict=True):
        assert b.token_ids == a.token_ids and b.rollout_arm == "killed" and b.mode == "off"
        assert not b.intervened


def test_swaps_under_concurrent_load_lose_none_and_mix_none(setup):
    model, tok, paths, solo = setup
    guard = Guardrail(model, tok, rollout=_config(paths, share=0.0))
    rollout = guard.rollout
    assert isinstance(rollout, Rollout)
    model_before = guard.model
    stop = threading.Event()
    results, errors = [], []

    def client(worker: int) -> None:
        k = 0
        while not stop.is_set():
            idx = (worker + k) % len(PROMPTS)
            try:
                results.append(
                    (idx, guard.generate(PROMPTS[idx], key=f"w{worker}", max_new_tokens=5))
                )
            except Exception as exc:  # noqa: BLE001 - any error fails the test below
                errors.append(exc)
            k += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    swaps = []
    try:
        deadline = time.monotonic() + 4
        flip = 0
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            # everyone to 2.0.0, then roll back to 1.0.0: pointer swaps under load
            rollout.set_canary_share(1.0 if flip % 2 == 0 else 0.0)
            swaps.append(time.perf_counter() - t0)
            flip += 1
            time.sleep(0.05)
        guard.set_rollout(_config(paths, share=1.0))  # a whole new rollout, bundles loaded first
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert len(results) > 10
    seen = set()
    for idx, result in results:
        expected = solo[result.policy_version][idx]  # produced entirely under one version
        assert result.token_ids == expected.token_ids
        assert result.score == pytest.approx(expected.score, rel=1e-4, abs=1e-5)
        seen.add(result.policy_version)
    assert seen == {"1.0.0", "2.0.0"}
    assert guard.model is model_before
    assert (
        sorted(swaps)[len(swaps) // 2] < 0.05
    )  # a swap is a pointer change (median well under 50 ms)
    assert_no_hooks(model)


def test_trust_store_refuses_unsigned_bundles(setup, tmp_path):
    model, tok, paths, _ = setup
    private, public = generate_keypair()
    store = TrustStore()
    store.add("release", public)
    with pytest.raises(PolicySignatureError):
        Guardrail(model, tok, paths["1.0.0"], trust_store=store)
    signed = tmp_path / "signed"
    guard = Guardrail(model, tok)
    guard.load_policy(paths["1.0.0"]).save_pretrained(signed)
    sign_bundle(signed, private, "release")
    assert Guardrail(model, tok, signed, trust_store=store).policy.version == "1.0.0"
    with pytest.raises(PolicySignatureError):
        Guardrail(model, tok, trust_store=store, rollout=_config(paths, share=0.0))
    bundle = guard.load_policy(signed)
    assert torch.equal(bundle.u, Guardrail(model, tok, signed, trust_store=store).policy.u)
