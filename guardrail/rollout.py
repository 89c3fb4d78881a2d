"""Rolling out policy versions: stable, canary, shadow, kill switch, and the report.

A :class:`RolloutConfig` says which bundles serve traffic::

    # rollout.yaml
    stable: organism@^1.2            # a registry reference or a bundle path (./, /, ~)
    canary:
      ref: organism@1.3.0
      share: 0.1                     # fraction of keys served by the canary
      sticky_key: user               # which id the caller passes to resolve(): user / session / request
    shadow: [organism@2.0.0-rc.1]    # scored on every request, never change the output
    kill_switch: false               # true: no steering at all

A :class:`Rollout` loads and verifies *every* referenced bundle when it is built
(and when it is updated), so switching arms, changing the share, promoting, rolling
back or pulling the kill switch is a pointer swap, never a model or bundle load::

    rollout = Rollout.from_file("rollout.yaml", PolicyRegistry("policies"),
                                trust_store=TrustStore.from_dir("keys"), adapter=adapter)
    a = rollout.resolve(user_id)      # Assignment(policy, arm, shadows)

Canary assignment hashes the key: ``bucket = int(sha256(f"{salt}:{key}")[:8]) / 2**64``,
a uniform number in [0, 1); the key goes to the canary when ``bucket < share``. The
same key always lands in the same arm, and raising the share only moves keys from
stable to canary. ``salt`` defaults to the canary's reference (each new canary draws a
new population); set it to keep one. A missing key (None or "") is assigned at random
per request.

:func:`report_events` summarises JSON Lines events per arm and version and flags a
canary whose intervention or refusal rate differs from stable by more than a
tolerance (``guardrail rollout report``, exit code 5 when flagged).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
)

from guardrail.errors import GuardrailError, InputError
from guardrail.policy import PolicyBundle

if TYPE_CHECKING:
    from guardrail.adapters import ModelAdapter
    from guardrail.registry import BundleSource
    from guardrail.signing import TrustStore

__all__ = [
    "ArmStats",
    "Assignment",
    "CanaryConfig",
    "Comparison",
    "Rollout",
    "RolloutConfig",
    "RolloutConfigError",
    "RolloutReport",
    "bucket",
    "report_events",
    "two_proportion_z",
]

StickyKey = Literal["user", "session", "request"]
Arm = Literal["stable", "canary", "killed"]


class RolloutConfigError(InputError):
    """A rollout configuration (file or mapping) is invalid or cannot be loaded."""


# ----------------------------------------------------------------------------- configuration


def _ref_text(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must be a registry reference (e.g. 'organism@^1.2') or a bundle path")
    return value


class CanaryConfig(BaseModel):
    """The canary arm: which bundle, for what share of keys, keyed by which id."""

    model_config = ConfigDict(extra="forbid")

    ref: str = Field(description="registry reference or bundle path of the canary bundle")
    share: float = Field(ge=0.0, le=1.0, description="fraction of keys served by the canary, 0..1")
    sticky_key: StickyKey = Field(
        "user", description="the id callers pass to Rollout.resolve(): user, session or request"
    )

    @field_validator("ref")
    @classmethod
    def _ref(cls, value: str) -> str:
        return _ref_text(value)


class RolloutConfig(BaseModel):
    """Which policy bundles serve traffic (see the module docstring for the file format)."""

    model_config = ConfigDict(extra="forbid")

    stable: str = Field(description="registry reference or bundle path of the stable bundle")
    canary: CanaryConfig | None = None
    shadow: list[Annotated[str, AfterValidator(_ref_text)]] = Field(
        default_factory=list, description="bundles scored but never applied"
    )
    kill_switch: bool = Field(False, description="true: no steering for any request")
    salt: str | None = Field(
        None, description="canary hashing salt; default: the canary's reference"
    )

    @field_validator("stable")
    @classmethod
    def _stable(cls, value: str) -> str:
        return _ref_text(value)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> RolloutConfig:
        """Read a ``.json``, ``.yaml`` or ``.yml`` file; errors name the file, field and fix."""
        source = Path(path)
        try:
            text = source.read_text(encoding="utf-8")
        except OSError as exc:
            raise RolloutConfigError(f"cannot read rollout config {str(source)!r}: {exc}") from exc
        suffix = source.suffix.lower()
        try:
            if suffix == ".json":
                raw = json.loads(text)
            elif suffix in (".yaml", ".yml"):
                import yaml

                raw = yaml.safe_load(text)
            else:
                raise RolloutConfigError(
                    f"rollout config {str(source)!r}: unknown format {suffix or '(no suffix)'!r}; "
                    "name the file .json, .yaml or .yml"
                )
        except RolloutConfigError:
            raise
        except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
            raise RolloutConfigError(
                f"rollout config {str(source)!r} does not parse: {exc}"
            ) from exc
        if not isinstance(raw, dict):
            raise RolloutConfigError(
                f"rollout config {str(source)!r} must hold a mapping with at least 'stable' "
                f"(e.g. 'stable: organism@^1'), got {type(raw).__name__}"
            )
        return cls.parse(raw, source=str(source))

    @classmethod
    def parse(cls, raw: Mapping[str, Any], *, source: str = "rollout config") -> RolloutConfig:
        """Validate a mapping, raising :class:`RolloutConfigError` with one line per problem."""
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise RolloutConfigError(_explain(exc, source)) from None


_HINTS = {
    "share": "use a fraction between 0 and 1, e.g. 0.1 for 10 % of keys",
    "sticky_key": "use 'user', 'session' or 'request'",
    "stable": "use a registry reference such as 'organism@^1.2' or a bundle path such as './bundle'",
    "ref": "use a registry reference such as 'organism@1.3.0' or a bundle path",
    "kill_switch": "use true or false",
}


def _explain(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        leaf = str(err["loc"][-1]) if err["loc"] else ""
        if err["type"] == "extra_forbidden":
            parent = (
                CanaryConfig if len(err["loc"]) > 1 and err["loc"][0] == "canary" else RolloutConfig
            )
            hint = f"unknown field; allowed: {', '.join(parent.model_fields)}"
            lines.append(f"{loc}: {hint}")
            continue
        hint = _HINTS.get(leaf, "")
        got = "" if err["type"] == "missing" else f" (got {err.get('input')!r:.60})"
        lines.append(f"{loc}: {err['msg']}{got}" + (f"; {hint}" if hint else ""))
    return f"invalid {source}: " + "; ".join(lines)


# ----------------------------------------------------------------------------- assignment


def bucket(salt: str, key: str) -> float:
    """The key's position in [0, 1): the first 8 bytes of ``sha256(f"{salt}:{key}")`` / 2**64."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass(frozen=True)
