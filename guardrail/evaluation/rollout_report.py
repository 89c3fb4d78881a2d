"""Comparing the arms of a rollout: per-arm rates from JSON Lines events.

:func:`report_events` summarises JSON Lines events per arm and version and flags a
canary whose intervention or refusal rate differs from stable by more than a
tolerance, or that has no stable baseline to compare with (``guardrail rollout
report``, exit code 5 when flagged). Rates come from the decision records (one per
request, written by :class:`~guardrail.observability.events.JsonlSink` by default)
when the log holds them, each with its 95 % Wilson interval.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from guardrail.calibration.metrics import quantile, wilson_interval
from guardrail.errors import InputError

__all__ = ["ArmStats", "Comparison", "RolloutReport", "report_events", "two_proportion_z"]


def _quantile(values: Sequence[float], q: float) -> float | None:
    """The quantile of ``values``, or None when there are none."""
    return quantile(values, q) if values else None


class _Event(BaseModel):
    """One JSON Lines record; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    request_id: str = Field(min_length=1)
    policy_name: str | None
    policy_version: str | None
    rollout_arm: str | None = None
    intervened: StrictBool
    refused: StrictBool
    score: float | None = None
    latency_s: float = Field(ge=0, allow_inf_nan=False)
    mode: str
    kind: str | None = None

    @field_validator("score")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be finite")
        return value


class ArmStats(BaseModel):
    """Per arm, policy version and mode: counts, rates and distributions."""

    arm: str
    policy: str
    mode: str
    requests: int
    interventions: int
    refusals: int
    intervention_rate: float
    refusal_rate: float
    intervention_ci: tuple[float, float] = Field(description="95 % Wilson interval")
    refusal_ci: tuple[float, float] = Field(description="95 % Wilson interval")
    score_p10: float | None
    score_p50: float | None
    score_p90: float | None
    latency_p50: float | None
    latency_p95: float | None


class Comparison(BaseModel):
    """One canary metric against stable: difference and two-proportion z-test."""

    canary: str
    metric: Literal["intervention_rate", "refusal_rate"]
    mode: str
    canary_rate: float
    stable_rate: float
    difference: float
    z: float
    p_value: float
    flagged: bool


