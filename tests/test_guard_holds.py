"""The guard holds for every row, every decoding strategy and every thread.

Each test here reproduces a finding of an attacker's review of the guardrail (issue
25) and fails on the code before the fix: beams and return sequences left rows
unguarded or mixed users up, an early stop fired on other threads, and bundles
reached the model without passing the trust store.
"""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch
from transformers import GenerationConfig

from guardrail import Guardrail
from guardrail.errors import (
    InputError,
    PolicyCompatibilityError,
    PolicyIntegrityError,
    PolicySignatureError,
    SteeringError,
)
from guardrail.messages import parse_conversation
from guardrail.policy import PolicyBundle
from guardrail.policy.rollout import Rollout
from guardrail.policy.signing import TrustStore, generate_keypair, sign_bundle
from guardrail.steering import steering_hooks
from guardrail.testing import tiny_model

from .conftest import random_policy, tiny
from .test_guardrail_plumbing import assert_no_hooks, strong_policy

CONV_A = [{"role": "user", "content": "Tell me about the weather on Mars today."}]
CONV_B = [{"role": "user", "content": "Write a short poem about a lighthouse."}]


@pytest.fixture(scope="module")
def llama():
    model, tok = tiny("llama")
    return model, tok, Guardrail(model, tok, strong_policy(model, tok), max_new_tokens=6)


# ----------------------------------------------------------------------------- beams


def test_beam_search_steers_every_conversation_of_a_batch(llama):
    _, _, guard = llama
    batch = guard.generate([CONV_A, CONV_B], num_beams=2)
    solo = [guard.generate(c, num_beams=2) for c in (CONV_A, CONV_B)]
    off_b = guard.generate(CONV_B, num_beams=2, mode="off")
    assert solo[1].token_ids != off_b.token_ids  # steering changes this answer at all
    for got, want in zip(batch, solo, strict=True):
        assert got.intervened and got.strength > 0
        assert got.token_ids == want.token_ids
        assert got.score == pytest.approx(want.score, rel=1e-4, abs=1e-5)


def test_every_beam_copy_of_every_row_is_steered_at_t_star(llama):
    model, _, guard = llama
    layer = guard.policy.layer
    seen: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if not seen:
            seen.append(hidden.detach().clone())

    handle = guard.adapter.layers[layer + 1].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        guard.generate([CONV_A, CONV_B], num_beams=3, mode="off", max_new_tokens=1)
        plain = seen.pop()
        guard.generate([CONV_A, CONV_B], num_beams=3, max_new_tokens=1)
        steered = seen.pop()
    finally:
        handle.remove()
    assert plain.shape[0] == steered.shape[0] == 6
    t_star = plain.shape[1] - 1  # left padding: t* is the last position of every row
    for row in range(6):
        assert not torch.allclose(plain[row, t_star], steered[row, t_star])
        torch.testing.assert_close(plain[row, :t_star], steered[row, :t_star])
    assert_no_hooks(model)


def test_return_sequences_map_to_their_own_conversation(llama):
    _, _, guard = llama
    kw = dict(num_beams=2, num_return_sequences=2)
    batch = guard.generate([CONV_A, CONV_B], **kw)
    assert len(batch) == 2
    for got, conv in zip(batch, (CONV_A, CONV_B), strict=True):
        alone = guard.generate(conv, **kw)
        assert len(got.texts) == 2 and got.text == got.texts[0]
        assert got.texts == alone.texts and got.token_ids == alone.token_ids
    assert batch[0].texts != batch[1].texts


def test_sampled_return_sequences_and_generation_config_are_planned(llama):
    _, _, guard = llama
    torch.manual_seed(0)
    sampled = guard.generate([CONV_A, CONV_B], do_sample=True, num_return_sequences=3)
    assert [len(r.texts) for r in sampled] == [3, 3]
    assert all(r.intervened for r in sampled)
    via_config = guard.generate(
        [CONV_A, CONV_B], generation_config=GenerationConfig(num_beams=2, max_new_tokens=6)
    )
    direct = guard.generate([CONV_A, CONV_B], num_beams=2)
    assert [r.token_ids for r in via_config] == [r.token_ids for r in direct]