class Assignment:
    """What serves one request.

    ``policy`` steers it (None when the kill switch is on: generate unguarded, mode
    ``"off"``); ``arm`` goes on the request's events as ``rollout_arm``; each of
    ``shadows`` is scored (mode ``"shadow"``) but never changes the output.
    ``bucket`` is the key's hash in [0, 1), None when assigned at random or killed.
    """

    policy: PolicyBundle | None
    arm: Arm
    shadows: list[PolicyBundle]
    bucket: float | None = None


@dataclass(frozen=True)
class _State:
    config: RolloutConfig
    stable: PolicyBundle
    canary: PolicyBundle | None
    shadows: tuple[PolicyBundle, ...]
    salt: str
    by_ref: Mapping[str, PolicyBundle]  # the config's reference strings -> loaded bundles


def _is_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith((".", "~"))


class Rollout:
    """Serves a :class:`RolloutConfig`: every bundle loaded up front, arms by key.

    Args:
        config: a :class:`RolloutConfig` or a mapping of one.
        registry: resolves references (a :class:`~guardrail.registry.PolicyRegistry` or
            :class:`~guardrail.registry.RemoteRegistry`); needed unless every entry is a path.
        trust_store: when given, every bundle must carry a signature it verifies.
        adapter: when given, every bundle must fit this model (pass the guardrail's adapter).
        base_dir: relative bundle paths are resolved from here (``from_file``: the file's folder).
        rng: random source for requests without a key.

    Readers (:meth:`resolve`) take no lock; :meth:`update` and the shortcuts below
    load what is new first and then replace one immutable state object, so a
    request sees either the old or the new configuration, never a mix.
    """

    def __init__(
        self,
        config: RolloutConfig | Mapping[str, Any],
        registry: BundleSource | None = None,
        *,
        trust_store: TrustStore | None = None,
        adapter: ModelAdapter | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        rng: random.Random | None = None,
    ):
        self.registry = registry
        self.trust_store = trust_store
        self.adapter = adapter
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.source: Path | None = None
        self._rng = rng or random.Random()
        self._bundles: dict[tuple[str, ...], PolicyBundle] = {}
        self._write_lock = threading.Lock()
        self._state = self._build(config)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        registry: BundleSource | None = None,
        *,
        trust_store: TrustStore | None = None,
        adapter: ModelAdapter | None = None,
        rng: random.Random | None = None,
    ) -> Rollout:
        """Build from a JSON or YAML file; relative bundle paths are relative to the file."""
        source = Path(path)
        rollout = cls(
            RolloutConfig.from_file(source),
            registry,
            trust_store=trust_store,
            adapter=adapter,
            base_dir=source.parent,
            rng=rng,
        )
        rollout.source = source
        return rollout

    # ------------------------------------------------------------------ loading

    def _load(self, ref: str, where: str, pinned: Mapping[str, PolicyBundle]) -> PolicyBundle:
        if ref in pinned:
            return pinned[ref]
        try:
            if _is_path(ref):
                path = Path(ref).expanduser()
                if not path.is_absolute() and self.base_dir is not None:
                    path = self.base_dir / path
                key: tuple[str, ...] = ("path", str(path.resolve()))
                if key not in self._bundles:
                    from guardrail.signing import load_verified

                    self._bundles[key] = load_verified(path, self.trust_store, self.adapter)
                return self._bundles[key]
            if self.registry is None:
                raise RolloutConfigError(
                    f"{ref!r} is a registry reference but the rollout has no registry; pass "
                    "registry=PolicyRegistry(...) or give a bundle path such as './bundle'"
                )
            resolved = self.registry.resolve(ref)
            key = ("registry", resolved.name, resolved.version)
            if key not in self._bundles:
                self._bundles[key] = self.registry.load(
                    resolved.ref, adapter=self.adapter, trust_store=self.trust_store
                )
            return self._bundles[key]
        except GuardrailError as exc:
            raise type(exc)(f"rollout {where} {ref!r}: {exc}") from exc

    def _build(
        self,
        config: RolloutConfig | Mapping[str, Any],
        pinned: Mapping[str, PolicyBundle] | None = None,
    ) -> _State:
        """Load what ``config`` names; references in ``pinned`` reuse those bundles as they are."""
        if not isinstance(config, RolloutConfig):
            config = RolloutConfig.parse(config)
        pinned = pinned or {}
        stable = self._load(config.stable, "stable", pinned)
        canary = self._load(config.canary.ref, "canary.ref", pinned) if config.canary else None
        shadows = tuple(
            self._load(ref, f"shadow[{i}]", pinned) for i, ref in enumerate(config.shadow)
        )
        salt = (
            config.salt if config.salt is not None else (config.canary.ref if config.canary else "")
        )
        by_ref = {config.stable: stable, **dict(zip(config.shadow, shadows, strict=True))}
        if config.canary and canary is not None:
            by_ref[config.canary.ref] = canary
        keep = {id(b) for b in by_ref.values()}
        self._bundles = {k: b for k, b in self._bundles.items() if id(b) in keep}
        return _State(config, stable, canary, shadows, salt, by_ref)

    # ------------------------------------------------------------------ state

    @property
    def config(self) -> RolloutConfig:
        return self._state.config

    @property
    def stable(self) -> PolicyBundle:
        return self._state.stable

    @property
    def canary(self) -> PolicyBundle | None:
        return self._state.canary

    @property
    def shadows(self) -> list[PolicyBundle]:
        return list(self._state.shadows)

    @property
    def sticky_key(self) -> StickyKey | None:
        """Which id :meth:`resolve` expects (None without a canary)."""
        canary = self._state.config.canary
        return canary.sticky_key if canary else None

    def __repr__(self) -> str:
        s = self._state
        canary = (
            f", canary={s.canary.ref} share={s.config.canary.share:g}"
            if s.canary and s.config.canary
            else ""
        )
        shadows = f", shadow={[b.ref for b in s.shadows]}" if s.shadows else ""
        killed = ", KILLED" if s.config.kill_switch else ""
        return f"Rollout(stable={s.stable.ref}{canary}{shadows}{killed})"

    def update(self, config: RolloutConfig | Mapping[str, Any]) -> None:
        """Switch to ``config``: load (and verify) any new bundle, then swap atomically.

        Bundles already loaded are reused; a failure leaves the current state serving.
        References are resolved again, so a range picks up newly published versions.
        """
        with self._write_lock:
            self._state = self._build(config)

    def _change(self, **changes: Any) -> None:
        """A config change that reuses the loaded bundles as they are: no I/O, a pointer swap."""
        with self._write_lock:
            state = self._state
            data = state.config.model_dump()
            data.update(changes)
            self._state = self._build(data, pinned=state.by_ref)

    def reload(self) -> None:
        """Re-read the file this rollout was built from (:meth:`from_file`) and :meth:`update`."""
        if self.source is None:
            raise RolloutConfigError("reload() needs a rollout built with Rollout.from_file()")
        self.update(RolloutConfig.from_file(self.source))

    def set_kill_switch(self, on: bool = True) -> None:
        """Stop (or resume) all steering; a pointer swap (no registry access, cannot fail)."""
        self._change(kill_switch=on)

    def set_canary_share(self, share: float) -> None:
        """Change the canary's share of keys; raises if there is no canary."""
        canary = self._state.config.canary
        if canary is None:
            raise RolloutConfigError("set_canary_share(): the rollout has no canary; configure one")
        self._change(canary={**canary.model_dump(), "share": share})

    def promote(self) -> None:
        """Make the canary bundle stable and drop the canary arm; a pointer swap (no loading)."""
        canary = self._state.config.canary
        if canary is None:
            raise RolloutConfigError("promote(): the rollout has no canary to promote")
        self._change(stable=canary.ref, canary=None)

    def rollback(self) -> None:
        """Drop the canary arm: every request goes to stable; a pointer swap (no loading)."""
        self._change(canary=None)

    # ------------------------------------------------------------------ per request

    def key_for(
        self,
        *,
        user: str | None = None,
        session: str | None = None,
        request_id: str | None = None,
    ) -> str | None:
        """The id :meth:`resolve` should get, by the canary's ``sticky_key``."""
        sticky = self.sticky_key
        return {"user": user, "session": session, "request": request_id, None: None}[sticky]

    def bucket(self, key: str) -> float:
        """``key``'s hash position in [0, 1) under this rollout's salt."""
        return bucket(self._state.salt, key)

    def resolve(self, key: str | None = None) -> Assignment:
        """The assignment of one request; ``key`` is its sticky id (see :meth:`key_for`).

        Constant time, no I/O and no locks: safe to call on every request from any thread.
        """
        state = self._state  # one read: a concurrent update cannot mix configurations
        if state.config.kill_switch:
            return Assignment(policy=None, arm="killed", shadows=[])
        shadows = list(state.shadows)
        canary = state.config.canary
        if state.canary is None or canary is None:
            return Assignment(policy=state.stable, arm="stable", shadows=shadows)
        position = bucket(state.salt, key) if key else None
        draw = position if position is not None else self._rng.random()
        if draw < canary.share:
            return Assignment(policy=state.canary, arm="canary", shadows=shadows, bucket=position)
        return Assignment(policy=state.stable, arm="stable", shadows=shadows, bucket=position)


