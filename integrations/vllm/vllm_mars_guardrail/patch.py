"""Put the steering op into vLLM's decoder layers, before the model is built.

The decoder layer classes of the supported families are patched once per process
(the worker extension module does it when vLLM imports it, which is before the
worker builds the model). The patched ``__init__`` reads the guardrail's entry of
``additional_config`` and marks the layers it names; the patched ``forward`` of a
marked layer passes its input through :func:`vllm_mars_guardrail.op.steer` first.
Because the mark is set when the layer is built, Dynamo traces the op into the
compiled graph of exactly those layers, and because the layers and the op version
are part of ``additional_config``, they are part of vLLM's compile-cache key: a graph
compiled without the op is never reused for a guarded engine.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CONFIG_KEY = "mars_guardrail"

# (module, class) of vLLM decoder layers whose forward is
# ``forward(positions, hidden_states, residual, ...)`` and returns
# ``(hidden_states, residual)``; families that reuse one of them (Mistral, Phi-3 and
# the LLaVA family's Llama backbone use LlamaDecoderLayer) are covered by it.
DECODER_LAYERS: tuple[tuple[str, str], ...] = (
    ("vllm.model_executor.models.llama", "LlamaDecoderLayer"),
    ("vllm.model_executor.models.qwen2", "Qwen2DecoderLayer"),
    ("vllm.model_executor.models.qwen3", "Qwen3DecoderLayer"),
)


def _op_version() -> str:
    """A hash of the op and patch sources: any change to them is a new cache key."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("op.py", "patch.py", "worker.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]


OP_VERSION = _op_version()

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)$")
_lock = threading.Lock()
_patched: dict[type, tuple[Callable[..., Any], Callable[..., Any]]] = {}


def engine_config(layers: list[int]) -> dict[str, Any]:
    """The guardrail's ``additional_config`` entry: the steered layers and op version."""
    return {CONFIG_KEY: {"layers": sorted(set(layers)), "op_version": OP_VERSION}}


def _configured_layers() -> list[int]:
    from vllm.config import get_current_vllm_config

    extra = get_current_vllm_config().additional_config or {}
    entry = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    if not entry:
        return []
    return [int(x) for x in entry.get("layers", [])]


def _patch_class(cls: type) -> None:
    init, forward = cls.__init__, cls.forward  # type: ignore[misc]

    @functools.wraps(init)
    def patched_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        prefix = kwargs.get("prefix", "")
        match = _LAYER_INDEX.search(prefix) if isinstance(prefix, str) else None
        index = int(match.group(1)) if match else None
        self._mars_index = index
        self._mars_layer = index if index is not None and index in _configured_layers() else None

    @functools.wraps(forward)
    def patched_forward(
        self: Any,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: Any,
        *a: Any,
        **k: Any,
    ) -> Any:
        if self._mars_layer is not None:
            hidden_states = torch.ops.mars_guardrail.steer(
                hidden_states, residual, self._mars_layer
            )
        return forward(self, positions, hidden_states, residual, *a, **k)

    cls.__init__ = patched_init  # type: ignore[misc]
    cls.forward = patched_forward  # type: ignore[method-assign]
    _patched[cls] = (init, forward)


def install() -> list[type]:
    """Patch every supported decoder layer class that vLLM has (idempotent)."""
    from vllm_mars_guardrail import op  # noqa: F401  (registers the op)

    with _lock:
        for module_name, class_name in DECODER_LAYERS:
            try:
                cls = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError):
                continue
            if cls not in _patched:
                _patch_class(cls)
        return list(_patched)


def patched_classes() -> tuple[type, ...]:
    return tuple(_patched)
