"""Tiny random-init models of real transformers (M)LLM architectures, for tests and quick runs.

``tiny_model(arch)`` builds the architecture's real model class (``LlavaForConditionalGeneration``,
``Qwen2VLForConditionalGeneration``, ...) from a tiny config (hidden size 64, a few layers) with
random weights, and its real processor class around the real SmolLM2 tokenizer, extended with the
architecture's vision special tokens. Image and video processors are configured for tiny inputs,
so a one-image prompt stays well under 200 tokens.

Every processor carries a small ChatML-like chat template that renders ``messages`` whose content is a
string or a list of ``{"type": "text" | "image" | "video"}`` parts, so that::

    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[img] or None, videos=[[f0, f1, f2, f3]] or None,
                       return_tensors="pt", padding=True)
    model.generate(**inputs, max_new_tokens=5, do_sample=False)

works. Gemma3, Idefics3 and SmolVLM want images nested per sample (``[[img], []]``) as soon as
one conversation of the batch has no image: ``nest_images`` turns the flat list into that. For
``"llama"`` the processor is the tokenizer itself.
"""

from __future__ import annotations

import copy
import functools
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "llava",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "gemma3",
    "idefics3",
    "smolvlm",
)

# Architectures whose processor accepts ``videos=``.
VIDEO_ARCHITECTURES: tuple[str, ...] = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "smolvlm")

# Architectures whose processor wants ``images`` nested per sample: ``[[img], []]``.
NESTED_IMAGE_ARCHITECTURES: tuple[str, ...] = ("gemma3", "idefics3", "smolvlm")

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"""The system turn SmolLM2's chat template writes when a conversation has none."""

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
MAX_POSITIONS = 4096
VISION_HIDDEN = 32
VISION_LAYERS = 2
VISION_HEADS = 4
VISION_INTERMEDIATE = 64
IMAGE_SIZE = 32
PATCH = 8

# The placeholder each architecture's processor expands, for image and video parts.
_PLACEHOLDERS: dict[str, tuple[str, str | None]] = {
    "llava": ("<image>", None),
    "llava_onevision": ("<image>", "<video>"),
    "qwen2_vl": (
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|vision_start|><|video_pad|><|vision_end|>",
    ),
    "qwen2_5_vl": (
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|vision_start|><|video_pad|><|vision_end|>",
    ),
    "gemma3": ("<start_of_image>", None),
    "idefics3": ("<image>", None),
    "smolvlm": ("<image>", "<video>"),
}

_SPECIAL_TOKENS: dict[str, list[str]] = {
    "llama": [],
    "llava": ["<image>"],
    "llava_onevision": ["<image>", "<video>"],
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "qwen2_5_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "gemma3": ["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
    "idefics3": [
        "<fake_token_around_image>",
        "<image>",
        "<end_of_utterance>",
        "<global-img>",
        *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
    ],
    "smolvlm": [
        "<fake_token_around_image>",
        "<image>",
        "<end_of_utterance>",
        "<global-img>",
        "<video>",
        *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
    ],
}