def test_an_unplanned_batch_shape_fails_closed(llama, monkeypatch):
    _, _, guard = llama
    # Pretend the guardrail misread the strategy: the hook sees 4 rows, planned 2.
    monkeypatch.setattr(Guardrail, "_expansion", lambda self, kwargs: (1, 1))
    results = guard.generate([CONV_A, CONV_B], num_beams=2)
    assert all(r.finish_reason == "guardrail_error" and r.refused for r in results)
    assert "prefill batch has 4 rows" in results[0].error
    shadowed = Guardrail(guard.model, guard.processor, guard.policy, on_error="raise")
    with pytest.raises(SteeringError, match="expected 2 conversations x 1"):
        shadowed.generate([CONV_A, CONV_B], num_beams=2)


@pytest.mark.parametrize("name", ["assistant_model", "prompt_lookup_num_tokens"])
def test_decoding_that_skips_the_prefill_is_rejected(llama, name):
    model, _, guard = llama
    with pytest.raises(InputError, match=name):
        guard.generate(CONV_A, **{name: model if name == "assistant_model" else 3})


# ----------------------------------------------------------------------------- trust gate


@pytest.fixture(scope="module")
def signed(tmp_path_factory, llama):
    model, tok, _ = llama
    private, public = generate_keypair()
    store = TrustStore({"release": public})
    root = tmp_path_factory.mktemp("bundles")
    good = random_policy(model, tok, layer=1, seed=3, version="1.0.0", tau=-10.0, lam=4.0)
    path = good.save_pretrained(root / "signed")
    sign_bundle(path, private, "release")
    unsigned = random_policy(model, tok, layer=2, seed=4, version="2.0.0", tau=-10.0, lam=4.0)
    unsigned_path = unsigned.save_pretrained(root / "unsigned")
    return store, path, unsigned_path


def test_per_call_policy_passes_the_trust_store(llama, signed):
    model, tok, _ = llama
    store, path, unsigned_path = signed
    guard = Guardrail(model, tok, path, trust_store=store)
    unsigned = PolicyBundle.from_pretrained(unsigned_path)
    with pytest.raises(PolicySignatureError, match="unsigned"):
        guard.generate(CONV_A, policy=unsigned)
    with pytest.raises(PolicySignatureError):
        guard.score(CONV_A, policy=unsigned)
    tampered = PolicyBundle.from_pretrained(path).with_parameters(tau=5.0)
    with pytest.raises(PolicySignatureError):
        guard.generate(CONV_A, policy=tampered)
    assert guard.generate(CONV_A, policy=PolicyBundle.from_pretrained(path)).intervened


def test_rollouts_built_without_the_store_are_verified(llama, signed):
    model, tok, _ = llama
    store, path, unsigned_path = signed
    foreign = Rollout({"stable": str(path), "shadow": [str(unsigned_path)]})  # no trust store
    guard = Guardrail(model, tok, path, trust_store=store)
    with pytest.raises(PolicySignatureError):
        guard.set_rollout(foreign)
    assert guard.rollout is None
    with pytest.raises(PolicySignatureError):
        Guardrail(model, tok, trust_store=store, rollout=foreign)
    # A rollout that was fine when set and later updated to an unsigned bundle.
    ok = Rollout({"stable": str(path)})
    guard.set_rollout(ok)
    ok.update({"stable": str(unsigned_path)})
    with pytest.raises(PolicySignatureError):
        guard.generate(CONV_A, key="user-1")


def test_a_bundle_for_another_model_is_a_compatibility_error(llama):
    model, tok, guard = llama
    other_model, other_tok = tiny("llama", seed=7)
    other = random_policy(other_model, other_tok, layer=1)
    bigger_model, bigger_tok = tiny_model("llama", num_layers=8)
    deep = random_policy(bigger_model, bigger_tok, layer=7)
    with pytest.raises(PolicyCompatibilityError):
        guard.generate(CONV_A, policy=deep)
    with pytest.raises(PolicyCompatibilityError):
        guard.score(CONV_A, policy=deep)
    with pytest.raises(PolicyCompatibilityError):
        guard.generate(CONV_A, policy=other)


