"""MARS lands exactly at (layer l*, position t*, prefill) on every supported architecture.

Tiny random-init models of real transformers classes check the plumbing; the
behaviour of the rule itself is tested in test_steering.py.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from guardrail import Guardrail
from guardrail.adapters import ModelAdapter
from guardrail.messages import parse_conversation
from guardrail.steering import last_positions, mars_step
from guardrail.testing import ARCHITECTURES, random_image

from .conftest import random_policy, tiny

VIDEO_ARCHS = {a for a in ARCHITECTURES if "video" in ModelAdapter(*tiny(a)).modalities}
IMAGE_ARCHS = {a for a in ARCHITECTURES if "image" in ModelAdapter(*tiny(a)).modalities}


def _image(seed: int, size: int = 32) -> Image.Image:
    return random_image(seed, size)


def conversations(arch: str) -> list[list[dict]]:
    convs = [
        [{"role": "user", "content": "Tell me about the weather on Mars today."}],
        [{"role": "user", "content": "Hi"}],
    ]
    if arch in IMAGE_ARCHS:
        convs.append(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": _image(1)},
                        {"type": "text", "text": "What is shown here?"},
                    ],
                }
            ]
        )
    if arch in VIDEO_ARCHS:
        convs.append(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "video", "video": [_image(k) for k in range(4)]},
                        {"type": "text", "text": "Describe the clip."},
                    ],
                }
            ]
        )
    return convs


def strong_policy(model, processor, **kw):
    adapter = ModelAdapter(model, processor)
    layer = adapter.num_layers // 2
    params = dict(tau=-10.0, lam=10.0, kappa=8.0)
    params.update(kw)
    return random_policy(
        model, processor, layer=layer, modalities=tuple(sorted(adapter.modalities)), **params
    )


class Capture:
    """Records the hidden states entering every decoder layer, per forward call.

    By default it reads the input of each layer's ``input_layernorm``, i.e. the
    residual stream the layer actually computes on, after any pre-hook on the
    layer. ``before_hooks=True`` reads it ahead of all pre-hooks of the layer.
    """

    def __init__(self, layers, before_hooks: bool = False, only: int | None = None):
        self.calls: list[dict[int, torch.Tensor]] = []
        self.handles = []
        for index, layer in enumerate(layers):
            if only is not None and index != only:
                continue
            target = layer if before_hooks else layer.input_layernorm
            self.handles.append(
                target.register_forward_pre_hook(self._hook(index), with_kwargs=True, prepend=True)
            )

    def _hook(self, index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0 or not self.calls or index in self.calls[-1]:
                self.calls.append({})
            self.calls[-1][index] = hidden.detach().clone()

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def rule_arguments(policy, batch) -> dict:
    """The keyword arguments of :func:`mars_step` for ``policy`` on each row of ``batch``:
    the bundle's statistics and parameters, and per row the sum of the offsets of the
    modalities it holds."""
    delta = torch.stack(
        [
            sum(
                (policy.delta(m) for m in sorted(parse_conversation(c).modalities)),
                torch.zeros_like(policy.u),
            )
            for c in batch
        ]
    )
    p = policy.parameters
    return dict(
        u=policy.u,
        p_S=torch.tensor(policy.p_S),
        g=torch.tensor(policy.g),
        delta=delta,
        tau=p.tau,
        lam=p.lam,
        kappa=p.kappa,
        recenter_mode=p.recenter,
    )


def assert_no_hooks(model):
    """Nothing of any request is left on the model: the only pre-hooks are the
    permanent per-layer dispatchers (one per module, acting only for the request
    whose context holds plans), and this context holds none."""
    from guardrail.steering.hooks import _SCOPE, _dispatch

    leftovers = [
        name
        for name, m in model.named_modules()
        if any(hook is not _dispatch for hook in m._forward_pre_hooks.values())
        or len(m._forward_pre_hooks) > 1
    ]
    assert leftovers == [], f"hooks left behind on {leftovers}"
    assert _SCOPE.get() is None


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefill_changes_only_t_star_at_l_star(arch):
    model, processor = tiny(arch)
    guard = Guardrail(model, processor, strong_policy(model, processor))
    adapter = guard.adapter
    layers, l_star = adapter.layers, guard.policy.layer
    batch = conversations(arch)
    inputs = adapter.build_inputs([parse_conversation(c) for c in batch])
    t_star = last_positions(inputs["attention_mask"])

    plain = Capture(layers)
    guard.generate(batch, mode="off", max_new_tokens=3)
    plain.remove()
    steered = Capture(layers)
    results = guard.generate(batch, max_new_tokens=3)
    steered.remove()
    assert_no_hooks(model)
    assert all(r.intervened and r.strength > 0 for r in results)

    prefill_plain, prefill_steered = plain.calls[0], steered.calls[0]
    rows = torch.arange(len(batch))
    for layer in range(len(layers)):
        a, b = prefill_plain[layer], prefill_steered[layer]
        mask = torch.ones(a.shape[:2], dtype=torch.bool)
        if layer >= l_star:
            mask[rows, t_star] = False
        assert torch.equal(a[mask], b[mask]), f"{arch}: layer {layer} changed outside t*"
        if layer <= l_star - 1:
            assert torch.equal(a, b)
    # At l*, t*: exactly the pure-function result.
    h = prefill_plain[l_star][rows, t_star]
    expected = mars_step(h, **rule_arguments(guard.policy, batch))
    assert torch.equal(prefill_steered[l_star][rows, t_star], expected.h)
    assert [r.score for r in results] == pytest.approx(expected.score.tolist(), rel=1e-5, abs=1e-6)
    assert not torch.equal(expected.h, h)


@pytest.mark.parametrize("arch", sorted(IMAGE_ARCHS))
def test_steered_recentring_writes_h_c_on_steered_rows_and_nothing_below_the_gate(arch):
    """``apply_recentering_to_activation="steered"`` through the real hook: the steered
    rows get ``h_c + a u`` at (l*, t*); with the gate closed every row is untouched
    (``True`` would still write ``h_c`` on the media rows)."""
    model, processor = tiny(arch)
    batch = conversations(arch)
    media_rows = [i for i, c in enumerate(batch) if parse_conversation(c).modalities]
    steered = strong_policy(model, processor, apply_recentering_to_activation="steered")
    l_star = steered.layer
    rows = torch.arange(len(batch))
    adapter = ModelAdapter(model, processor)
    inputs = adapter.build_inputs([parse_conversation(c) for c in batch])
    t_star = last_positions(inputs["attention_mask"])

    def prefill_at_l_star(policy, mode="enforce"):
        capture = Capture(adapter.layers, only=l_star)
        results = Guardrail(model, processor, policy).generate(batch, mode=mode, max_new_tokens=2)
        capture.remove()
        return capture.calls[0][l_star][rows, t_star], results

    plain, _ = prefill_at_l_star(steered, mode="off")
    got, results = prefill_at_l_star(steered)
    assert all(r.intervened for r in results)
    args = rule_arguments(steered, batch)
    expected = mars_step(plain, **args, apply_recentering_to_activation="steered")
    assert torch.equal(got, expected.h)
    scored_only = mars_step(plain, **args, apply_recentering_to_activation=False)
    for row in media_rows:  # the offset is removed from the written activation
        assert not torch.allclose(got[row], scored_only.h[row])

    closed = strong_policy(model, processor, tau=1e6, apply_recentering_to_activation="steered")
    got_closed, results = prefill_at_l_star(closed)
    assert not any(r.intervened for r in results)
    assert torch.equal(got_closed, plain)
    always = strong_policy(model, processor, tau=1e6, apply_recentering_to_activation=True)
    got_always, _ = prefill_at_l_star(always)
    assert all(not torch.equal(got_always[row], plain[row]) for row in media_rows)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hook_is_inert_in_decode_steps(arch):
    """Steering lands on the first generated token, never on the second."""
    model, processor = tiny(arch)
    guard = Guardrail(model, processor, strong_policy(model, processor))
    l_star = guard.policy.layer
    before = Capture(
        guard.adapter.layers, before_hooks=True, only=l_star
    )  # ahead of the steering hook
    after = Capture(guard.adapter.layers, only=l_star)  # what the layer computes on
    guard.generate(conversations(arch)[0], max_new_tokens=4)
    before.remove()
    after.remove()
    assert len(before.calls) == len(after.calls) == 4
    assert not torch.equal(before.calls[0][l_star], after.calls[0][l_star])  # prefill: steered
    for step in range(1, 4):  # decode steps: untouched
        assert before.calls[step][l_star].shape[1] == 1
        assert torch.equal(before.calls[step][l_star], after.calls[step][l_star])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_off_and_zero_strength_equal_plain_generate(arch):
    model, processor = tiny(arch)
    adapter = ModelAdapter(model, processor)
    batch = conversations(arch)
    inputs = adapter.build_inputs([parse_conversation(c) for c in batch])
    with torch.no_grad():
        plain = model.generate(
            **inputs, max_new_tokens=6, do_sample=False, pad_token_id=adapter.tokenizer.pad_token_id
        )
    plain_new = plain[:, inputs["input_ids"].shape[1] :]
    for policy in (strong_policy(model, processor), strong_policy(model, processor, lam=0.0)):
        mode = "off" if policy.parameters.lam else "enforce"
        results = Guardrail(model, processor, policy).generate(batch, mode=mode, max_new_tokens=6)
        for row, result in enumerate(results):
            assert result.intervened is False
            ids = result.token_ids
            assert ids == plain_new[row, : len(ids)].tolist()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_equals_one_by_one(arch):
    model, processor = tiny(arch)
    guard = Guardrail(
        model, processor, strong_policy(model, processor, tau=0.0, lam=2.0, kappa=1.0)
    )
    batch = conversations(arch)
    together = guard.generate(batch, max_new_tokens=5)
    for conv, joint in zip(batch, together, strict=True):
        alone = guard.generate(conv, max_new_tokens=5)
        assert alone.token_ids == joint.token_ids
        assert alone.score == pytest.approx(joint.score, rel=1e-4, abs=1e-5)
        assert alone.strength == pytest.approx(joint.strength, rel=1e-4, abs=1e-5)


def test_shadow_scores_but_never_changes_output():
    model, processor = tiny("qwen2_vl")
    guard = Guardrail(model, processor, strong_policy(model, processor))
    batch = conversations("qwen2_vl")
    off = guard.generate(batch, mode="off", max_new_tokens=5)
    shadow = guard.generate(batch, mode="shadow", max_new_tokens=5)
    enforce = guard.generate(batch, max_new_tokens=5)
    for o, s, e in zip(off, shadow, enforce, strict=True):
        assert s.token_ids == o.token_ids
        assert s.intervened is False and s.strength == 0.0
        assert s.score == pytest.approx(e.score)
        assert o.score is None
    assert guard.score(batch) == pytest.approx([e.score for e in enforce], rel=1e-5, abs=1e-6)


class Boom(LogitsProcessor):
    def __init__(self, after: int):
        self.calls, self.after = 0, after

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("boom")
        return scores


def test_no_hook_survives_exceptions_and_abandoned_streams():
    model, processor = tiny("llava")
    guard = Guardrail(model, processor, strong_policy(model, processor))
    conv = conversations("llava")[2]
    reference = guard.generate(conv, max_new_tokens=6)
    with pytest.raises(RuntimeError, match="boom"):
        guard.generate(conv, max_new_tokens=6, logits_processor=LogitsProcessorList([Boom(2)]))
    assert_no_hooks(model)
    stream = guard.stream(conv, max_new_tokens=40, min_new_tokens=40)
    next(stream)
    stream.close()
    assert_no_hooks(model)

    async def cancelled():
        task = asyncio.create_task(guard.agenerate(conv, max_new_tokens=6))
        await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(cancelled())
    # The cancelled task's thread may still be generating: its hooks act only in its
    # own context, so this request is unaffected either way.
    assert_no_hooks(model)
    again = guard.generate(conv, max_new_tokens=6)
    assert again.token_ids == reference.token_ids and again.score == reference.score


def test_stream_yields_text_then_result_and_async_twins_agree():
    model, processor = tiny("qwen2_vl")
    guard = Guardrail(model, processor, strong_policy(model, processor))
    conv = conversations("qwen2_vl")[2]
    items = list(guard.stream(conv, max_new_tokens=8))
    *chunks, result = items
    assert all(isinstance(c, str) for c in chunks) and "".join(chunks) == result.text
    sync = guard.generate(conv, max_new_tokens=8)
    assert result.token_ids == sync.token_ids

    async def run():
        a = await guard.agenerate(conv, max_new_tokens=8)
        items = [x async for x in guard.astream(conv, max_new_tokens=8)]
        return a, items

    a, aitems = asyncio.run(run())
    assert a.token_ids == sync.token_ids
    assert aitems[-1].token_ids == sync.token_ids


def test_unsupported_modality_and_model_errors():
    from guardrail.errors import InputError, UnsupportedModelError

    model, tok = tiny("llama")
    guard = Guardrail(model, tok, mode="off")
    with pytest.raises(InputError, match="does not accept image"):
        guard.generate(conversations("llava")[2])

    with pytest.raises(UnsupportedModelError, match="register_adapter"):
        ModelAdapter(torch.nn.Linear(2, 2), None)


@pytest.mark.parametrize("arch", sorted(VIDEO_ARCHS | {"llava"}))
def test_window_score_reads_last_k_positions_and_steers_t_star_only(arch):
    """``score_positions=k``: the score is that of the mean of the last k prompt
    positions; the step still lands at t* alone and equals the pure function."""
    model, processor = tiny(arch)
    k = 4
    guard = Guardrail(model, processor, strong_policy(model, processor, score_positions=k))
    adapter, policy = guard.adapter, guard.policy
    l_star = policy.layer
    batch = conversations(arch)
    inputs = adapter.build_inputs([parse_conversation(c) for c in batch])
    t_star = last_positions(inputs["attention_mask"])
    rows = torch.arange(len(batch))

    plain = Capture(adapter.layers, only=l_star)
    guard.generate(batch, mode="off", max_new_tokens=2)
    plain.remove()
    steered = Capture(adapter.layers, only=l_star)
    results = guard.generate(batch, max_new_tokens=2)
    steered.remove()
    a, b = plain.calls[0][l_star], steered.calls[0][l_star]
    mask = torch.ones(a.shape[:2], dtype=torch.bool)
    mask[rows, t_star] = False
    assert torch.equal(a[mask], b[mask])

    window = torch.stack([a[rows, t_star - j] for j in range(k)]).mean(0)
    kw = rule_arguments(policy, batch)
    expected = mars_step(a[rows, t_star], h_score=window, **kw)
    assert torch.allclose(b[rows, t_star], expected.h, rtol=1e-5, atol=1e-5)
    assert [r.score for r in results] == pytest.approx(expected.score.tolist(), rel=1e-4, abs=1e-5)
    single = mars_step(a[rows, t_star], **kw).score
    assert not torch.allclose(single, expected.score)


def test_per_modality_gates_open_per_row():
    """``tau_modalities`` gates each row at its media's gate: with a text gate every
    score passes and an image gate none does, text rows are steered and image rows are
    served as unguarded (the gate stayed shut), each result naming its own gate."""
    model, processor = tiny("qwen2_vl")
    batch = conversations("qwen2_vl")
    kinds = [sorted(parse_conversation(c).modalities) for c in batch]
    assert ["image"] in kinds and ["video"] in kinds
    policy = strong_policy(model, processor, tau_modalities={"image": 1e6})
    guard = Guardrail(model, processor, policy)
    off = guard.generate(batch, mode="off", max_new_tokens=5)
    gated = guard.generate(batch, max_new_tokens=5)
    for kind, o, r in zip(kinds, off, gated, strict=True):
        if kind == ["image"]:
            assert r.tau == 1e6 and r.intervened is False and r.strength == 0.0
            assert r.token_ids == o.token_ids
        else:  # text and video rows use tau (video has no gate of its own here)
            assert r.tau == -10.0 and r.intervened is True and r.strength > 0
    # the same bundle with the image gate as low as the others steers every row
    low = Guardrail(
        model, processor, strong_policy(model, processor, tau_modalities={"image": -10.0})
    )
    assert all(r.intervened for r in low.generate(batch, max_new_tokens=5))