def chat_template(
    image_placeholder: str,
    video_placeholder: str | None = None,
    *,
    default_system: str | None = None,
) -> str:
    """A ChatML-like Jinja template that renders text, image and video parts, and tools.

    Without ``tools`` and tool messages it renders ``<|im_start|>role\\n...<|im_end|>``
    turns only. With ``tools=`` (JSON-schema function definitions) it opens with a
    system turn listing them, one JSON object per line between ``<tools>`` tags (after
    the caller's own system message, which it absorbs), and asks for calls in the
    Hermes form, ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
    which :func:`guardrail.tools.parse_tool_calls` reads back. An assistant message's
    ``tool_calls`` are written in that form after its text; a ``tool`` message becomes
    a ``tool`` turn holding ``<tool_response>...</tool_response>``.

    ``default_system`` is the system turn written when the conversation has none (as
    SmolLM2's own template does); the tool list then goes into that turn.
    """
    video = video_placeholder if video_placeholder is not None else ""
    if default_system is None:
        fallback = (
            "{%- set absorbed = tools and messages and messages[0]['role'] == 'system' -%}"
            "{%- set default_system = '' -%}"
        )
    else:
        fallback = (
            "{%- set absorbed = messages and messages[0]['role'] == 'system' -%}"
            f"{{%- set default_system = {default_system!r} -%}}"
        )
    return (
        "{%- macro render(content) -%}"
        "{%- if content is string -%}"
        "{{ content }}"
        "{%- else -%}"
        "{%- for part in content -%}"
        "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
        f"{{%- elif part['type'] == 'image' -%}}{{{{ {image_placeholder!r} }}}}"
        f"{{%- elif part['type'] == 'video' -%}}{{{{ {video!r} }}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{%- endmacro -%}" + fallback + "{%- if tools or default_system -%}"
        "{{ '<|im_start|>system\n' }}"
        "{%- if absorbed -%}{{ render(messages[0]['content']) }}"
        "{%- else -%}{{ default_system }}{%- endif -%}"
        "{%- if tools -%}"
        "{%- if absorbed or default_system -%}{{ '\n\n' }}{%- endif -%}"
        "{{ 'You can call tools. Their JSON schemas, one per line:\n<tools>\n' }}"
        "{%- for tool in tools -%}{{ tool | tojson + '\n' }}{%- endfor -%}"
        '{{ \'</tools>\nTo call one, write <tool_call>\n{"name": <tool name>, '
        '"arguments": <JSON object>}\n</tool_call> (one block per call).\' }}'
        "{%- endif -%}"
        "{{ '<|im_end|>\n' }}"
        "{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if not (absorbed and loop.first) -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{%- if message['role'] == 'tool' -%}"
        "{{ '<tool_response>\n' }}{{ render(message['content']) }}{{ '\n</tool_response>' }}"
        "{%- else -%}"
        "{{ render(message['content']) }}"
        "{%- endif -%}"
        "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
        "{%- for call in message['tool_calls'] -%}"
        "{%- if not loop.first or render(message['content']) -%}{{ '\n' }}{%- endif -%}"
        "{{ '<tool_call>\n' }}"
        "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']}"
        " | tojson }}"
        "{{ '\n</tool_call>' }}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{{ '<|im_end|>\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    )


@functools.lru_cache(maxsize=1)
def _base_tokenizer() -> Any:
    from guardrail.models.smollm2 import load_tokenizer

    return load_tokenizer()


def tiny_tokenizer(arch: str) -> Any:
    """A fresh copy of the SmolLM2 tokenizer with ``arch``'s vision special tokens added."""
    if arch not in _SPECIAL_TOKENS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")
    tokenizer = copy.deepcopy(_base_tokenizer())
    tokens = _SPECIAL_TOKENS[arch]
    if tokens:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": tokens}, replace_extra_special_tokens=False
        )
    if arch == "gemma3":
        # Gemma3Processor reads tokenizer.boi_token / eoi_token / image_token (and their ids).
        tokenizer._set_model_specific_special_tokens(
            {
                "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>",
                "image_token": "<image_soft_token>",
            }
        )
    tokenizer.padding_side = "left"
    return tokenizer