def test_a_sealed_bundle_changed_in_memory_is_refused(llama, signed):
    model, tok, guard = llama
    _, path, _ = signed
    bundle = PolicyBundle.from_pretrained(path)
    bundle.tensors["u"] = -bundle.tensors["u"]
    with pytest.raises(PolicyIntegrityError, match="tensors do not match"):
        guard.generate(CONV_A, policy=bundle)


def test_trust_region_is_bounded_and_a_non_finite_step_fails_closed(llama):
    model, tok, guard = llama
    with pytest.raises(ValueError, match="kappa"):
        strong_policy(model, tok, lam=1e30, kappa=1e30)
    bundle = strong_policy(model, tok)
    bundle.tensors["g"] = torch.tensor(3e38)  # a hand-edited in-memory bundle
    result = guard.generate(CONV_A, policy=bundle)
    assert result.refused and result.finish_reason == "guardrail_error"
    assert "not finite" in result.error


# ----------------------------------------------------------------------------- threads


def test_score_on_one_thread_never_stops_generation_on_another(llama):
    model, tok, guard = llama
    deep = random_policy(model, tok, layer=3, seed=5)
    reference = guard.generate(CONV_A)
    expected_score = guard.score(CONV_B, policy=deep)
    stop = threading.Event()
    errors: list[BaseException] = []
    scores: list[float] = []

    def scorer() -> None:
        while not stop.is_set():
            try:
                scores.append(guard.score(CONV_B, policy=deep))
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

    thread = threading.Thread(target=scorer)
    thread.start()
    try:
        outputs = [guard.generate(CONV_A) for _ in range(12)]
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert scores and all(s == pytest.approx(expected_score, abs=1e-5) for s in scores)
    assert all(o.token_ids == reference.token_ids for o in outputs)


