"""From bundles to tensors: the steering plans of one batch.

A batch may mix policy versions (rollout arms, shadows); :func:`build_plans` groups
its rows by bundle and builds one :class:`~guardrail.steering.LayerPlan` per bundle,
with per-row parameters, so the whole batch runs in one forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from guardrail.errors import SteeringError
from guardrail.messages import Conversation
from guardrail.policy.bundle import PolicyBundle
from guardrail.steering import LayerPlan, first_positions, last_positions

__all__ = ["build_plans", "inapplicable", "policy_tensors", "recentring_offset", "row_values"]


def inapplicable(policy: PolicyBundle | None, conv: Conversation) -> str | None:
    """Why ``policy`` cannot steer ``conv`` (a missing re-centring offset), or None."""
    if policy is None or policy.parameters.recenter == "none":
        return None
    missing = [m for m in sorted(conv.modalities) if policy.delta(m) is None]
    if missing:
        return (
            f"policy {policy.ref} has no re-centring offset for {', '.join(missing)} input; "
            f"recalibrate with {', '.join(missing)} enabled or set recenter='none'"
        )
    return None


def policy_tensors(
    policy: PolicyBundle, device: torch.device, cache: dict[tuple[int, str], Any] | None
) -> dict[str, torch.Tensor]:
    """The bundle's tensors on ``device``, cached per (bundle, device)."""
    if cache is None:
        return {k: v.to(device) for k, v in policy.tensors.items()}
    key = (id(policy), str(device))
    entry = cache.get(key)
    if entry is None or entry[0] is not policy:
        if len(cache) > 64:
            cache.clear()
        entry = (policy, {k: v.to(device) for k, v in policy.tensors.items()})
        cache[key] = entry
    return entry[1]


def recentring_offset(
    policy: PolicyBundle, tensors: Mapping[str, torch.Tensor], modalities: Iterable[str]
) -> torch.Tensor:
    """One row's re-centring offset: the sum of ``policy``'s offsets for the row's
    modalities (zero for text, or when the policy does not re-centre).

    ``tensors`` are the bundle's tensors on the row's device (:func:`policy_tensors`).
    The vLLM worker builds its rows with this function too.

    Raises:
        SteeringError: the policy has no offset for one of the modalities.
    """
    delta = torch.zeros_like(tensors["u"])
    if policy.parameters.recenter == "none":
        return delta
    for modality in sorted(set(modalities)):
        offset = tensors.get(f"delta_{modality}")
        if offset is None:
            raise SteeringError(
                f"policy {policy.ref} has no re-centring offset for {modality} input; "
                f"recalibrate with {modality} enabled or set recenter='none'"
            )
        delta = delta + offset
    return delta


def row_gates(
    policy: PolicyBundle, modalities: Sequence[Iterable[str]], device: torch.device
) -> torch.Tensor:
    """Each row's gate (``SteeringParameters.gate`` of its modalities), ``[n]`` float32.

    The vLLM worker builds its rows with this function too.
    """
    gates = [policy.parameters.gate(m) for m in modalities]
    return torch.tensor(gates, dtype=torch.float32, device=device)


def build_plans(
    policies: Sequence[PolicyBundle | None],
    convs: Sequence[Conversation],
    attention_mask: torch.Tensor,
    *,
    apply: bool,
    cache: dict[tuple[int, str], Any] | None = None,
) -> list[LayerPlan]:
    """One :class:`LayerPlan` per distinct policy among the rows of a batch.

    ``policies[i]`` is the bundle of row ``i`` (``None``: the row is not steered); rows
    sharing a bundle share a plan, so a batch mixing policy versions runs in one
    forward pass with per-row parameters.
    Each row's re-centring offset is the sum of the bundle's offsets for the
    modalities present in that row.
    """
    device = attention_mask.device
    positions = last_positions(attention_mask)
    starts = first_positions(attention_mask)
    length = int(attention_mask.shape[1])
    groups: dict[int, list[int]] = {}
    for row, policy in enumerate(policies):
        if policy is not None:
            groups.setdefault(id(policy), []).append(row)
    plans = []
    for rows in groups.values():
        policy = policies[rows[0]]
        assert policy is not None  # grouped rows always have a policy
        params = policy.parameters
        t = policy_tensors(policy, device, cache)
        deltas = [recentring_offset(policy, t, convs[row].modalities) for row in rows]
        n = len(rows)

        def per_row(value: float | None, n: int = n) -> torch.Tensor:
            return torch.full((n,), float("inf") if value is None else float(value), device=device)

        plans.append(
            LayerPlan(
                layer=policy.layer,
                rows=torch.tensor(rows, device=device),
                positions=positions[rows],
                expected_length=length,
                u=t["u"].expand(n, -1),
                p_S=t["p_S"].expand(n),
                g=t["g"].expand(n),
                delta=torch.stack(deltas),
                tau=row_gates(policy, [convs[row].modalities for row in rows], device),
                lam=per_row(params.lam),
                kappa=per_row(params.kappa),
                eta=per_row(params.eta),
                recenter_mode=params.recenter,
                apply_recentering_to_activation=params.apply_recentering_to_activation,
                score_positions=params.score_positions,
                starts=starts[rows],
                apply=apply,
                batch_size=len(policies),
            )
        )
    return plans


def row_values(plans: Sequence[LayerPlan], n: int, attr: str) -> list[float | None]:
    values: list[float | None] = [None] * n
    for plan in plans:
        tensor = getattr(plan, attr)
        if tensor is None:
            continue
        for row, value in zip(plan.rows.tolist(), tensor.tolist(), strict=True):
            values[row] = float(value)
    return values
