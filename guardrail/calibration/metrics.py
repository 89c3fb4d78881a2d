"""Small statistics used by calibration and evaluation."""

from __future__ import annotations

import math
from collections.abc import Sequence


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2."""
    if not positives or not negatives:
        raise ValueError("auroc needs at least one positive and one negative score")
    ranked = sorted([(v, 1) for v in positives] + [(v, 0) for v in negatives])
    # average ranks over ties (Mann-Whitney U)
    rank_sum = 0.0
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        avg = (i + j) / 2 + 1
        rank_sum += avg * sum(1 for k in range(i, j + 1) if ranked[k][1] == 1)
        i = j + 1
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default)."""
    if total == 0:
        return (0.0, 1.0)
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of ``values`` (``q`` in [0, 1])."""
    if not values:
        raise ValueError("quantile of an empty sequence")
    data = sorted(values)
    pos = (len(data) - 1) * min(max(q, 0.0), 1.0)
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def share_above(values: Sequence[float], threshold: float) -> float:
    """Share of ``values`` strictly above ``threshold`` (how often a gate there opens)."""
    if not values:
        raise ValueError("share_above of an empty sequence")
    return sum(1 for v in values if v > threshold) / len(values)


def gate_for_recall(positives: Sequence[float], recall: float) -> float:
    """A gate at which at least ``recall`` of ``positives`` lie strictly above it.

    With the scores sorted high to low, every gate below the ``ceil(recall * n)``-th
    score and at or above the next lower one opens on the same positives; the gate
    returned is the midpoint of that interval (one unit below the lowest score when
    every positive must pass), so ``share_above(positives, gate) >= recall`` holds.
    """
    if not positives:
        raise ValueError("gate_for_recall needs at least one positive score")
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    data = sorted(positives, reverse=True)
    k = math.ceil(recall * len(data) - 1e-9)
    kth = data[k - 1]
    below = next((v for v in data[k:] if v < kth), None)
    return (kth + below) / 2 if below is not None else kth - 1.0
