"""Write a model as a checkpoint directory that vLLM loads.

vLLM reads Hugging Face checkpoints, but its model classes name some weights the
way older transformers versions saved them. transformers 5 saves a LLaVA's CLIP
tower as ``vision_tower.*`` where vLLM's LLaVA expects
``vision_tower.vision_model.*``; :func:`export_for_vllm` saves the model with
``save_pretrained`` and renames those keys, and writes the processor (tokenizer,
chat template) beside it. Nothing else changes: the exported weights are the
model's own, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from guardrail.atomic import publish_dir
from guardrail.errors import InputError, UnsupportedModelError

__all__ = ["VLLM_KEY_RENAMES", "export_for_vllm", "vllm_key"]

VLLM_KEY_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    # model_type -> (prefix saved by transformers 5, prefix vLLM expects)
    "llava": (("vision_tower.", "vision_tower.vision_model."),),
}
"""Per architecture, the weight-name prefixes vLLM reads differently."""


def vllm_key(model_type: str, key: str) -> str:
    """The name vLLM expects for the saved weight ``key`` of a ``model_type`` model."""
    for old, new in VLLM_KEY_RENAMES.get(model_type, ()):
        if key.startswith(old) and not key.startswith(new):
            return new + key[len(old) :]
    return key


def export_for_vllm(
    model: Any, processor: Any, out_dir: str | Path, *, overwrite: bool = False
) -> Path:
    """Save ``model`` and ``processor`` under ``out_dir`` in the layout vLLM loads.

    The directory appears whole or not at all (it is written beside and renamed).

    Raises:
        InputError: ``out_dir`` exists and ``overwrite`` is false.
        UnsupportedModelError: the model carries modules that a plain checkpoint
            cannot hold (the organism's image-position adapters).
    """
    from safetensors.torch import load_file, save_file

    target = Path(out_dir)
    if target.exists() and not overwrite:
        raise InputError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    wrapped = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    if wrapped:
        raise UnsupportedModelError(
            f"the model has {len(wrapped)} unmerged adapter modules (e.g. {wrapped[0]}); "
            "a vLLM checkpoint holds plain weights only. Merge the adapters first"
        )
    model_type = str(getattr(model.config, "model_type", ""))
    with publish_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp)
        renamed = 0
        for shard in sorted(Path(tmp).glob("*.safetensors")):
            tensors = load_file(shard)
            fixed = {vllm_key(model_type, k): v.contiguous() for k, v in tensors.items()}
            renamed += sum(1 for k in tensors if vllm_key(model_type, k) != k)
            save_file(fixed, shard, metadata={"format": "pt"})
        index = Path(tmp) / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = {
                vllm_key(model_type, k): v for k, v in data.get("weight_map", {}).items()
            }
            index.write_text(json.dumps(data, indent=2))
    return target
