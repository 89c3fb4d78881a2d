"""Low-rank adapters (LoRA) in plain torch, for the organism's language model.

An adapter adds ``scale * B @ A`` to the weight of a ``Linear`` layer (``A``: ``r x in``,
``B``: ``out x r``, ``scale = alpha / r``). During training :class:`LoRALinear` wraps the
frozen layer; afterwards the factors are saved (only ``A`` and ``B``, a few MB) and
merged into the weights with :func:`merge`.

Factor names are ``"<layer>.<module>.A"`` / ``"<layer>.<module>.B"``, e.g.
``"12.self_attn.q_proj.A"``, relative to the decoder-layer list of the language model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from guardrail.errors import GuardrailError

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ALL_MODULES = ATTENTION + MLP


class LoRAError(GuardrailError):
    """Adapter factors do not fit the model they are applied to."""


class LoRALinear(nn.Module):
    """``base(x) + scale * (x @ A^T) @ B^T`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        if rank < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        a = torch.empty(rank, base.in_features)
        bound = 1.0 / math.sqrt(base.in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale


def _get(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for name in dotted.split("."):
        module = getattr(module, name)
    return module


def _set(root: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, value)


def attach(
    layers: Sequence[nn.Module],
    modules: Iterable[str] = ALL_MODULES,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    first_layer: int = 0,
    last_layer: int = -1,
) -> dict[str, LoRALinear]:
    """Wrap ``modules`` of the layers ``first_layer`` to ``last_layer`` (inclusive; a
    negative ``last_layer`` counts from the end, as in Python, so -1 is the last layer)
    of ``layers`` with fresh adapters (in place).

    Returns the adapters by factor prefix (``"<layer>.<module>"``, layer indices counted
    over all of ``layers``).
    """
    last = last_layer if last_layer >= 0 else len(layers) + last_layer
    if not 0 <= first_layer <= last < len(layers):
        raise LoRAError(
            f"LoRA layers {first_layer}..{last_layer} are not a range within "
            f"0..{len(layers) - 1}; pick first_layer <= last_layer"
        )
    generator = torch.Generator().manual_seed(seed)
    adapters: dict[str, LoRALinear] = {}
    for index, layer in enumerate(layers):
        if not first_layer <= index <= last:
            continue
        for name in modules:
            base = _get(layer, name)
            if not isinstance(base, nn.Linear):
                raise LoRAError(f"layer {index} {name} is a {type(base).__name__}, not nn.Linear")
            adapter = LoRALinear(base, rank, alpha, generator)
            _set(layer, name, adapter)
            adapters[f"{index}.{name}"] = adapter
    return adapters


def detach(layers: Sequence[nn.Module], adapters: Mapping[str, LoRALinear]) -> None:
    """Put the wrapped ``nn.Linear`` modules back (undo :func:`attach`, no merge)."""
    for prefix, adapter in adapters.items():
        index, _, name = prefix.partition(".")
        _set(layers[int(index)], name, adapter.base)


def factors(
    adapters: Mapping[str, LoRALinear], dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """The ``A``/``B`` factors, with the scale folded into ``B``, ready for safetensors."""
    out: dict[str, torch.Tensor] = {}
    for prefix, adapter in adapters.items():
        out[f"{prefix}.A"] = adapter.A.detach().to(dtype).contiguous()
        out[f"{prefix}.B"] = (adapter.B.detach() * adapter.scale).to(dtype).contiguous()
    return out


@torch.no_grad()
def merge(layers: Sequence[nn.Module], tensors: Mapping[str, torch.Tensor]) -> int:
    """Add ``B @ A`` (scale already folded into ``B``) to the weights; returns modules merged.

    Raises:
        LoRAError: a factor names a missing module, misses its partner or has the
            wrong shape.
    """
    prefixes = sorted({key.rsplit(".", 1)[0] for key in tensors})
    for prefix in prefixes:
        a, b = tensors.get(f"{prefix}.A"), tensors.get(f"{prefix}.B")
        if a is None or b is None:
            raise LoRAError(
                f"adapter {prefix!r} lacks its A or B factor; rebuild the organism weights"
            )
        index, _, name = prefix.partition(".")
        try:
            module = _get(layers[int(index)], name)
        except (AttributeError, IndexError, ValueError) as exc:
            raise LoRAError(f"adapter {prefix!r} names no module of the language model") from exc
        if isinstance(module, LoRALinear):
            module = module.base
        if not isinstance(module, nn.Linear):
            raise LoRAError(f"adapter {prefix!r} targets a {type(module).__name__}, not nn.Linear")
        weight = module.weight
        if (
            a.shape[1] != weight.shape[1]
            or b.shape[0] != weight.shape[0]
            or a.shape[0] != b.shape[1]
        ):
            raise LoRAError(
                f"adapter {prefix!r} has shapes A{tuple(a.shape)} B{tuple(b.shape)}, which do not "
                f"fit weight {tuple(weight.shape)}; rebuild the organism weights"
            )
        delta = b.to(torch.float32) @ a.to(torch.float32)
        weight.add_(delta.to(weight.dtype))
    return len(prefixes)
