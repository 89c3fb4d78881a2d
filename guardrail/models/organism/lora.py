"""Low-rank adapters (LoRA) in plain torch, for the organism's language model.

An adapter adds ``scale * B @ A`` to the weight of a ``Linear`` layer (``A``: ``r x in``,
``B``: ``out x r``, ``scale = alpha / r``). During training :class:`LoRALinear` wraps the
frozen layer; afterwards the factors are saved (only ``A`` and ``B``, a few MB) and
merged into the weights with :func:`merge`.

An *image-position* adapter (:class:`ImagePositions`) acts only where the input holds an
image token, the way a visual expert does: text positions, decode steps and text-only
requests keep the weights without it. It cannot be merged; :func:`attach_factors` wraps
the layers with its stored factors instead.

Factor names are ``"<layer>.<module>.A"`` / ``"<layer>.<module>.B"``, e.g.
``"12.self_attn.q_proj.A"``, relative to the decoder-layer list of the language model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from guardrail.errors import GuardrailError

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ALL_MODULES = ATTENTION + MLP


class LoRAError(GuardrailError):
    """Adapter factors do not fit the model they are applied to."""


class ImagePositions:
    """The image-token positions of the forward pass in progress, for image-position
    adapters. Made for a ``LlavaForConditionalGeneration``: hooks its ``model.model``,
    which sets them from its ``input_ids`` before each call and clears them after it
    (:meth:`remove` takes the hooks off).

    A call without ``input_ids`` (``inputs_embeds`` only) or a language model called
    on its own has no image positions: the adapter then changes nothing."""

    def __init__(self, model: Any):
        self.image_token_id = int(model.config.image_token_id)
        self.current: torch.Tensor | None = None

        def before(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.current = None if ids is None else ids == self.image_token_id

        def after(*_: Any) -> None:
            self.current = None

        llava = model.model
        self._hooks = [
            llava.register_forward_pre_hook(before, with_kwargs=True),
            llava.register_forward_hook(after),
        ]

    def remove(self) -> None:
        """Take the hooks off the model."""
        for hook in self._hooks:
            hook.remove()

    def mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """``(batch, seq, 1)`` mask of the image positions for activations ``x``, or
        ``None`` when this pass has none."""
        where = self.current
        if where is None or not bool(where.any()):
            return None
        if tuple(where.shape) != tuple(x.shape[:2]):
            raise LoRAError(
                f"image positions of shape {tuple(where.shape)} do not fit activations of "
                f"shape {tuple(x.shape)}; call the LLaVA model with input_ids, not the "
                "language model with a different sequence"
            )
        return where.unsqueeze(-1).to(x.dtype)


class LoRALinear(nn.Module):
    """``base(x) + scale * (x @ A^T) @ B^T`` around a frozen ``nn.Linear``; with
    ``positions`` the added term is kept at image positions only."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        generator: torch.Generator,
        positions: ImagePositions | None = None,
    ):
        super().__init__()
        if rank < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        self.positions = positions
        a = torch.empty(rank, base.in_features)
        bound = 1.0 / math.sqrt(base.in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.positions is None:
            return out + (x @ self.A.t() @ self.B.t()) * self.scale
        mask = self.positions.mask(x)
        if mask is None:
            return out
        return out + (x @ self.A.t() @ self.B.t()) * (self.scale * mask)


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
    positions: ImagePositions | None = None,
) -> dict[str, LoRALinear]:
    """Wrap ``modules`` of the layers ``first_layer`` to ``last_layer`` (inclusive; a
    negative ``last_layer`` counts from the end, as in Python, so -1 is the last layer)
    of ``layers`` with fresh adapters (in place).

    With ``positions`` the adapters act at image positions only (see
    :class:`ImagePositions`).

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
            adapter = LoRALinear(base, rank, alpha, generator, positions)
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


def _stored(
    layers: Sequence[nn.Module], tensors: Mapping[str, torch.Tensor]
) -> list[tuple[str, nn.Linear, torch.Tensor, torch.Tensor]]:
    """``(prefix, target Linear, A, B)`` for each adapter in ``tensors``, checked.

    Raises:
        LoRAError: a factor names a missing module, misses its partner or has the
            wrong shape.
    """
    out = []
    for prefix in sorted({key.rsplit(".", 1)[0] for key in tensors}):
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
        out.append((prefix, module, a, b))
    return out


@torch.no_grad()
def merge(layers: Sequence[nn.Module], tensors: Mapping[str, torch.Tensor]) -> int:
    """Add ``B @ A`` (scale already folded into ``B``) to the weights; returns modules merged.

    Raises:
        LoRAError: as :func:`_stored`.
    """
    stored = _stored(layers, tensors)
    for _, module, a, b in stored:
        delta = b.to(torch.float32) @ a.to(torch.float32)
        module.weight.add_(delta.to(module.weight.dtype))
    return len(stored)


def attach_factors(
    layers: Sequence[nn.Module],
    tensors: Mapping[str, torch.Tensor],
    positions: ImagePositions,
) -> dict[str, LoRALinear]:
    """Wrap the modules named in ``tensors`` with frozen image-position adapters holding
    those factors (scale folded into ``B``; the dtype of the wrapped weights).

    Raises:
        LoRAError: as :func:`_stored`, or a module is wrapped already.
    """
    adapters: dict[str, LoRALinear] = {}
    for prefix, module, a, b in _stored(layers, tensors):
        index, _, name = prefix.partition(".")
        if _get(layers[int(index)], name) is not module:
            raise LoRAError(f"adapter {prefix!r} targets a module that has an adapter already")
        adapter = LoRALinear(module, a.shape[0], float(a.shape[0]), torch.Generator(), positions)
        adapter.A = nn.Parameter(a.to(module.weight.dtype).clone(), requires_grad=False)
        adapter.B = nn.Parameter(b.to(module.weight.dtype).clone(), requires_grad=False)
        _set(layers[int(index)], name, adapter)
        adapters[prefix] = adapter
    return adapters