def _vocab_size(tokenizer: Any) -> int:
    return -(-len(tokenizer) // 64) * 64


def _text_kwargs(tokenizer: Any, num_layers: int) -> dict[str, Any]:
    return {
        "vocab_size": _vocab_size(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
    }


def _vision_kwargs() -> dict[str, Any]:
    return {
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": VISION_INTERMEDIATE,
        "num_hidden_layers": VISION_LAYERS,
        "num_attention_heads": VISION_HEADS,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
    }


def _ids(tokenizer: Any, *tokens: str) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    for token, i in zip(tokens, ids, strict=True):
        if i is None or i == tokenizer.unk_token_id:
            raise RuntimeError(f"{token!r} is not a single token")
    return ids


def _build(arch: str, tokenizer: Any, num_layers: int) -> tuple[Any, Any, Any]:
    """``(config, model class, processor)`` for ``arch``, before the weights are drawn."""
    import transformers

    tf: Any = transformers  # typed loosely: one code path per architecture

    text = _text_kwargs(tokenizer, num_layers)
    template = chat_template(*_PLACEHOLDERS[arch]) if arch in _PLACEHOLDERS else None

    if arch == "llama":
        # SmolLM2's own template (which takes no tools) as one that does: the same
        # prompt for every conversation without tools.
        tokenizer.chat_template = chat_template("", default_system=SMOLLM2_SYSTEM)
        return tf.LlamaConfig(**text), tf.LlamaForCausalLM, tokenizer

    if arch == "llava":
        (image_id,) = _ids(tokenizer, "<image>")
        config = tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(**_vision_kwargs(), projection_dim=VISION_HIDDEN),
            text_config=tf.LlamaConfig(**text),
            image_token_index=image_id,
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        )
        image_processor = tf.LlavaImageProcessor(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        )
        processor = tf.LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
            chat_template=template,
        )
        return config, tf.LlavaForConditionalGeneration, processor

    if arch == "llava_onevision":
        image_id, video_id = _ids(tokenizer, "<image>", "<video>")
        pinpoints = [
            [IMAGE_SIZE, IMAGE_SIZE],
            [IMAGE_SIZE, 2 * IMAGE_SIZE],
            [2 * IMAGE_SIZE, IMAGE_SIZE],
        ]
        config = tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(**_vision_kwargs(), vision_use_head=False),
            text_config=tf.Qwen2Config(**text),
            image_token_index=image_id,
            video_token_index=video_id,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_grid_pinpoints=pinpoints,
        )
        size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        processor = tf.LlavaOnevisionProcessor(
            image_processor=tf.LlavaOnevisionImageProcessor(
                size=size, image_grid_pinpoints=pinpoints
            ),
            tokenizer=tokenizer,
            video_processor=tf.LlavaOnevisionVideoProcessor(size=size),
            num_image_tokens=(IMAGE_SIZE // PATCH) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            chat_template=template,
        )
        return config, tf.LlavaOnevisionForConditionalGeneration, processor

    if arch in ("qwen2_vl", "qwen2_5_vl"):
        image_id, video_id, start_id, end_id = _ids(
            tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
        )
        head_dim = HIDDEN // HEADS
        # Multimodal RoPE: the (temporal, height, width) sections add up to head_dim // 2.
        mrope = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]
        text_cfg = {**text, "rope_parameters": {"rope_type": "default", "mrope_section": mrope}}
        ids = {
            "image_token_id": image_id,
            "video_token_id": video_id,
            "vision_start_token_id": start_id,
            "vision_end_token_id": end_id,
        }
        vision: dict[str, Any]
        if arch == "qwen2_vl":
            vision = {
                "depth": VISION_LAYERS,
                "embed_dim": VISION_HIDDEN,
                "hidden_size": HIDDEN,  # the merger's output width = the language model's
                "mlp_ratio": 2,
                "num_heads": VISION_HEADS,
                "patch_size": PATCH,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            }
            config = tf.Qwen2VLConfig(text_config=text_cfg, vision_config=vision, **ids)
            model_cls, processor_cls = tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor
        else:
            vision = {
                "depth": VISION_LAYERS,
                "hidden_size": VISION_HIDDEN,
                "intermediate_size": VISION_INTERMEDIATE,
                "out_hidden_size": HIDDEN,
                "num_heads": VISION_HEADS,
                "patch_size": PATCH,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 2 * 2 * PATCH,  # windows of 2x2 merged tokens
                "fullatt_block_indexes": [VISION_LAYERS - 1],
            }
            config = tf.Qwen2_5_VLConfig(text_config=text_cfg, vision_config=vision, **ids)
            model_cls, processor_cls = tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor
        factor = PATCH * 2
        pixels = {"patch_size": PATCH, "temporal_patch_size": 2, "merge_size": 2}
        image_processor = tf.Qwen2VLImageProcessor(
            min_pixels=(2 * factor) ** 2, max_pixels=(4 * factor) ** 2, **pixels
        )
        video_processor = tf.Qwen2VLVideoProcessor(
            size={"shortest_edge": (2 * factor) ** 2, "longest_edge": (2 * factor) ** 2},
            cap_pixels_per_frame=True,
            **pixels,
        )
        processor = processor_cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=template,
        )
        return config, model_cls, processor

    if arch == "gemma3":
        boi_id, eoi_id, image_id = _ids(
            tokenizer, "<start_of_image>", "<end_of_image>", "<image_soft_token>"
        )
        tokens_per_image = 4
        text_cfg = tf.Gemma3TextConfig(
            **text,
            head_dim=HIDDEN // HEADS,
            query_pre_attn_scalar=HIDDEN // HEADS,
            sliding_window=64,
        )
        config = tf.Gemma3Config(
            text_config=text_cfg,
            vision_config=tf.SiglipVisionConfig(**_vision_kwargs(), vision_use_head=False),
            mm_tokens_per_image=tokens_per_image,
            boi_token_index=boi_id,
            eoi_token_index=eoi_id,
            image_token_index=image_id,
            tie_word_embeddings=False,
        )
        processor = tf.Gemma3Processor(
            image_processor=tf.Gemma3ImageProcessor(
                size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
            ),
            tokenizer=tokenizer,
            chat_template=template,
            image_seq_length=tokens_per_image,
        )
        return config, tf.Gemma3ForConditionalGeneration, processor

    if arch in ("idefics3", "smolvlm"):
        (image_id,) = _ids(tokenizer, "<image>")
        scale_factor = 2
        image_seq_len = (IMAGE_SIZE // PATCH) ** 2 // scale_factor**2
        sizes: dict[str, Any] = {
            "size": {"longest_edge": 2 * IMAGE_SIZE},
            "max_image_size": {"longest_edge": IMAGE_SIZE},
        }
        vision = {**_vision_kwargs()}
        if arch == "idefics3":
            config = tf.Idefics3Config(
                vision_config=tf.Idefics3VisionConfig(**vision),
                text_config=tf.LlamaConfig(**text),
                image_token_id=image_id,
                scale_factor=scale_factor,
                pad_token_id=tokenizer.pad_token_id,
            )
            processor = tf.Idefics3Processor(
                image_processor=tf.Idefics3ImageProcessor(**sizes),
                tokenizer=tokenizer,
                image_seq_len=image_seq_len,
                chat_template=template,
            )
            return config, tf.Idefics3ForConditionalGeneration, processor
        config = tf.SmolVLMConfig(
            vision_config=tf.SmolVLMVisionConfig(**vision),
            text_config=tf.LlamaConfig(**text),
            image_token_id=image_id,
            scale_factor=scale_factor,
            pad_token_id=tokenizer.pad_token_id,
        )
        processor = tf.SmolVLMProcessor(
            image_processor=tf.SmolVLMImageProcessor(**sizes),
            tokenizer=tokenizer,
            video_processor=tf.SmolVLMVideoProcessor(
                size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE}
            ),
            image_seq_len=image_seq_len,
            chat_template=template,
        )
        _pin_chat_template(processor)
        return config, tf.SmolVLMForConditionalGeneration, processor

    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")