def test_threaded_stress_matches_single_threaded_references(tmp_path):
    """8 threads and 8 asyncio tasks: generate, stream, agenerate, score(), shadow
    versions scored at a later layer, mixed modes, and rollout changes, all on one model;
    every result equals its single-threaded reference."""
    model, tok = tiny("llama")
    v1 = random_policy(model, tok, layer=1, seed=1, name="p", version="1.0.0", tau=-0.5, lam=4.0)
    v2 = random_policy(model, tok, layer=2, seed=2, name="p", version="2.0.0", tau=-0.5, lam=4.0)
    v3 = random_policy(model, tok, layer=3, seed=3, name="p", version="3.0.0", tau=0.0, lam=4.0)
    paths = {b.version: str(b.save_pretrained(tmp_path / b.version)) for b in (v1, v2, v3)}
    config = {
        "stable": paths["1.0.0"],
        "canary": {"ref": paths["2.0.0"], "share": 0.5},
        "shadow": [paths["3.0.0"]],
    }
    guard = Guardrail(model, tok, rollout=config, max_new_tokens=4)
    bundles = {b.version: b for b in (guard.rollout.stable, guard.rollout.canary)}
    scorer = guard.rollout.shadows[0]
    prompts = [f"Question {k}: what is {k} plus {k + 1}?" for k in range(6)]

    # Single-threaded references: per prompt, version and mode; shadow score per prompt.
    ref: dict[tuple[int, str, str], tuple[list[int], float | None]] = {}
    for i, prompt in enumerate(prompts):
        for version, bundle in bundles.items():
            for mode in ("enforce", "shadow"):
                r = guard.generate(prompt, policy=bundle, mode=mode)
                ref[i, version, mode] = (r.token_ids, r.score)
        ref[i, None, "off"] = (guard.generate(prompt, policy=v1, mode="off").token_ids, None)
    shadow_ref = [guard.score(p, policy=scorer) for p in prompts]

    errors: list[BaseException] = []
    checked = {"generate": 0, "stream": 0, "score": 0, "async": 0, "shadow": 0}
    lock = threading.Lock()

    def check(i: int, result, mode: str) -> None:
        version = result.policy_version if mode != "off" else None
        tokens, score = ref[i, version, mode]
        assert result.token_ids == tokens, (i, version, mode)
        if mode != "off":
            assert result.score == pytest.approx(score, rel=1e-4, abs=1e-5)
            assert len(result.shadow) == 1
            assert result.shadow[0].score == pytest.approx(shadow_ref[i], rel=1e-4, abs=1e-5)
            with lock:
                checked["shadow"] += 1

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(8):
                i = rng.randrange(len(prompts))
                op = rng.choice(["generate", "generate", "stream", "score"])
                mode = rng.choice(["enforce", "shadow", "off"])
                if op == "score":
                    got = guard.score(prompts[i], policy=scorer)
                    assert got == pytest.approx(shadow_ref[i], rel=1e-4, abs=1e-5)
                elif op == "stream":
                    *_, result = guard.stream(prompts[i], mode=mode, key=f"user-{seed}-{i}")
                    check(i, result, mode)
                else:
                    check(i, guard.generate(prompts[i], mode=mode, key=f"u{seed}-{i}"), mode)
                with lock:
                    checked[op] += 1
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    def changer() -> None:
        rng = random.Random(99)
        try:
            for _ in range(12):
                guard.rollout.set_canary_share(rng.choice([0.0, 0.5, 1.0]))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    async def tasks() -> None:
        async def one(k: int) -> None:
            i = k % len(prompts)
            mode = ("enforce", "shadow", "off")[k % 3]
            if k % 2:
                result = await guard.agenerate(prompts[i], mode=mode, key=f"a{k}")
            else:
                result = None
                async for item in guard.astream(prompts[i], mode=mode, key=f"s{k}"):
                    result = item
            check(i, result, mode)
            with lock:
                checked["async"] += 1

        await asyncio.gather(*(one(k) for k in range(8)))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    threads.append(threading.Thread(target=changer))
    async_errors: list[BaseException] = []

    def run_tasks() -> None:
        try:
            asyncio.run(tasks())
        except BaseException as exc:  # noqa: BLE001
            async_errors.append(exc)

    threads.append(threading.Thread(target=run_tasks))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors and not async_errors, (errors + async_errors)[:3]
    assert checked["async"] == 8
    assert checked["generate"] + checked["stream"] + checked["score"] == 64
    assert checked["score"] > 0 and checked["stream"] > 0 and checked["shadow"] > 0
    assert_no_hooks(model)


def test_hooks_of_one_context_are_invisible_to_another(llama):
    model, _, guard = llama
    convs = [parse_conversation(CONV_A)]
    inputs = guard.adapter.build_inputs(convs)
    with torch.no_grad():
        plain = model(**inputs).logits
    entered = threading.Event()
    release = threading.Event()
    outputs: dict[str, torch.Tensor] = {}

    def holder() -> None:
        plans = guard._plans([guard.policy], convs, inputs["attention_mask"], apply=True)
        with torch.no_grad(), steering_hooks(guard.adapter.layers, plans):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    entered.wait(10)
    try:
        with torch.no_grad():
            outputs["other"] = model(**inputs).logits
    finally:
        release.set()
        thread.join()
    torch.testing.assert_close(outputs["other"], plain)


def test_a_single_message_dict_is_one_conversation_everywhere(llama):
    from guardrail.observability.events import CallbackSink

    model, tok, _ = llama
    events = []
    guard = Guardrail(
        model,
        tok,
        strong_policy(model, tok),
        sinks=[CallbackSink(events.append)],
        capture_content=True,
        max_new_tokens=3,
    )
    message = {"role": "user", "content": "Tell me about the weather on Mars today."}
    result = guard.generate(message)
    assert result.token_ids == guard.generate([message]).token_ids
    assert events and events[0].prompt == message["content"]
    *_, streamed = guard.stream(message)
    assert streamed.token_ids == result.token_ids
    assert guard.score(message) == pytest.approx(result.score, abs=1e-5)
