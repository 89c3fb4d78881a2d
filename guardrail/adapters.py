"""Architecture adapters: where the language model lives inside an MLLM, and how
its inputs are built.

MARS acts on the residual stream of the *language model* of a multimodal model,
never on its vision tower. Each supported architecture is described by an
:class:`AdapterSpec` that names, explicitly, the attribute path of the language
model's decoder layers; nothing is guessed from module names. Inputs are always
built through the model's own processor and chat template.

A new architecture is supported by registering a spec::

    from guardrail.adapters import AdapterSpec, register_adapter
    register_adapter(AdapterSpec(model_types=("my_vlm",),
                                 layers_path="model.language_model.layers",
                                 modalities=frozenset({"image"})))
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from guardrail.errors import InputError, UnsupportedModelError
from guardrail.messages import Conversation
from guardrail.tools import inert_json


@dataclass(frozen=True)
class AdapterSpec:
    """How to find and feed the language model of one family of architectures.

    ``layers_path`` is a dotted attribute path from the top-level model to the
    ``ModuleList`` of the language model's decoder layers; several alternatives may
    be given (transformers versions move modules around), the first that resolves
    wins. ``text_config`` names the config attribute holding the language model's
    config (``None``: the top config). ``nested_images`` is set for processors that
    take images grouped per conversation. ``video_as_frames`` lets an image-only
    architecture take video: each video part is given to the processor as its frames,
    one image each, in order, while the input keeps its ``video`` modality (so it is
    re-centred with the video offset, calibrated on neutral frame sequences).
    ``vllm_layers_path`` is the same ``ModuleList``'s path in vLLM's implementation of
    the family (from the model the vLLM worker holds); ``None``: the family is not
    served by the vLLM integration.
    """

    model_types: tuple[str, ...]
    layers_path: str | tuple[str, ...]
    modalities: frozenset[str] = field(default_factory=frozenset)
    text_config: str | None = "text_config"
    nested_images: bool = False
    video_as_frames: bool = False
    vllm_layers_path: str | None = None

    @property
    def layer_paths(self) -> tuple[str, ...]:
        return (self.layers_path,) if isinstance(self.layers_path, str) else self.layers_path


def adapter_spec(model_type: str) -> AdapterSpec | None:
    """The registered spec for ``model_type`` (a config's ``model_type``), if any."""
    return _REGISTRY.get(model_type)


def resolve_path(root: Any, path: str) -> Any:
    """``root``'s attribute at a dotted ``path`` (raises ``AttributeError``)."""
    obj = root
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


_REGISTRY: dict[str, AdapterSpec] = {}


def register_adapter(spec: AdapterSpec) -> AdapterSpec:
    """Register (or replace) the adapter for each of ``spec.model_types``."""
    for model_type in spec.model_types:
        _REGISTRY[model_type] = spec
    return spec


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


_IMAGE = frozenset({"image"})
_IMAGE_VIDEO = frozenset({"image", "video"})

register_adapter(
    AdapterSpec(
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "olmo2"),
        layers_path=("model.layers",),
        text_config=None,
        vllm_layers_path="model.layers",
    )
)
register_adapter(
    AdapterSpec(
        model_types=("llava", "llava_next", "mistral3"),
        layers_path=("model.language_model.layers", "language_model.model.layers"),
        modalities=_IMAGE_VIDEO,
        video_as_frames=True,
        vllm_layers_path="language_model.model.layers",
    )
)
register_adapter(
    AdapterSpec(
        model_types=("llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
        layers_path=("model.language_model.layers", "language_model.model.layers"),
        modalities=_IMAGE_VIDEO,
        vllm_layers_path="language_model.model.layers",
    )
)
register_adapter(
    AdapterSpec(
        model_types=("gemma3",),
        layers_path=("model.language_model.layers", "language_model.model.layers"),
        modalities=_IMAGE,
        nested_images=True,
        vllm_layers_path="language_model.model.layers",
    )
)
register_adapter(
    AdapterSpec(
        model_types=("idefics3",),
        layers_path=("model.text_model.layers",),
        modalities=_IMAGE,
        nested_images=True,
        vllm_layers_path="model.text_model.layers",
    )
)
# SmolVLM's processor returns video frames under the same key as images
# (``pixel_values``), so a batch mixing image and video rows cannot be built;
# it is supported for images.
register_adapter(
    AdapterSpec(
        model_types=("smolvlm",),
        layers_path=("model.text_model.layers",),
        modalities=_IMAGE,
        nested_images=True,
        vllm_layers_path="model.text_model.layers",
    )
)


# Inserted after the first character of a control string found in caller text, so
# that the tokenizer cannot match it as a special token (nor the processor as a media
# placeholder): "<|im_start|>" becomes "<\u200b|im_start|>", ordinary text tokens.
INERT_MARK = "\u200b"  # ZERO WIDTH SPACE


def control_strings(processor: Any, tokenizer: Any) -> frozenset[str]:
    """The strings that caller text must not contain verbatim: the tokenizer's special
    tokens, its added tokens that look like markup (``<...>``), and the processor's
    media placeholders (``image_token``, ``video_token``, ``boi_token``, ...).

    Strings shorter than two characters, or holding :data:`INERT_MARK`, cannot be
    split by it and are left out.
    """
    found: set[str] = set()
    found.update(str(t) for t in getattr(tokenizer, "all_special_tokens", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for token in added.values():
        content = str(getattr(token, "content", token))
        if getattr(token, "special", False) or (content.startswith("<") and content.endswith(">")):
            found.add(content)
    for obj in (processor, tokenizer):
        for name, value in vars(obj).items() if hasattr(obj, "__dict__") else ():
            if name.endswith("_token") and isinstance(value, str):
                found.add(value)
    return frozenset(s for s in found if len(s) >= 2 and INERT_MARK not in s and s.strip())


def _control_pattern(strings: Iterable[str]) -> re.Pattern[str] | None:
    ordered = sorted(strings, key=lambda s: (-len(s), s))  # longest first
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


class ModelAdapter:
    """A loaded model and its processor, seen through an :class:`AdapterSpec`."""

    def __init__(self, model: Any, processor: Any, spec: AdapterSpec | None = None):
        self.model = model
        self.processor = processor
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if spec is None:
            spec = _REGISTRY.get(model_type or "")
        if spec is None:
            raise UnsupportedModelError(
                f"no guardrail adapter for {type(model).__name__} (model_type={model_type!r}); "
                f"supported model types: {', '.join(supported_model_types())}. Register one with "
                "guardrail.adapters.register_adapter(AdapterSpec(model_types=(...,), "
                "layers_path='<dotted path to the language model decoder layers>', "
                "modalities=frozenset({'image'})))"
            )
        self.spec = spec
        self.layers = self._find_layers()
        config = (
            model.config if spec.text_config is None else getattr(model.config, spec.text_config)
        )
        self.text_config = config
        self.hidden_size = int(config.hidden_size)
        self.num_layers = len(self.layers)
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        has_image_processor = getattr(processor, "image_processor", None) is not None
        self.modalities = spec.modalities if has_image_processor else frozenset()
        self.model_type = model_type or "unknown"
        self._control = _control_pattern(control_strings(processor, self.tokenizer))

    def _find_layers(self) -> torch.nn.ModuleList:
        for path in self.spec.layer_paths:
            try:
                layers = resolve_path(self.model, path)
            except AttributeError:
                continue
            if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
                return layers
        raise UnsupportedModelError(
            f"{type(self.model).__name__}: none of the decoder-layer paths "
            f"{list(self.spec.layer_paths)} of its adapter exists; register an AdapterSpec "
            "with the right layers_path for this transformers version"
        )

    # ------------------------------------------------------------------ inputs

    def check_modalities(self, conv: Conversation) -> None:
        unsupported = conv.modalities - self.modalities
        if unsupported:
            supported = sorted(self.modalities) or ["text only"]
            raise InputError(
                f"{type(self.model).__name__} does not accept {', '.join(sorted(unsupported))} "
                f"input (it supports: {', '.join(supported)}); remove those parts or use a model "
                "that supports them"
            )

    def neutralise(self, text: str) -> str:
        """``text`` with every special-token string and media placeholder made inert.

        :data:`INERT_MARK` is inserted after the first character of each occurrence,
        so text typed by a caller (``<|im_start|>``, ``<|eot_id|>``, ``<image>``, ...)
        is tokenized as ordinary text: it can neither open or close a turn nor claim
        media slots. Repeated until nothing matches (a string may overlap another).
        """
        pattern = self._control
        if pattern is None:
            return text
        while pattern.search(text):
            text = pattern.sub(lambda m: m[0][0] + INERT_MARK + m[0][1:], text)
        return text

    def inert_messages(self, conv: Conversation) -> list[dict[str, Any]]:
        """``conv.messages`` with the text of every part, and every string of the tool
        fields (call arguments, ids, names), passed through :meth:`neutralise`."""
        return [
            {
                **{k: inert_json(v, self.neutralise) for k, v in m.items()},
                "role": m["role"],
                "content": [
                    {**p, "text": self.neutralise(p["text"])} if p["type"] == "text" else p
                    for p in m["content"]
                ],
            }
            for m in conv.messages
        ]

    def render(self, conv: Conversation, tools: Sequence[dict[str, Any]] | None = None) -> str:
        """The chat-templated prompt text, ending with the generation prompt.

        Caller text is made inert first (:meth:`neutralise`), tool definitions and
        tool fields included: only the chat template produces turn markers and media
        placeholders. ``tools`` (normalised by :func:`guardrail.tools.normalize_tools`)
        go to the template as ``tools=``; a template that does not render them is an
        :class:`InputError` (the model would never see the tools).
        """
        inert = self.inert_messages(conv)
        messages: list[dict[str, Any]]
        if not self.modalities:
            messages = [{**m, "content": "\n".join(p["text"] for p in m["content"])} for m in inert]
        elif self.spec.video_as_frames and conv.videos:
            frames = iter(len(v) for v in conv.videos)
            messages = [
                {
                    "role": m["role"],
                    "content": [
                        q
                        for p in m["content"]
                        for q in (
                            [{"type": "image"}] * next(frames) if p["type"] == "video" else [p]
                        )
                    ],
                }
                for m in inert
            ]
        else:
            messages = inert
        # A tool result is text: templates expect a string there.
        messages = [
            {**m, "content": "\n".join(p["text"] for p in m["content"])}
            if m["role"] == "tool" and not isinstance(m["content"], str)
            else m
            for m in messages
        ]
        if not tools:
            return self._apply_template(messages)
        inert_tools = inert_json(list(tools), self.neutralise)
        text = self._apply_template(messages, tools=inert_tools)
        if text == self._apply_template(messages):
            raise InputError(
                f"the chat template of {type(self.model).__name__} does not render tools, so "
                "the model would never see them; use a model whose template takes tools= "
                "(set processor.chat_template to a tools-aware template) or drop tools="
            )
        return text

    def _apply_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        try:
            text = self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **kwargs
            )
        except (ValueError, TypeError) as exc:
            raise InputError(
                f"the chat template of {type(self.model).__name__} rejected the messages: {exc}"
            ) from exc
        except Exception as exc:  # jinja2 errors a template raises on purpose or by accident
            if type(exc).__module__.startswith("jinja2"):
                raise InputError(
                    f"the chat template of {type(self.model).__name__} failed on the messages "
                    f"({type(exc).__name__}: {exc}); check that it supports them (tool calls "
                    "and tool results need a tools-aware template)"
                ) from exc
            raise
        return text if isinstance(text, str) else text[0]

    def build_inputs(
        self,
        conversations: Sequence[Conversation],
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Tokenize a batch (left-padded) through the model's own processor; ``tools``
        (normalised definitions) are offered to every conversation of the batch."""
        for conv in conversations:
            self.check_modalities(conv)
        texts = [self.render(conv, tools) for conv in conversations]
        kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True, "padding_side": "left"}
        if not self.modalities:
            batch = self.tokenizer(texts, add_special_tokens=False, **kwargs)
        else:
            images: Any
            per_conv = [self._images(c) for c in conversations]
            if self.spec.nested_images:
                images = per_conv if any(per_conv) else None
            else:
                images = [img for group in per_conv for img in group] or None
            videos = None
            if not self.spec.video_as_frames:
                videos = [v for c in conversations for v in c.videos] or None
            call: dict[str, Any] = {"text": texts, **kwargs}
            if images is not None:
                call["images"] = images
            if videos is not None:
                call["videos"] = videos
            try:
                batch = self.processor(**call)
            except (ValueError, TypeError, IndexError) as exc:
                raise InputError(
                    f"{type(self.processor).__name__} could not process the input: {exc}"
                ) from exc
        batch = dict(batch)
        length = int(batch["input_ids"].shape[1])
        if self.max_positions and length > self.max_positions:
            raise InputError(
                f"the prompt is {length} tokens long, over the model's context of "
                f"{self.max_positions} tokens; shorten the conversation"
            )
        device = self.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _images(self, conv: Conversation) -> list[Any]:
        """The images the processor receives for ``conv``, in order of appearance."""
        if not (self.spec.video_as_frames and conv.videos):
            return list(conv.images)
        images, videos = iter(conv.images), iter(conv.videos)
        out: list[Any] = []
        for message in conv.messages:
            for part in message["content"]:
                if part["type"] == "image":
                    out.append(next(images))
                elif part["type"] == "video":
                    out.extend(next(videos))
        return out

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ identity

    def config_hash(self) -> str:
        """A hash of the language model's shape-defining configuration."""
        keys = (
            "model_type",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
            "head_dim",
        )
        data = {k: getattr(self.text_config, k, None) for k in keys}
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()

    def weight_probe(self, count: int = 16) -> list[float]:
        """A few weights of the language model, sampled deterministically.

        Used as a dtype-tolerant identity check: a bundle calibrated on one
        fine-tune is told apart from another of the same shape.
        """
        values: list[float] = []
        for layer in (self.layers[0], self.layers[-1]):
            for param in list(layer.parameters())[:2]:
                flat = param.detach().reshape(-1)
                step = max(1, flat.numel() // count)
                values.extend(float(x) for x in flat[::step][: count // 2].float().cpu())
        return values


def get_adapter(model: Any, processor: Any) -> ModelAdapter:
    """The adapter for ``model`` (raises :class:`UnsupportedModelError`)."""
    return ModelAdapter(model, processor)