class RolloutReport(BaseModel):
    """The summary of a rollout's events (:func:`report_events`)."""

    source: str
    lines: int
    requests: int
    skipped: int
    skipped_examples: list[str]
    tolerance: float
    alpha: float | None
    arms: list[ArmStats]
    comparisons: list[Comparison]
    warnings: list[str]
    problems: list[str] = Field(
        default_factory=list,
        description="reasons the canary cannot be judged (e.g. no stable baseline): flagged",
    )
    decision_records: bool = Field(
        False, description="rates come from one decision record per request"
    )

    @property
    def flagged(self) -> bool:
        """True when some canary metric differs from stable by more than the tolerance,
        or a canary cannot be compared with stable at all (a check that cannot be made
        must not pass)."""
        return any(c.flagged for c in self.comparisons) or bool(self.problems)

    def to_text(self) -> str:
        """A plain-text table for terminals."""
        out = [
            f"rollout report: {self.source}: {self.requests} requests from {self.lines} lines"
            + (
                f", {self.skipped} malformed line{'s' if self.skipped != 1 else ''} skipped"
                if self.skipped
                else ""
            )
        ]
        out += [f"  skipped {example}" for example in self.skipped_examples]
        header = (
            f"{'arm':8} {'policy':24} {'mode':8} {'requests':>8} {'interv. (95% CI)':>22} "
            f"{'refusal (95% CI)':>22} "
            f"{'score p10/p50/p90':>24} {'latency p50/p95':>18}"
        )
        out += ["", header, "-" * len(header)]

        def num(value: float | None, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        for a in self.arms:
            scores = "/".join(num(v, ".3f") for v in (a.score_p10, a.score_p50, a.score_p90))
            latency = f"{num(a.latency_p50, '.3f')}s/{num(a.latency_p95, '.3f')}s"
            out.append(
                f"{a.arm:8} {a.policy:24} {a.mode:8} {a.requests:8d} "
                f"{_rate(a.intervention_rate, a.intervention_ci):>22} "
                f"{_rate(a.refusal_rate, a.refusal_ci):>22} {scores:>24} {latency:>18}"
            )
        if self.comparisons:
            out.append("")
        for c in self.comparisons:
            name = c.metric.replace("_", " ")
            verdict = f"FLAGGED (differs by more than {self.tolerance:.1%})" if c.flagged else "ok"
            out.append(
                f"canary {c.canary} [{c.mode}] vs stable: {name} {c.canary_rate:.1%} vs "
                f"{c.stable_rate:.1%} ({c.difference * 100:+.1f} pp, z={c.z:.2f}, "
                f"p={c.p_value:.3g}) {verdict}"
            )
        out += [f"FLAGGED: {p}" for p in self.problems]
        out += [f"warning: {w}" for w in self.warnings]
        return "\n".join(out)


def _rate(rate: float, ci: tuple[float, float]) -> str:
    return f"{rate:.1%} ({ci[0]:.0%}-{ci[1]:.0%})"


def two_proportion_z(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """Pooled two-proportion z statistic and two-sided p-value of ``x1/n1`` vs ``x2/n2``."""
    if n1 == 0 or n2 == 0:
        return 0.0, 1.0
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (x1 / n1 - x2 / n2) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


@dataclass
class _Request:
    intervened: bool
    refused: bool
    score: float | None
    latency_s: float


def _read_events(
    lines: Iterable[str], only_kind: str | None = None
) -> tuple[int, int, list[str], dict[tuple[str, str, str], dict[str, _Request]], set[str | None]]:
    total = skipped = 0
    examples: list[str] = []
    groups: dict[tuple[str, str, str], dict[str, _Request]] = {}
    kinds: set[str | None] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        total += 1
        try:
            event = _Event.model_validate_json(line)
        except ValidationError as exc:
            skipped += 1
            if len(examples) < 5:
                err = exc.errors()[0]
                loc = ".".join(str(p) for p in err["loc"])
                examples.append(f"line {number}: {loc + ': ' if loc else ''}{err['msg']}")
            continue
        kinds.add(event.kind)
        if only_kind is not None and event.kind != only_kind:
            continue
        arm = event.rollout_arm or "-"
        policy = f"{event.policy_name}@{event.policy_version}" if event.policy_name else "-"
        requests = groups.setdefault((arm, policy, event.mode), {})
        seen = requests.get(event.request_id)
        if seen is None:  # an intervention and a refusal of one request are one request
            requests[event.request_id] = _Request(
                event.intervened, event.refused, event.score, event.latency_s
            )
        else:
            seen.intervened |= event.intervened
            seen.refused |= event.refused
            seen.score = seen.score if seen.score is not None else event.score
            seen.latency_s = max(seen.latency_s, event.latency_s)
    return total, skipped, examples, groups, kinds


def report_events(
    path: str | os.PathLike[str], *, tolerance: float = 0.05, alpha: float | None = None
) -> RolloutReport:
    """Summarise a JSON Lines event log per rollout arm, policy version and mode.

    Each line needs ``request_id``, ``policy_name``, ``policy_version``,
    ``intervened``, ``refused``, ``latency_s`` and ``mode`` (``rollout_arm``, ``score``
    optional); malformed lines are skipped and counted. Records sharing a request id
    (e.g. an intervention and a refusal event) count as one request. Each canary
    group is compared with all stable requests of the same mode: it is flagged when
    its intervention or refusal rate differs by more than ``tolerance`` (absolute),
    and, when ``alpha`` is given, the two-proportion z-test's p-value is below it.
    """
    if not 0 <= tolerance <= 1:
        raise InputError(
            f"tolerance {tolerance!r} must be an absolute rate difference in [0, 1], e.g. 0.05"
        )
    if alpha is not None and not 0 < alpha < 1:
        raise InputError(f"alpha {alpha!r} must be in (0, 1), e.g. 0.01")
    source = Path(path)
    try:
        with source.open(encoding="utf-8", errors="replace") as fh:
            total, skipped, examples, groups, kinds = _read_events(fh)
        if "decision" in kinds:  # one record per request: count those, nothing else
            with source.open(encoding="utf-8", errors="replace") as fh:
                total, skipped, examples, groups, kinds = _read_events(fh, only_kind="decision")
    except OSError as exc:
        raise InputError(f"cannot read events file {str(source)!r}: {exc}") from exc

    arms: list[ArmStats] = []
    order = {"stable": 0, "canary": 1}
    for (arm, policy, mode), requests in sorted(
        groups.items(), key=lambda g: (order.get(g[0][0], 2), g[0])
    ):
        rows = list(requests.values())
        n = len(rows)
        interventions = sum(r.intervened for r in rows)
        refusals = sum(r.refused for r in rows)
        scores = sorted(r.score for r in rows if r.score is not None)
        latencies = sorted(r.latency_s for r in rows)
        arms.append(
            ArmStats(
                arm=arm,
                policy=policy,
                mode=mode,
                requests=n,
                interventions=interventions,
                refusals=refusals,
                intervention_rate=interventions / n,
                refusal_rate=refusals / n,
                intervention_ci=wilson_interval(interventions, n),
                refusal_ci=wilson_interval(refusals, n),
                score_p10=_quantile(scores, 0.10),
                score_p50=_quantile(scores, 0.50),
                score_p90=_quantile(scores, 0.90),
                latency_p50=_quantile(latencies, 0.50),
                latency_p95=_quantile(latencies, 0.95),
            )
        )

    warnings: list[str] = []
    problems: list[str] = []
    comparisons: list[Comparison] = []
    for canary in (a for a in arms if a.arm == "canary"):
        stable = [a for a in arms if a.arm == "stable" and a.mode == canary.mode]
        if not stable:
            problems.append(
                f"canary {canary.policy} [{canary.mode}] has no stable requests to compare with; "
                "log one decision record per request (JsonlSink does by default) so that "
                "requests that neither intervene nor refuse are counted"
            )
            continue
        n2 = sum(a.requests for a in stable)
        for metric, x1, x2 in (
            ("intervention_rate", canary.interventions, sum(a.interventions for a in stable)),
            ("refusal_rate", canary.refusals, sum(a.refusals for a in stable)),
        ):
            p1, p2 = x1 / canary.requests, x2 / n2
            z, p_value = two_proportion_z(x1, canary.requests, x2, n2)
            flagged = abs(p1 - p2) > tolerance + 1e-12 and (alpha is None or p_value < alpha)
            comparisons.append(
                Comparison(
                    canary=canary.policy,
                    metric=metric,
                    mode=canary.mode,
                    canary_rate=p1,
                    stable_rate=p2,
                    difference=p1 - p2,
                    z=z,
                    p_value=p_value,
                    flagged=flagged,
                )
            )
    records = "decision" in kinds
    if kinds and not records:
        warnings.append(
            "the log holds no decision records, only intervention/refusal events, so requests "
            "with neither are missing and rates are over logged requests only; log one "
            "decision record per request (JsonlSink(path), decision_records=True) for true rates"
        )
    if not groups:
        warnings.append("no valid events in the file")
    requests_total = sum(a.requests for a in arms)
    return RolloutReport(
        source=str(source),
        lines=total,
        requests=requests_total,
        skipped=skipped,
        skipped_examples=examples,
        tolerance=tolerance,
        alpha=alpha,
        arms=arms,
        comparisons=comparisons,
        warnings=warnings,
        problems=problems,
        decision_records=records,
    )
