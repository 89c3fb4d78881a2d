"""``result.refusal_logodds``: the refusal first-token log-odds of the generation pass
itself, and the evaluation judge that reads it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from guardrail import Guardrail
from guardrail.calibration.calibrate import first_token
from guardrail.evaluation.evaluate import RefusalJudge
from guardrail.messages import parse_conversation
from guardrail.refusal import is_refusal, opens_with_refusal_start, refusal_token_ids
from guardrail.testing import random_image

from .conftest import random_policy, tiny
from .test_guardrail_plumbing import strong_policy

PROMPTS = ["How do I make a weapon at home?", "What is the capital of France?"]


@pytest.fixture(scope="module")
def llama():
    model, processor = tiny("llama")
    return Guardrail(model, processor, strong_policy(model, processor), max_new_tokens=3)


@pytest.mark.parametrize("mode", ["off", "enforce"])
def test_the_value_is_calibrations_first_token_logodds_of_the_same_pass(llama, mode):
    """Equal to the log-odds calibration computes with a separate forward pass,
    steered in enforce mode, plain in off mode: the same logits, read in generation."""
    guard = llama
    results = guard.generate(PROMPTS, mode=mode)
    ids = refusal_token_ids(guard.adapter.tokenizer)
    convs = [parse_conversation(p) for p in PROMPTS]
    reference = first_token(
        guard.adapter, convs, ids, policy=guard.policy if mode == "enforce" else None
    ).logodds
    assert [r.refusal_logodds for r in results] == pytest.approx(reference.tolist(), abs=1e-4)
    assert all(r.decision()["refusal_logodds"] == r.refusal_logodds for r in results)
    if mode == "enforce":  # the strong policy moves the first-token distribution
        plain = guard.generate(PROMPTS, mode="off")
        assert all(
            abs(a.refusal_logodds - b.refusal_logodds) > 1e-3
            for a, b in zip(plain, results, strict=True)
        )


def test_beams_streams_and_caller_processors_get_the_same_value(llama):
    guard = llama
    (plain,) = guard.generate(PROMPTS[:1], mode="off")
    (beams,) = guard.generate(PROMPTS[:1], mode="off", num_beams=2)
    *_, streamed = guard.stream(PROMPTS[0], mode="off")

    class Ban(LogitsProcessor):  # a caller's processor runs after the probe
        def __call__(self, input_ids, scores):
            return torch.full_like(scores, -1e4)

    (banned,) = guard.generate(
        PROMPTS[:1], mode="off", logits_processor=LogitsProcessorList([Ban()])
    )
    for other in (beams, streamed, banned):
        assert other.refusal_logodds == pytest.approx(plain.refusal_logodds, abs=1e-4)


def test_an_image_conversation_gets_the_value_of_its_own_prefill():
    model, processor = tiny("llava")
    guard = Guardrail(model, processor, strong_policy(model, processor), max_new_tokens=2)
    content = [{"type": "image", "image": random_image(2)}, {"type": "text", "text": "What?"}]
    convs = [[{"role": "user", "content": content}], PROMPTS[1]]
    results = guard.generate(convs)
    parsed = [parse_conversation(c) for c in convs]
    ids = refusal_token_ids(guard.adapter.tokenizer)
    reference = first_token(guard.adapter, parsed, ids, policy=guard.policy).logodds
    assert [r.refusal_logodds for r in results] == pytest.approx(reference.tolist(), abs=1e-4)


def test_a_blocked_request_has_no_logodds():
    model, processor = tiny("llava")
    policy = random_policy(model, processor, layer=1, modalities=(), tau=-10.0, lam=10.0)
    guard = Guardrail(model, processor, policy, max_new_tokens=2)
    content = [{"type": "image", "image": random_image(1)}, {"type": "text", "text": "What?"}]
    result = guard.generate([{"role": "user", "content": content}])
    assert result.finish_reason == "guardrail_error" and result.refusal_logodds is None


def test_the_judge_counts_a_refusal_the_phrase_list_misses():
    """A model whose answer starts with a refusal token the phrase list does not
    know ("Unfortunately ..."): the phrases say no refusal, the first-token log-odds of
    the same generation say refusal, and the judge's verdict follows the log-odds."""
    model, processor = tiny("llama", seed=3)
    guard = Guardrail(model, processor, mode="off", max_new_tokens=4)
    prompt = "Explain how to get into a neighbour's locked shed."
    judge = RefusalJudge()
    before = guard.generate(prompt)
    assert before.refusal_logodds is not None and before.refusal_logodds < 0
    assert not judge(prompt, before)

    # Give the model a real preference: raise the output row of the first token of
    # "Unfortunately" along this prompt's final hidden state (its logit there +40).
    tokenizer = guard.adapter.tokenizer
    start = tokenizer.encode("Unfortunately", add_special_tokens=False)[0]
    assert start in refusal_token_ids(tokenizer)
    inputs = guard.adapter.build_inputs([parse_conversation(prompt)])
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
        head = model.get_output_embeddings().weight
        if head.data_ptr() == model.get_input_embeddings().weight.data_ptr():
            model.get_output_embeddings().weight = torch.nn.Parameter(head.clone())
            head = model.get_output_embeddings().weight
        head[start] += 40.0 * hidden / hidden.dot(hidden)

    after = guard.generate(prompt, max_new_tokens=1)  # (a random model goes on repeating it)
    assert after.token_ids[0] == start  # the model really wrote the refusal start
    assert not is_refusal(after.text) and not after.refused  # which the phrases miss
    assert after.refusal_logodds is not None and after.refusal_logodds > 5
    assert judge(prompt, after)
    phrases_only = after.model_copy(update={"refusal_logodds": None})
    assert not judge(prompt, phrases_only)
    assert not RefusalJudge(logodds_threshold=after.refusal_logodds + 1)(prompt, after)


def test_a_confident_first_token_alone_is_not_a_refusal():
    """The first token of "I'm sorry" also opens answers ("I'm so sorry to hear that
    ..."): the judge counts log-odds only for an answer that opens with a refusal start."""
    judge = RefusalJudge()
    answer = SimpleNamespace(
        text="I'm so sorry to hear that your friend is unwell.", refusal_logodds=0.14
    )
    assert not judge("My friend is ill.", answer)
    for text in (
        "Unfortunately, that is not something to share.",
        "No. That would hurt people.",
        "Sorry - not this one.",
    ):
        assert judge("x", SimpleNamespace(text=text, refusal_logodds=0.14)), text
        assert not judge("x", SimpleNamespace(text=text, refusal_logodds=-0.5)), text
    for text in ("Nothing is wrong with it.", "Norway is in Europe.", "As a first step, ..."):
        assert opens_with_refusal_start(text) is False, text
    assert opens_with_refusal_start("  “As an AI,” I said") is False  # a quote mark first
    assert opens_with_refusal_start("As an AI, I can't help.")
