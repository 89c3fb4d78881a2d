"""The steering step as an opaque custom op, and the per-step plan it reads.

vLLM compiles the language model (Dynamo + inductor) and, on GPUs, captures it in
CUDA graphs. A forward hook added to a compiled module is never called, so the step
is an op, ``mars_guardrail::steer``, that the patched decoder layer calls on its
input (:mod:`vllm_mars_guardrail.patch`). Dynamo keeps the op as one opaque node (it
has a fake implementation for tracing), and at run time the node calls
:func:`steer`, which reads the plan the worker wrote for this step
(:data:`STEP`) and applies :func:`guardrail.steering.mars_step` to the rows of the
flattened batch that hold a request's last prompt token ``t*``.

The op returns a new tensor and never aliases its input, which is what a
functional custom op must do; every call records that it ran, so the worker can
prove after each forward pass that the op fired for every planned request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from guardrail.errors import SteeringError
from guardrail.steering import mars_step

__all__ = ["OP_NAME", "STEP", "RowGroup", "StepPlan", "steer"]

OP_NAME = "mars_guardrail::steer"


@dataclass
class RowGroup:
    """Rows of one step that share a policy and whether the step is written.

    ``rows`` are flat token indices (``t*`` of each request) in the step's batch;
    every other tensor is per row. After the op ran, ``score`` and ``strength`` hold
    the results (``strength`` is what the rule computed; it is written only when
    ``apply``).
    """

    layer: int
    rows: Tensor
    u: Tensor
    p_S: Tensor
    g: Tensor
    delta: Tensor
    tau: Tensor
    lam: Tensor
    kappa: Tensor
    eta: Tensor
    recenter_mode: str
    apply_recentering_to_activation: bool | str
    apply: bool
    score: Tensor | None = None
    strength: Tensor | None = None
    fired: int = 0


@dataclass
class StepPlan:
    """What the op must do in the current forward pass, per layer."""

    groups: dict[int, list[RowGroup]] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)

    def for_layer(self, layer: int) -> list[RowGroup]:
        self.calls[layer] = self.calls.get(layer, 0) + 1
        return self.groups.get(layer, [])


class _Step:
    """The plan of the step being run in this process (one engine per worker)."""

    def __init__(self) -> None:
        self.plan: StepPlan | None = None


STEP = _Step()


def _apply(hidden: Tensor, residual: Tensor | None, layer: int) -> Tensor:
    out = hidden.clone()
    plan = STEP.plan
    if plan is None:  # a warm-up or profiling pass: no request is in it
        return out
    for group in plan.for_layer(layer):
        rows = group.rows.to(hidden.device)
        if bool((rows >= hidden.shape[0]).any()):
            raise SteeringError(
                f"layer {layer}: a planned t* row is outside the step's {hidden.shape[0]} tokens"
            )
        # The residual stream entering the layer is hidden + residual (vLLM keeps
        # them apart so the next norm can fuse the add).
        stream = hidden[rows] if residual is None else hidden[rows] + residual[rows]
        step = mars_step(
            stream,
            u=group.u,
            p_S=group.p_S,
            g=group.g,
            delta=group.delta,
            tau=group.tau,
            lam=group.lam,
            kappa=group.kappa,
            eta=group.eta,
            recenter_mode=group.recenter_mode,
            apply_recentering_to_activation=group.apply_recentering_to_activation,
        )
        if not (bool(torch.isfinite(step.strength).all()) and bool(torch.isfinite(step.h).all())):
            raise SteeringError(
                f"layer {layer}: the steering step is not finite; the policy's parameters "
                "are out of range for this model. Recalibrate it or lower lam / kappa"
            )
        group.score, group.strength = step.score, step.strength
        group.fired += 1
        if group.apply:
            out[rows] = hidden[rows] + (step.h - stream)
    return out


@torch.library.custom_op(OP_NAME, mutates_args=())
def steer(hidden: Tensor, residual: Tensor | None, layer: int) -> Tensor:
    """Apply this step's plan for ``layer`` to the layer's input (see the module doc)."""
    return _apply(hidden, residual, layer)


@steer.register_fake
def _(hidden: Tensor, residual: Tensor | None, layer: int) -> Tensor:
    return torch.empty_like(hidden)
