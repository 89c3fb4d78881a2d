"""The MARS rule as pure tensor math: re-centre, score, strength, step.

Every function here implements one formula of the method (``docs/method.md``) and is
unit- and property-tested on its own; nothing here knows about models, hooks or
policy bundles. Notation: ``h`` is the residual stream entering layer ``l*`` at
``t*``; ``u`` the unit refusal direction; ``p_S`` the projection of the harmless
centroid on ``u``; ``g`` the cluster gap; ``delta`` the modality offset of the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from guardrail.errors import SteeringError

RecenterMode = Literal["full", "projection", "none"]
RECENTER_MODES: tuple[str, ...] = ("full", "projection", "none")
RECENTER_ACTIVATION: tuple[bool | str, ...] = (False, "steered", True)
"""Values of ``apply_recentering_to_activation``: write ``h + a u`` (score with ``h_c``
only); write ``h_c + a u`` on the rows the gate opens; write ``h_c + a u`` on every row."""


# --------------------------------------------------------------------------- math


def recenter(h: Tensor, delta: Tensor, u: Tensor, mode: str) -> Tensor:
    """Remove the modality offset ``delta`` from ``h``.

    ``full`` subtracts ``delta``; ``projection`` subtracts only its component along
    ``u`` (keeping visual content); ``none`` returns ``h``. ``h`` and ``delta`` are
    ``[..., d]``; ``u`` is ``[..., d]`` of unit norm.
    """
    if mode == "full":
        return h - delta
    if mode == "projection":
        return h - (delta * u).sum(-1, keepdim=True) * u
    if mode == "none":
        return h
    raise ValueError(f"recenter mode {mode!r} is not one of {RECENTER_MODES}")


def refusal_score(h_c: Tensor, u: Tensor, p_S: Tensor, g: Tensor) -> Tensor:
    """``s = (<h_c, u> - p_S) / g``: 0 at the harmless centroid, 1 at the harmful one."""
    return ((h_c * u).sum(-1) - p_S) / g


def steering_strength(
    s: Tensor,
    g: Tensor,
    *,
    tau: Tensor | float,
    lam: Tensor | float,
    kappa: Tensor | float,
    eta: Tensor | float | None = None,
    h_norm: Tensor | None = None,
) -> Tensor:
    """``a = min(rho, lam * g * relu(s - tau))`` with the trust region ``rho = kappa * g``.

    When ``eta`` is given (and finite), ``a`` is further bounded by ``eta * |h|``.
    """
    a = torch.minimum(kappa * g, lam * g * torch.relu(s - tau))
    if eta is not None:
        if h_norm is None:
            raise ValueError("eta bound requested without h_norm")
        bound = eta * h_norm
        a = torch.where(torch.isfinite(bound), torch.minimum(a, bound), a)
    return a


@dataclass(frozen=True)
class StepResult:
    """What :func:`mars_step` computed for each row."""

    h: Tensor
    score: Tensor
    strength: Tensor


def mars_step(
    h: Tensor,
    *,
    u: Tensor,
    p_S: Tensor,
    g: Tensor,
    delta: Tensor,
    tau: Tensor | float,
    lam: Tensor | float,
    kappa: Tensor | float,
    eta: Tensor | float | None = None,
    recenter_mode: str = "full",
    apply_recentering_to_activation: bool | str = False,
    h_score: Tensor | None = None,
) -> StepResult:
    """One MARS step on activations ``h`` of shape ``[..., d]``.

    ``h_score`` (same shape, default ``h``) is the activation the score is read from:
    the mean over the last ``k`` prompt positions when a policy scores several
    (``score_positions``); the step is still added to ``h``.
    All arithmetic runs in float32 (or float64 if ``h`` is float64) and the result
    is cast back to ``h``'s dtype. Rows whose strength is zero are returned
    bit-identical to the input unless ``apply_recentering_to_activation`` is ``True``
    (``"steered"`` re-centres only the rows it steers).
    """
    work = torch.float64 if h.dtype == torch.float64 else torch.float32
    hw = h.to(work)
    uw = u.to(work)
    h_c = recenter(hw, delta.to(work), uw, recenter_mode)
    scored = (
        h_c if h_score is None else recenter(h_score.to(work), delta.to(work), uw, recenter_mode)
    )
    s = refusal_score(scored, uw, _t(p_S, work, h), _t(g, work, h))
    a = steering_strength(
        s,
        _t(g, work, h),
        tau=_t(tau, work, h),
        lam=_t(lam, work, h),
        kappa=_t(kappa, work, h),
        eta=None if eta is None else _t(eta, work, h),
        h_norm=hw.norm(dim=-1),
    )
    if apply_recentering_to_activation not in RECENTER_ACTIVATION:
        raise ValueError(
            f"apply_recentering_to_activation={apply_recentering_to_activation!r} is not one of "
            f"{RECENTER_ACTIVATION}"
        )
    base = hw if apply_recentering_to_activation is False else h_c
    new = (base + a.unsqueeze(-1) * uw).to(h.dtype)
    if apply_recentering_to_activation is not True:
        new = torch.where((a > 0).unsqueeze(-1), new, h)
    return StepResult(h=new, score=s, strength=a)


def _t(x: Tensor | float, dtype: torch.dtype, like: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=like.device, dtype=dtype)
    return torch.tensor(x, dtype=dtype, device=like.device)


def window_mean(
    hidden: Tensor,
    rows: Tensor,
    positions: Tensor,
    k: int,
    starts: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Mean of ``hidden[rows, positions - j]`` over ``j < k`` (``[n, d]``, in ``dtype``;
    default float32, or float64 for float64 ``hidden``): the last ``k`` prompt
    positions of each row, ending at ``t*``.

    Raises:
        SteeringError: a row has fewer than ``k`` attended positions (``starts``: each
            row's first attended position; default 0).
    """
    first = positions - (k - 1)
    floor = torch.zeros_like(first) if starts is None else starts.to(first.device)
    if bool((first < floor).any()):
        raise SteeringError(
            f"the policy scores the last {k} prompt positions but a prompt has only "
            f"{int((positions - floor + 1).min())}; use a policy calibrated with fewer "
            "score_positions"
        )
    offsets = torch.arange(k, device=positions.device)
    index = (positions.unsqueeze(1) - offsets).to(hidden.device)  # [n, k]
    work = dtype or (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    return hidden[rows.unsqueeze(1).to(hidden.device), index].to(work).mean(1)


def first_positions(attention_mask: Tensor) -> Tensor:
    """Index of the first attended position of each row (left padding ends there)."""
    return attention_mask.to(torch.long).argmax(dim=1)


def last_positions(attention_mask: Tensor) -> Tensor:
    """Index of the last attended position of each row (``t*``), padding-aware."""
    mask = attention_mask.to(torch.long)
    return mask.shape[1] - 1 - torch.flip(mask, dims=[1]).argmax(dim=1)
