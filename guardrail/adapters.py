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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from guardrail.errors import InputError, UnsupportedModelError
from guardrail.messages import Conversation


@dataclass(frozen=True)
class AdapterSpec:
    """How to find and feed the language model of one family of architectures.

    ``layers_path`` is a dotted attribute path from the top-level model to the
    ``ModuleList`` of the language model's decoder layers; several alternatives may
    be given (transformers versions move modules around), the first that resolves
    wins. ``text_config`` names the config attribute holding the language model's
    config (``None``: the top config). ``nested_images`` is set for processors that
    take images grouped per conversation.
    """

    model_types: tuple[str, ...]
    layers_path: str | tuple[str, ...]
    modalities: frozenset[str] = field(default_factory=frozenset)
    text_config: str | None = "text_config"
    nested_images: bool = False

    @property
    def layer_paths(self) -> tuple[str, ...]:
        return (self.layers_path,) if isinstance(self.layers_path, str) else self.layers_path


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
    )
)
register_adapter(
    AdapterSpec(
        model_types=("llava", "llava_next", "mistral3"),
        layers_path=("model.language_model.layers", "language_model.model.layers"),
        modalities=_IMAGE,
    )
)
register_adapter(
    AdapterSpec(
        model_types=("llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
        layers_path=("model.language_model.layers", "language_model.model.layers"),
        modalities=_IMAGE_VIDEO,
    )
)
register_adapter(
    AdapterSpec(
        model_types=("gemma3",),
        layers_path=("model.language_model.layers", "language_model.model.layers"),
        modalities=_IMAGE,
        nested_images=True,
    )
)
register_adapter(
    AdapterSpec(
        model_types=("idefics3",),
        layers_path=("model.text_model.layers",),
        modalities=_IMAGE,
        nested_images=True,
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
    )
)


def _resolve(root: Any, path: str) -> Any:
    obj = root
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


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
        config = model.config if spec.text_config is None else getattr(model.config, spec.text_config)
        self.text_config = config
        self.hidden_size = int(config.hidden_size)
        self.num_layers = len(self.layers)
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        has_image_processor = getattr(processor, "image_processor", None) is not None
        self.modalities = spec.modalities if has_image_processor else frozenset()
        self.model_type = model_type or "unknown"

    def _find_layers(self) -> torch.nn.ModuleList:
        for path in self.spec.layer_paths:
            try:
                layers = _resolve(self.model, path)
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

    def render(self, conv: Conversation) -> str:
        """The chat-templated prompt text, ending with the generation prompt."""
        if not self.modalities:
            messages: list[dict[str, Any]] = [
                {"role": m["role"], "content": "\n".join(p["text"] for p in m["content"])}
                for m in conv.messages
            ]
        else:
            messages = conv.messages
        try:
            text = self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except (ValueError, TypeError) as exc:
            raise InputError(f"the chat template of {type(self.model).__name__} rejected the messages: {exc}") from exc
        return text if isinstance(text, str) else text[0]

    def build_inputs(self, conversations: Sequence[Conversation]) -> dict[str, Any]:
        """Tokenize a batch (left-padded) through the model's own processor."""
        for conv in conversations:
            self.check_modalities(conv)
        texts = [self.render(conv) for conv in conversations]
        kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True, "padding_side": "left"}
        if not self.modalities:
            batch = self.tokenizer(texts, add_special_tokens=False, **kwargs)
        else:
            images: Any
            if self.spec.nested_images:
                images = [list(c.images) for c in conversations]
                images = images if any(images) else None
            else:
                images = [img for c in conversations for img in c.images] or None
            videos = [v for c in conversations for v in c.videos] or None
            call: dict[str, Any] = {"text": texts, **kwargs}
            if images is not None:
                call["images"] = images
            if videos is not None:
                call["videos"] = videos
            try:
                batch = self.processor(**call)
            except (ValueError, TypeError, IndexError) as exc:
                raise InputError(f"{type(self.processor).__name__} could not process the input: {exc}") from exc
        batch = dict(batch)
        length = int(batch["input_ids"].shape[1])
        if self.max_positions and length > self.max_positions:
            raise InputError(
                f"the prompt is {length} tokens long, over the model's context of "
                f"{self.max_positions} tokens; shorten the conversation"
            )
        device = self.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ identity

    def config_hash(self) -> str:
        """A hash of the language model's shape-defining configuration."""
        keys = (
            "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "vocab_size", "head_dim",
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