# ----------------------------------------------------------------------------- report


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

    @property
    def flagged(self) -> bool:
        """True when some canary metric differs from stable by more than the tolerance."""
        return any(c.flagged for c in self.comparisons)

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
            f"{'arm':8} {'policy':24} {'mode':8} {'requests':>8} {'interv.':>8} {'refusal':>8} "
            f"{'score p10/p50/p90':>24} {'latency p50/p95':>18}"
        )
        out += ["", header, "-" * len(header)]

        def num(value: float | None, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        for a in self.arms:
            scores = "/".join(num(v, ".3f") for v in (a.score_p10, a.score_p50, a.score_p90))
            latency = f"{num(a.latency_p50, '.3f')}s/{num(a.latency_p95, '.3f')}s"
            out.append(
                f"{a.arm:8} {a.policy:24} {a.mode:8} {a.requests:8d} {a.intervention_rate:8.1%} "
                f"{a.refusal_rate:8.1%} {scores:>24} {latency:>18}"
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
        out += [f"warning: {w}" for w in self.warnings]
        return "\n".join(out)


def _quantile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation quantile of sorted ``values`` (numpy's default)."""
    if not values:
        return None
    position = (len(values) - 1) * q
    lo = math.floor(position)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (position - lo)


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
    lines: Iterable[str],
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
                score_p10=_quantile(scores, 0.10),
                score_p50=_quantile(scores, 0.50),
                score_p90=_quantile(scores, 0.90),
                latency_p50=_quantile(latencies, 0.50),
                latency_p95=_quantile(latencies, 0.95),
            )
        )

    warnings: list[str] = []
    comparisons: list[Comparison] = []
    for canary in (a for a in arms if a.arm == "canary"):
        stable = [a for a in arms if a.arm == "stable" and a.mode == canary.mode]
        if not stable:
            warnings.append(
                f"canary {canary.policy} [{canary.mode}] has no stable requests to compare with"
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
    if kinds and kinds <= {"intervention", "refusal"}:
        warnings.append(
            "the log holds only intervention/refusal events, so requests with neither are missing "
            "and rates are over logged requests only; log one record per request for true rates"
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
    )
