"""Hostile input, fuzzing, fail-closed behaviour, concurrency and bundle supply chain."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from guardrail import Guardrail
from guardrail.errors import GuardrailError, InputError, PolicyIntegrityError
from guardrail.messages import InputLimits, parse_conversation
from guardrail.policy.bundle import MANIFEST, TENSORS, PolicyBundle, parse_manifest

from .conftest import random_policy, tiny
from .test_guardrail_plumbing import assert_no_hooks, strong_policy


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _image_msg(image) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"}],
        }
    ]


@pytest.fixture(scope="module")
def llava_guard():
    model, processor = tiny("llava")
    return Guardrail(model, processor, strong_policy(model, processor))


# ----------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "messages is empty"),
        ("", None),  # an empty string is a valid (empty) user message
        ([{"role": "robot", "content": "x"}], "message 0 has an unknown role"),
        ([{"role": "user"}], "has no 'content'"),
        ([{"role": "user", "content": 42}], "content is a int"),
        ([{"role": "user", "content": [{"type": "text", "text": 7}]}], "needs a string 'text'"),
        ([{"role": "user", "content": [{"type": "audio", "audio": b""}]}], "has an unknown type"),
        ([{"role": "user", "content": [None]}], "is a NoneType"),
        ([{"role": "assistant", "content": "hello"}], "no user message"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "last message is from the assistant",
        ),
        ([{"role": "user", "content": [{"type": "image"}]}], "image part has no 'image'"),
        ([{"role": "user", "content": [{"type": "video", "video": []}]}], "zero frames"),
        (b"bytes", "must be a list"),
        ([["nested"]], "message 0 is a list"),
    ],
)
def test_malformed_messages_raise_input_error(messages, match):
    if match is None:
        assert parse_conversation(messages).messages[0]["content"][0]["text"] == ""
        return
    with pytest.raises(InputError, match=match):
        parse_conversation(messages)


def test_broken_images_are_rejected_and_service_continues(llava_guard, tmp_path):
    good = Image.new("RGB", (32, 32), "green")
    truncated = _png(Image.effect_noise((64, 64), 50).convert("RGB"))[:200]
    empty_file = tmp_path / "empty.png"
    empty_file.write_bytes(b"")
    cases = [
        (b"", "zero-byte"),
        (truncated, "truncated or corrupt|not a readable image"),
        (b"not an image at all", "not a readable image"),
        (str(empty_file), "image path cannot be used"),
        (str(tmp_path / "missing.png"), "image path cannot be used"),
        (_png(Image.new("1", (20000, 20000))), "decompression bomb|too large"),
        (_png(Image.new("L", (5000, 5000))), "exceeds the limit"),
        (3.14, "image is a float"),
    ]
    for source, match in cases:
        with pytest.raises(InputError, match=match):
            llava_guard.generate(_image_msg(source), max_new_tokens=2)
    # wrong modes are converted, not rejected
    for mode in ("L", "RGBA", "P", "CMYK", "1"):
        result = llava_guard.generate(_image_msg(good.convert(mode)), max_new_tokens=2)
        assert result.usage.output_tokens == 2
    assert_no_hooks(llava_guard.model)


def test_video_frame_limits_and_unsupported_modality():
    frames = [Image.new("RGB", (16, 16), (k, k, k)) for k in range(5)]
    with pytest.raises(InputError, match="over the limit of 4"):
        parse_conversation(
            [{"role": "user", "content": [{"type": "video", "video": frames}]}],
            limits=InputLimits(max_video_frames=4),
        )
    mixed = frames[:2] + [Image.new("RGB", (8, 8))]
    with pytest.raises(InputError, match="different sizes"):
        parse_conversation([{"role": "user", "content": [{"type": "video", "video": mixed}]}])
    model, processor = tiny("gemma3")
    with pytest.raises(InputError, match="does not accept video"):
        Guardrail(model, processor).generate(
            [{"role": "user", "content": [{"type": "video", "video": frames}]}]
        )


def test_prompt_longer_than_context_is_rejected():
    model, tok = tiny("llama")
    guard = Guardrail(model, tok)
    limit = guard.adapter.max_positions
    with pytest.raises(InputError, match=f"over the model's context of {limit} tokens"):
        guard.generate("word " * (limit + 10), max_new_tokens=2)
    with pytest.raises(InputError, match="characters of text"):
        guard.generate("x" * 300_000)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
message_like = (
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system", "x"]) | json_values},
            optional={
                "content": json_values
                | st.lists(
                    st.fixed_dictionaries(
                        {"type": st.sampled_from(["text", "image", "video", "?"])},
                        optional={"text": json_values, "image": json_values, "video": json_values},
                    ),
                    max_size=3,
                )
            },
        ),
        max_size=4,
    )
    | json_values
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=message_like)
def test_fuzz_message_parser_only_raises_guardrail_errors(messages):
    try:
        parse_conversation(messages)
    except GuardrailError:
        pass


manifest_like = st.dictionaries(
    st.sampled_from(
        [
            "schema_version",
            "name",
            "version",
            "model",
            "layer",
            "parameters",
            "modalities",
            "calibration",
            "files",
            "digest",
            "created",
            "extra",
        ]
    ),
    json_values,
    max_size=10,
)


@settings(max_examples=300, deadline=None)
@given(raw=manifest_like)
def test_fuzz_manifest_parser_only_raises_integrity_errors(raw):
    try:
        parse_manifest(raw)
    except PolicyIntegrityError:
        pass


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(manifest=st.binary(max_size=200), tensors=st.binary(max_size=200))
def test_fuzz_bundle_files_only_raise_integrity_errors(tmp_path_factory, manifest, tensors):
    path = tmp_path_factory.mktemp("fuzz")
    (path / MANIFEST).write_bytes(manifest)
    (path / TENSORS).write_bytes(tensors)
    with pytest.raises(PolicyIntegrityError):
        PolicyBundle.from_pretrained(path)


# ----------------------------------------------------------------------------- fail closed


def test_enforce_fails_closed_when_policy_cannot_be_applied():
    model, processor = tiny("llava")
    text_only = random_policy(model, processor, layer=2, tau=-10, lam=5, kappa=2)  # no image offset
    image_conv = _image_msg(Image.new("RGB", (32, 32), "red"))
    closed = Guardrail(model, processor, text_only).generate(image_conv, max_new_tokens=4)
    assert closed.refused and closed.finish_reason == "guardrail_error"
    assert "no re-centring offset for image" in closed.error
    assert closed.text == "I can't help with that request."

    plain = Guardrail(model, processor, mode="off").generate(image_conv, max_new_tokens=4)
    opened = Guardrail(model, processor, text_only, on_error="fail_open").generate(
        image_conv, max_new_tokens=4
    )
    assert opened.token_ids == plain.token_ids and opened.error and not opened.intervened

    shadow = Guardrail(model, processor, text_only, mode="shadow").generate(
        image_conv, max_new_tokens=4
    )
    assert shadow.token_ids == plain.token_ids  # shadow never blocks nor changes output

    with pytest.raises(GuardrailError, match="no re-centring offset"):
        Guardrail(model, processor, text_only, on_error="raise").generate(
            image_conv, max_new_tokens=4
        )
    # text input is unaffected by the missing image offset
    text = Guardrail(model, processor, text_only).generate("hello", max_new_tokens=4)
    assert text.error is None and text.intervened


# ----------------------------------------------------------------------------- concurrency


def test_concurrent_requests_match_solo_results(llava_guard):
    model, processor = tiny("llava")
    other = strong_policy(model, processor, tau=0.0, lam=1.0, kappa=0.5)
    image = Image.new("RGB", (32, 32), "purple")
    jobs = []
    for k in range(12):
        conv = (
            _image_msg(image)
            if k % 3 == 0
            else [{"role": "user", "content": f"Question number {k}?"}]
        )
        mode = ("enforce", "shadow", "off")[k % 3]
        policy = other if k % 2 else None
        jobs.append((conv, mode, policy))
    solo = [llava_guard.generate(c, mode=m, policy=p, max_new_tokens=6) for c, m, p in jobs]
    barrier = threading.Barrier(4)

    def run(job):
        c, m, p = job
        try:
            barrier.wait(timeout=5)
        except threading.BrokenBarrierError:
            pass
        return llava_guard.generate(c, mode=m, policy=p, max_new_tokens=6)

    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(run, jobs))

    async def many():
        return await asyncio.gather(
            *(llava_guard.agenerate(c, mode=m, policy=p, max_new_tokens=6) for c, m, p in jobs)
        )

    asynced = asyncio.run(many())
    for alone, t, a in zip(solo, threaded, asynced, strict=True):
        assert t.token_ids == alone.token_ids and a.token_ids == alone.token_ids
        assert t.score == a.score == alone.score
        assert t.strength == a.strength == alone.strength
    assert_no_hooks(model)


# ----------------------------------------------------------------------------- supply chain


def test_bundle_swapped_while_reading_is_never_half_read(tmp_path, monkeypatch):
    model, tok = tiny("llama")
    v1 = random_policy(model, tok, version="1.0.0", seed=1)
    v2 = random_policy(model, tok, version="2.0.0", seed=2)
    path = v1.save_pretrained(tmp_path / "p")
    import guardrail.policy.bundle as policy_mod

    real = policy_mod._read_file
    swapped = {"done": False}

    def read_and_swap(file):
        data = real(file)
        if file.name == MANIFEST and not swapped["done"]:
            swapped["done"] = True
            v2.save_pretrained(path)  # replaced between reading the manifest and the tensors
        return data

    monkeypatch.setattr(policy_mod, "_read_file", read_and_swap)
    loaded = PolicyBundle.from_pretrained(path)
    assert swapped["done"]
    # the first read mixed v1's manifest with v2's tensors -> rejected, re-read whole
    assert loaded.version == "2.0.0"
    assert torch.equal(loaded.u, v2.u)


def test_manifest_for_another_model_is_refused_at_attach(tmp_path):
    model, tok = tiny("llama")
    bundle = random_policy(*tiny("llava"))
    from guardrail.errors import PolicyCompatibilityError

    with pytest.raises(PolicyCompatibilityError):
        Guardrail(model, tok, bundle)
    path = bundle.save_pretrained(tmp_path / "b")
    with pytest.raises(PolicyCompatibilityError):
        Guardrail(model, tok, path)
    raw = json.loads((path / MANIFEST).read_text())
    assert raw["model"]["architecture"] == "LlavaForConditionalGeneration"