def _pin_chat_template(processor: Any) -> None:
    """Make ``processor.apply_chat_template`` default to ``processor.chat_template``.

    ``SmolVLMProcessor.apply_chat_template`` swaps in its built-in (non-ChatML) template whenever
    a conversation holds a video and no ``chat_template`` argument is given; pinning ours keeps
    one prompt format for text, image and video conversations.
    """
    method = type(processor).apply_chat_template

    def apply_chat_template(
        self: Any, conversation: Any, chat_template: str | None = None, **kwargs: Any
    ) -> Any:
        if chat_template is None:
            chat_template = self.chat_template
        return method(self, conversation, chat_template, **kwargs)

    # A bound method (not a closure) so that copy.deepcopy(processor) rebinds it to the copy.
    processor.apply_chat_template = types.MethodType(apply_chat_template, processor)


def nest_images(processor: Any, texts: list[str], images: list[Any]) -> list[list[Any]]:
    """Split a flat, in-order list of images into one list per text.

    Gemma3, Idefics3 and SmolVLM processors reject a flat list when some text has no image;
    they want ``[[img], []]``. The count per text is that of ``processor.image_token``.
    """
    image_token = processor.image_token
    nested: list[list[Any]] = []
    start = 0
    for text in texts:
        count = text.count(image_token)
        nested.append(list(images[start : start + count]))
        start += count
    if start != len(images):
        raise ValueError(f"{len(images)} images for {start} {image_token} placeholders")
    return nested


def tiny_model(
    arch: str, *, seed: int = 0, num_layers: int = 4
) -> tuple[PreTrainedModel, ProcessorMixin | PreTrainedTokenizerBase]:
    """``(model, processor)``: ``arch``'s real model class, tiny and randomly initialised.

    The model is float32 and in eval mode; the processor is the architecture's real processor
    class (the tokenizer itself for ``"llama"``) with a ChatML-like chat template.
    """
    import torch

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")
    tokenizer = tiny_tokenizer(arch)
    config, model_cls, processor = _build(arch, tokenizer, num_layers)
    if arch != "llama":
        processor.tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    if arch == "gemma3":
        # Gemma3 initialises its vision->text projection to zeros, which would make a random
        # model blind to images; draw it like the other projections instead.
        with torch.no_grad():
            torch.nn.init.normal_(
                model.model.multi_modal_projector.mm_input_projection_weight,
                std=config.initializer_range,
            )
    model.eval()
    generation_config = model.generation_config
    generation_config.pad_token_id = tokenizer.pad_token_id
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.bos_token_id = tokenizer.bos_token_id
    return model, processor


def random_image(seed: int = 1, size: int = 32) -> Any:
    """A seeded RGB noise image."""
    import torch
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)
