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

Comparing the arms of a rollout from its events is evaluation's job
(:mod:`guardrail.evaluation.rollout_report`, ``guardrail rollout report``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from guardrail.errors import GuardrailError, InputError
from guardrail.policy.bundle import PolicyBundle

if TYPE_CHECKING:
    from guardrail.adapters import ModelAdapter
    from guardrail.policy.registry import BundleSource
    from guardrail.policy.signing import TrustStore

__all__ = [
    "Assignment",
    "CanaryConfig",
    "Rollout",
    "RolloutConfig",
    "RolloutConfigError",
    "bucket",
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


def is_path_like(text: str) -> bool:
    """Whether a policy string names a bundle directory rather than a registry
    reference: it holds a path separator or starts with ``.`` or ``~``."""
    return "/" in text or "\\" in text or text.startswith((".", "~"))


class Rollout:
    """Serves a :class:`RolloutConfig`: every bundle loaded up front, arms by key.

    Args:
        config: a :class:`RolloutConfig` or a mapping of one.
        registry: resolves references (a :class:`~guardrail.policy.registry.PolicyRegistry` or
            :class:`~guardrail.policy.registry.RemoteRegistry`); needed unless every entry is a path.
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
            if is_path_like(ref):
                path = Path(ref).expanduser()
                if not path.is_absolute() and self.base_dir is not None:
                    path = self.base_dir / path
                key: tuple[str, ...] = ("path", str(path.resolve()))
                if key not in self._bundles:
                    from guardrail.policy.signing import load_verified

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
