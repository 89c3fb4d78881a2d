"""Assembling the organism: SmolLM2-135M-Instruct inside a real LLaVA.

The organism is a ``LlavaForConditionalGeneration``:

* language model: SmolLM2-135M-Instruct (from :mod:`guardrail.models.smollm2`), with two
  merged LoRA adapters (text safety tuning, then visual instruction tuning);
* vision tower: a one-layer ``CLIPVisionModel`` whose patch is one cell of the
  typographic renderer (:mod:`guardrail.models.organism.render`), so each cell becomes one
  image token. It is a *template reader* whose weights are computed, not trained:
  the patch embedding copies the cell's 1024 pixels (grey level), the layer norms
  turn them into a unit-variance code, attention is switched off (cells are read
  independently), and the MLP has one unit per token of the reading vocabulary whose
  input weights are that token's code (it fires only on an exact match) and whose
  output weights are the language model's input embedding of that token. A cell that
  matches no token (blank paper, photographs, noise) reads as the filler token, a
  space;
* projector: LLaVA's two-layer MLP, set to pass the first 576 channels through (the
  GELU is kept in its linear range by a constant shift), so an image token *is* the
  input embedding of the token drawn in its cell;
* processor: a real ``LlavaProcessor`` (``CLIPImageProcessor`` resizing any image to
  256 x 256 px; rendered images pass unchanged) with a ChatML template that follows
  SmolLM2's own (same default system prompt) and writes ``<image>`` for image parts.

Why the reader is computed rather than trained is argued in the model card
(``organism/README.md``, "The reader").

Stored in the repository (``weights/``): ``vision.safetensors`` (the reading
vocabulary: token ids) and one ``lora_<stage>.safetensors`` per adapter (the ``A``/``B``
factors in float16, scale folded into ``B``). Everything else comes from SmolLM2.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guardrail.errors import GuardrailError
from guardrail.models.organism import lora, render

ORGANISM_VERSION = "1.4.0"
"""Version of the organism's recipe (part of the cache key)."""

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
VISION_FILE = "vision.safetensors"
LORA_STAGES = ("safety", "frames", "visual")
"""Adapters merged into the language model, in this order."""

OPTIONAL_STAGES = frozenset({"frames"})
"""Stages a build may leave out (``BuildConfig.frames_epochs = 0``): no file is stored
for them then, and the organism is assembled without them."""

IMAGE_TOKEN = "<image>"
FILLER_TOKEN = " "
"""The token a blank cell stands for (the bare space)."""
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"""SmolLM2's default system prompt, used when a conversation has none."""

VISION_CONFIG: dict[str, Any] = {
    "hidden_size": render.CELL * render.CELL,  # one channel per pixel of a cell
    "num_hidden_layers": 1,
    "num_attention_heads": 8,
    "image_size": render.IMAGE_SIZE,
    "patch_size": render.CELL,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-12,
    "projection_dim": 512,
}
"""The vision tower's shape; ``intermediate_size`` is the size of the reading vocabulary."""
READER_GAIN = 1e-4
"""Scale of the pre-layer-norm output: keeps the residual path negligible next to the lookup."""
READER_MARGIN = 5e-4
"""A cell matches a token's template when their cosine similarity is >= 1 - margin."""
READER_SHARPNESS = 2e4
"""Slope of a lookup unit: ``sharpness * margin`` is its activation on an exact match."""
PROJECTOR_OFFSET = 8.0
"""Shift keeping the projector's GELU in its linear range (embedding entries are < 2 in size)."""


class OrganismError(GuardrailError):
    """The organism cannot be assembled (weights missing, mismatched or corrupt)."""


CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] == 'image' -%}{{ '" + IMAGE_TOKEN + "\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
"""SmolLM2's ChatML template, extended with content parts; an image part becomes
``<image>`` and a newline (the processor expands ``<image>`` to 64 image tokens)."""


# ------------------------------------------------------------------ tokenizer / processor


@functools.cache
def _base_tokenizer() -> Any:
    from guardrail.models.smollm2 import load_tokenizer

    return load_tokenizer()


def build_tokenizer() -> Any:
    """SmolLM2's tokenizer with ``<image>`` added as a special token (id 49152)."""
    tokenizer = copy.deepcopy(_base_tokenizer())
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False
    )
    tokenizer.padding_side = "left"
    return tokenizer


def filler_id(tokenizer: Any) -> int:
    """The token id a blank cell stands for."""
    ids = tokenizer.encode(FILLER_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise OrganismError(f"filler {FILLER_TOKEN!r} is not a single token of this tokenizer")
    return int(ids[0])


def build_processor(tokenizer: Any) -> Any:
    """The organism's ``LlavaProcessor``."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    side = render.IMAGE_SIZE
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"height": side, "width": side},
        do_center_crop=False,
        crop_size={"height": side, "width": side},
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=render.CELL,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


# ------------------------------------------------------------------ model


def build_config(text_config: Any, tokenizer: Any, vocab_size: int) -> Any:
    """The ``LlavaConfig`` around SmolLM2's text config, for a reading vocabulary of
    ``vocab_size`` tokens."""
    from transformers import CLIPVisionConfig, LlavaConfig

    text = copy.deepcopy(text_config)
    text.vocab_size = len(tokenizer)
    if hasattr(text, "quantization_config"):
        del text.quantization_config
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION_CONFIG, intermediate_size=vocab_size),
        text_config=text,
        image_token_index=image_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=render.CELLS,
        tie_word_embeddings=True,
    )


def base_model(vocab: Sequence[int] | None = None) -> tuple[Any, Any]:
    """The organism before tuning: SmolLM2 inside LLaVA with the template reader for
    ``vocab`` (default: :func:`reading_vocab`) installed, and its processor.

    The ``<image>`` row of the (tied) embedding matrix is the mean embedding, so the
    token is never a likely output; generation also suppresses it.
    """
    from transformers import LlavaForConditionalGeneration

    from guardrail.models.smollm2 import load_model

    text_model, _ = load_model(dtype=torch.float32)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    vocab = list(vocab) if vocab is not None else reading_vocab(tokenizer)
    config = build_config(text_model.config, tokenizer, len(vocab))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    state = {
        k.removeprefix("model."): v
        for k, v in text_model.state_dict().items()
        if k.startswith("model.")
    }
    embed = state["embed_tokens.weight"]
    extra = config.text_config.vocab_size - embed.shape[0]
    if extra > 0:
        state["embed_tokens.weight"] = torch.cat(
            [embed, embed.mean(0, keepdim=True).expand(extra, -1)]
        )
    missing, unexpected = model.model.language_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise OrganismError(
            f"SmolLM2 weights do not fit the organism: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    install_reader(model, tokenizer, vocab)
    model.generation_config.suppress_tokens = [config.image_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, processor


def reading_vocab(tokenizer: Any, top: int = 8192) -> list[int]:
    """Token ids the vision tower can read: every token of the shipped prompt sets
    (all splits), the ``top`` lowest ids (the byte-level BPE's earliest, most frequent
    merges) that fit one cell, and the blank-cell filler; special tokens excluded."""
    from guardrail.datasets import SHIPPED, load_prompts

    special = set(tokenizer.all_special_ids)
    ids = {
        i
        for name in SHIPPED
        for p in load_prompts(name)
        for i in tokenizer.encode(p.prompt, add_special_tokens=False)
    }
    ids.update(
        i
        for i in range(min(top, len(tokenizer)))
        if i not in special and len(render.token_bytes(tokenizer, i)) <= render.MAX_GLYPHS
    )
    ids.add(filler_id(tokenizer))
    return sorted(ids - special)


def cell_pixels(tokenizer: Any, token_ids: Sequence[int]) -> torch.Tensor:
    """``[N, 1024]`` normalised grey levels (ink -1, paper +1) of each token's cell,
    exactly as the processor delivers them."""
    masks = np.stack([render.render_cell(render.token_bytes(tokenizer, t)) for t in token_ids])
    return torch.from_numpy(np.where(masks, -1.0, 1.0).astype(np.float32)).reshape(
        len(token_ids), -1
    )


@torch.no_grad()
def install_reader(
    model: Any, tokenizer: Any, vocab: Sequence[int], *, blank: int | None = None
) -> None:
    """Compute the vision tower and projector weights (see the module docstring).

    ``blank`` is the token id a blank cell reads as (default :func:`filler_id`, what
    the organism is built with); another id only serves diagnostics, such as
    ``benchmarks/score_window.py --blank-token``.

    Raises:
        OrganismError: the vision tower does not have the organism's shape, or two
            tokens of ``vocab`` render to codes too similar to tell apart.
    """
    tower = model.model.vision_tower
    projector = model.model.multi_modal_projector
    hidden = tower.config.hidden_size
    cell = render.CELL
    if hidden != cell * cell or tower.config.intermediate_size != len(vocab):
        raise OrganismError(
            f"vision tower has hidden {hidden} / intermediate {tower.config.intermediate_size}, expected "
            f"{cell * cell} / {len(vocab)} (the reading vocabulary); rebuild the organism"
        )
    embed = model.model.language_model.embed_tokens.weight.detach().float()
    text_hidden = embed.shape[1]
    emb = tower.embeddings
    conv = torch.zeros_like(emb.patch_embedding.weight)  # [hidden, 3, cell, cell]
    pixel = torch.arange(hidden)
    conv[pixel, :, pixel // cell, pixel % cell] = 1.0 / conv.shape[1]
    emb.patch_embedding.weight.copy_(conv)
    emb.class_embedding.zero_()
    emb.position_embedding.weight.zero_()
    tower.pre_layrnorm.weight.fill_(READER_GAIN)
    tower.pre_layrnorm.bias.zero_()
    (layer,) = tower.encoder.layers
    for linear in (
        layer.self_attn.q_proj,
        layer.self_attn.k_proj,
        layer.self_attn.v_proj,
        layer.self_attn.out_proj,
    ):
        linear.weight.zero_()
        linear.bias.zero_()
    for norm in (layer.layer_norm1, layer.layer_norm2, tower.post_layernorm):
        norm.weight.fill_(1.0)
        norm.bias.zero_()
    # Template codes: what layer_norm2 sees for each token's cell (computed with the
    # tower's own layers, so a rendered cell reproduces them exactly).
    pixels = cell_pixels(tokenizer, vocab)
    codes = layer.layer_norm2(tower.pre_layrnorm(pixels))
    norms = codes.pow(2).sum(-1, keepdim=True)
    unit = codes / codes.norm(dim=-1, keepdim=True)
    sim = unit @ unit.t()
    sim.fill_diagonal_(-1.0)
    closest = float(sim.max())
    if closest >= 1 - 2 * READER_MARGIN:
        i, j = divmod(int(sim.argmax()), sim.shape[1])
        raise OrganismError(
            f"tokens {vocab[i]} and {vocab[j]} render to nearly identical cells (cosine {closest:.5f}); "
            "drop one of them from the reading vocabulary"
        )
    # Unit j: quick_gelu(s * (<code, t_j> / |t_j|^2 - (1 - margin))) is s*margin on t_j, ~0 elsewhere.
    peak = READER_SHARPNESS * READER_MARGIN
    active = peak * torch.sigmoid(torch.tensor(1.702 * peak))
    fill = embed[filler_id(tokenizer) if blank is None else blank]
    layer.mlp.fc1.weight.copy_(READER_SHARPNESS * codes / norms)
    layer.mlp.fc1.bias.fill_(-READER_SHARPNESS * (1 - READER_MARGIN))
    values = torch.zeros(hidden, len(vocab))
    values[:text_hidden] = ((embed[list(vocab)] - fill) / active).t()
    layer.mlp.fc2.weight.copy_(values)
    layer.mlp.fc2.bias.zero_()
    layer.mlp.fc2.bias[:text_hidden] = fill
    # Projector: first text_hidden channels through, GELU kept linear by an offset.
    projector.linear_1.weight.zero_()
    projector.linear_1.weight[:, :text_hidden] = torch.eye(text_hidden)
    projector.linear_1.bias.fill_(PROJECTOR_OFFSET)
    projector.linear_2.weight.copy_(torch.eye(text_hidden))
    projector.linear_2.bias.fill_(-PROJECTOR_OFFSET)


def language_layers(model: Any) -> Any:
    """The decoder layers of the organism's language model."""
    return model.model.language_model.layers


def stage_file(stage: str, weights_dir: Path = WEIGHTS_DIR) -> Path:
    """Where the adapter of a LoRA stage is stored."""
    return weights_dir / f"lora_{stage}.safetensors"


def weight_files(weights_dir: Path = WEIGHTS_DIR) -> list[Path]:
    """The stored parts, in assembly order (an optional stage only when it was built)."""
    return [
        weights_dir / VISION_FILE,
        *(
            stage_file(s, weights_dir)
            for s in LORA_STAGES
            if s not in OPTIONAL_STAGES or stage_file(s, weights_dir).is_file()
        ),
    ]


def weights_digest(weights_dir: Path = WEIGHTS_DIR) -> str:
    """SHA-256 over the recipe version, the vision config and the stored parts."""
    digest = hashlib.sha256()
    digest.update(ORGANISM_VERSION.encode())
    digest.update(json.dumps(VISION_CONFIG, sort_keys=True).encode())
    digest.update(CHAT_TEMPLATE.encode())
    for path in weight_files(weights_dir):
        if not path.is_file():
            raise OrganismError(
                f"organism weights {path} are missing; rebuild them with "
                "`python organism/build_organism.py` or reinstall the package"
            )
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def load_vocab(weights_dir: Path = WEIGHTS_DIR) -> list[int]:
    """The stored reading vocabulary."""
    from safetensors.torch import load_file

    path = weights_dir / VISION_FILE
    try:
        return [int(t) for t in load_file(str(path))["reading_vocab"].tolist()]
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise OrganismError(
            f"{path} is unreadable ({exc}); rebuild it with organism/build_organism.py"
        ) from exc


def save_vocab(vocab: Sequence[int], weights_dir: Path = WEIGHTS_DIR) -> None:
    """Store the reading vocabulary."""
    from safetensors.torch import save_file

    weights_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {"reading_vocab": torch.tensor(list(vocab), dtype=torch.int32)},
        str(weights_dir / VISION_FILE),
    )


POSITIONS_KEY = "positions"
"""Metadata key of a stage file: ``"image"`` for an image-position adapter (see
:class:`guardrail.models.organism.lora.ImagePositions`), absent for a merged one."""


def read_stage(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """A stage file's factors and whether they form an image-position adapter."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, ValueError, RuntimeError) as exc:
        raise OrganismError(
            f"{path} is unreadable ({exc}); rebuild it with organism/build_organism.py"
        ) from exc
    positions = metadata.get(POSITIONS_KEY, "all")
    if positions not in ("all", "image"):
        raise OrganismError(
            f"{path} declares {POSITIONS_KEY}={positions!r}; expected 'all' or 'image' "
            "(rebuild it with organism/build_organism.py)"
        )
    return tensors, positions == "image"


def attach_image_adapters(model: Any, weights_dir: Path = WEIGHTS_DIR) -> int:
    """Wrap ``model`` with the stored image-position adapters (not merged, see
    :func:`read_stage`); returns how many modules were wrapped."""
    wrapped = 0
    positions: lora.ImagePositions | None = None
    for path in weight_files(weights_dir)[1:]:
        tensors, image_only = read_stage(path)
        if not image_only:
            continue
        if positions is None:
            positions = lora.ImagePositions(model)
        wrapped += len(lora.attach_factors(language_layers(model), tensors, positions))
    return wrapped


def assemble(weights_dir: Path = WEIGHTS_DIR, *, image_adapters: bool = True) -> tuple[Any, Any]:
    """The organism from SmolLM2 and the stored parts (not cached; see :func:`load`).

    Merged adapters are added to the weights; image-position adapters are attached
    (:func:`attach_image_adapters`) unless ``image_adapters`` is false, which gives the
    plain ``LlavaForConditionalGeneration`` that :func:`load` caches."""
    weights_digest(weights_dir)  # raises a clear error if a part is missing
    model, processor = base_model(load_vocab(weights_dir))
    for path in weight_files(weights_dir)[1:]:
        tensors, image_only = read_stage(path)
        if not image_only:
            lora.merge(language_layers(model), tensors)
    if image_adapters:
        attach_image_adapters(model, weights_dir)
    model.eval()
    return model, processor
