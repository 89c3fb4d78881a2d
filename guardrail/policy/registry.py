"""Policy registries: named, versioned bundles found by reference.

A local registry is a directory of bundles laid out like ``policies/``::

    <root>/<name>/<version>/manifest.json, tensors.safetensors[, signature.json]

A **reference** names a bundle and a version constraint:

=========================  ==============================================================
``organism``               the latest version (highest that is not a pre-release)
``organism@latest``        same
``organism@1.2.0``         exactly 1.2.0 (pre-releases can be pinned: ``1.3.0-rc.1``)
``organism@^1.2``          caret: ``>=1.2.0,<2.0.0``; for 0.x the minor is the breaking
                           part: ``^0.3`` is ``>=0.3.0,<0.4.0``, ``^0.0.3`` is ``<0.0.4``
``organism@~1.2``          tilde: ``>=1.2.0,<1.3.0`` (``~1`` is ``>=1.0.0,<2.0.0``)
``organism@>=1.1,<2``      any PEP 440 specifier set (``==``, ``!=``, ``~=``, ``<``, ...)
=========================  ==============================================================

Versions order by semantic-versioning precedence: ``1.10.0`` > ``1.9.0``, build
metadata (``+...``) does not count, and a pre-release (anything after a ``-``) sorts
below its release: ``1.0.0-1`` < ``1.0.0-alpha`` < ``1.0.0-alpha.1`` < ``1.0.0-beta.2``
< ``1.0.0-beta.11`` < ``1.0.0-rc.1`` < ``1.0.0``. ``latest`` never picks a pre-release,
and a range admits one only when the constraint names a pre-release of the same
``major.minor.patch`` (``>=2.1.0-rc.1`` admits ``2.1.0-rc.2`` but not ``2.2.0-rc.1``).

:class:`PolicyRegistry` serves a local directory; :class:`RemoteRegistry` serves an
HTTP(S) registry through a local cache (itself a :class:`PolicyRegistry`). Its layout::

    GET {base}/index.json                          {"<name>": ["<version>", ...], ...}
    GET {base}/<name>/<version>/manifest.json
    GET {base}/<name>/<version>/tensors.safetensors
    GET {base}/<name>/<version>/signature.json     optional (404 = unsigned)

Any static file server over a local registry directory plus an ``index.json``
(:func:`write_index` writes it) is a remote registry.

Safeguards:

* **Downgrades.** A registry remembers the versions it served per policy name. A
  range or ``latest`` that now resolves below a served version it also matches (the
  newer one was removed, or hidden from the index) raises
  :class:`PolicyDowngradeError`. Pinning the lower version exactly is the way to roll
  back on purpose: it is served, logged as ``guardrail.policy.downgrade`` and recorded
  in ``registry.downgrades`` (and passed to ``on_downgrade``). The record is the file
  ``<state_dir>/.versions-seen.json``; ``RemoteRegistry`` keeps it in its cache
  directory by default, ``PolicyRegistry`` only when given a ``state_dir`` (else for
  the object's lifetime).
* **Transport.** Credentials (``headers=``) go only to the registry's own origin
  (scheme, host and port): a redirect elsewhere drops them, and a redirect from
  https to plain http is refused. Every call has an overall deadline (``deadline_s``)
  besides the per-read ``timeout``, so a server that drips bytes cannot stall it.
  A plain-http registry serves bundles only with a trust store (signatures are then
  the protection) or with ``allow_insecure=True``.
"""

from __future__ import annotations

import builtins
import errno
import http.client
import io
import json
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)
from tenacity.stop import stop_base

from guardrail.atomic import fsync_dir as _fsync_dir
from guardrail.atomic import write_synced as _write_synced
from guardrail.errors import PolicyError, PolicyIntegrityError
from guardrail.logs import get_logger
from guardrail.policy.bundle import MANIFEST, SIGNATURE, TENSORS, PolicyBundle

if TYPE_CHECKING:
    from guardrail.adapters import ModelAdapter
    from guardrail.policy.signing import TrustStore

__all__ = [
    "INDEX",
    "VERSIONS_SEEN",
    "BundleSource",
    "InsecureRegistryError",
    "PolicyDowngrade",
    "PolicyDowngradeError",
    "PolicyNotFoundError",
    "PolicyReferenceError",
    "PolicyRef",
    "PolicyRegistry",
    "RegistryError",
    "RegistryUnavailableError",
    "RemoteRegistry",
    "ResolvedPolicy",
    "write_index",
]

INDEX = "index.json"
VERSIONS_SEEN = ".versions-seen.json"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# A version as a path component: what Manifest accepts, and never '..' or '/'.
_VERSION_DIR = re.compile(r"^\d+\.\d+\.\d+(?:[-+.][0-9A-Za-z.+-]+)?$")
# Semantic versioning: MAJOR.MINOR.PATCH[-PRE.RELEASE][+BUILD.METADATA].
_SEMVER = re.compile(
    r"^(\d+)\.(\d+)\.(\d+)"
    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)
_PARTIAL = r"(\d+)(?:\.(\d+))?(?:\.(\d+))?"
_CARET = re.compile(rf"^\^{_PARTIAL}$")
_TILDE = re.compile(rf"^~{_PARTIAL}$")

log = get_logger(component="registry")


# ----------------------------------------------------------------------------- errors


class RegistryError(PolicyError):
    """A registry cannot list, resolve, fetch or publish a policy bundle."""


class PolicyReferenceError(RegistryError, ValueError):
    """A policy reference such as ``name@^1.2`` is malformed."""


class PolicyNotFoundError(RegistryError, LookupError):
    """No bundle of that name, or no version matching the constraint."""


class RegistryUnavailableError(RegistryError):
    """A remote registry could not be reached (after retries) or missed the deadline."""


class PolicyDowngradeError(RegistryError):
    """A range or ``latest`` resolved below a version this registry served before."""


class InsecureRegistryError(RegistryError):
    """A plain-http registry was asked for a bundle without a trust store or opt-in."""


# ----------------------------------------------------------------------------- references


@dataclass(frozen=True)
class _Version:
    """A policy version ordered by semantic-versioning precedence.

    ``MAJOR.MINOR.PATCH[-pre.release][+build]`` follows semver: a pre-release sorts
    below its release, identifiers compare numerically when all digits (and below
    alphanumeric ones), more identifiers sort higher. Other PEP 440 spellings the
    manifest accepts (``1.2``, ``1.0.0.post1``, ``1.0.0.dev1``) keep their PEP 440
    meaning. ``pep440`` is the version PEP 440 specifiers are matched against.
    """

    text: str
    core: tuple[int, int, int]
    prerelease: tuple[str, ...]
    build: str
    pep440: Version

    @property
    def is_prerelease(self) -> bool:
        return bool(self.prerelease)

    @property
    def precedence(self) -> tuple[Any, ...]:
        """Sort key without build metadata: equal for versions semver calls equal."""
        if self.prerelease:
            ids = tuple((0, int(p)) if p.isdigit() else (1, p) for p in self.prerelease)
            return (self.core, 0, ids)
        return (self.core, 1, self.pep440)

    @property
    def key(self) -> tuple[Any, ...]:
        """Total sort key: precedence, then build metadata (so the order is deterministic)."""
        return (*self.precedence, self.build)


def _parse_version(text: str) -> _Version | None:
    """Parse a version (semver, or a PEP 440 spelling such as ``1.2``); None if it is neither."""
    match = _SEMVER.match(text)
    if match is not None:
        major, minor, patch, pre, build = match.groups()
        core = (int(major), int(minor), int(patch))
        release = ".".join(map(str, core))
        pep440 = Version(release)
        if pre:
            # PEP 440 reads '1.0.0-rc.1' as 1.0.0rc1 but '1.0.0-1' as a post-release, and
            # cannot read '1.0.0-alpha.beta' at all: keep only true PEP 440 pre-releases.
            pep440 = Version(f"{release}.dev0")
            try:
                candidate = Version(f"{release}-{pre}")
            except InvalidVersion:
                candidate = None
            if (
                candidate is not None
                and candidate.is_prerelease
                and candidate.post is None
                and candidate.release == core
            ):
                pep440 = candidate
        return _Version(text, core, tuple(pre.split(".")) if pre else (), build or "", pep440)
    try:
        v = Version(text)
    except InvalidVersion:
        return None
    padded = (*v.release, 0, 0)
    pre_ids: tuple[str, ...] = ()
    if v.is_prerelease:
        pre_ids = (
            *((v.pre[0], str(v.pre[1])) if v.pre else ()),
            *(("dev", str(v.dev)) if v.dev is not None else ()),
        )
    return _Version(text, (padded[0], padded[1], padded[2]), pre_ids, v.local or "", v)


def _version_key(text: str) -> tuple[Any, ...]:
    parsed = _parse_version(text)
    if parsed is None:
        raise ValueError(f"{text!r} is not a version")
    return parsed.key


def _same_version(a: str, b: str) -> bool:
    pa, pb = _parse_version(a), _parse_version(b)
    return pa is not None and pb is not None and pa.key == pb.key


def _prerelease_cores(specifier: SpecifierSet) -> set[tuple[int, int, int]]:
    """The ``major.minor.patch`` of every pre-release a specifier set names."""
    cores = set()
    for spec in specifier:
        named = _parse_version(spec.version)
        if named is not None and named.is_prerelease:
            cores.add(named.core)
    return cores


@dataclass(frozen=True)
class PolicyRef:
    """A parsed reference: a bundle name and a version constraint.

    ``kind`` is ``"latest"``, ``"exact"`` or ``"range"`` (caret, tilde or PEP 440).
    """

    name: str
    constraint: str
    kind: Literal["latest", "exact", "range"]
    specifier: SpecifierSet | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, text: str | PolicyRef) -> PolicyRef:
        """Parse ``name``, ``name@latest``, ``name@1.2.0``, ``name@^1.2``, ``name@~1.2``
        or ``name@<PEP 440 specifiers>``."""
        if isinstance(text, PolicyRef):
            return text
        if not isinstance(text, str):
            raise PolicyReferenceError(
                f"policy reference must be a string, got {type(text).__name__}"
            )
        name, sep, constraint = text.strip().partition("@")
        name, constraint = name.strip(), constraint.strip()
        if not _NAME.match(name):
            raise PolicyReferenceError(
                f"policy reference {text!r}: {name!r} is not a valid policy name; use lowercase "
                "letters, digits, '.', '_' or '-' (e.g. 'organism@^1.2')"
            )
        if sep and not constraint:
            raise PolicyReferenceError(
                f"policy reference {text!r} has an empty version after '@'; write e.g. "
                f"'{name}@1.2.0', '{name}@^1.2' or '{name}@latest' (or just '{name}')"
            )
        if not constraint or constraint == "latest":
            return cls(name, "latest", "latest")
        caret, tilde = _CARET.match(constraint), _TILDE.match(constraint)
        if caret or tilde:
            groups = (caret or tilde).groups()  # type: ignore[union-attr]
            parts = [int(g) for g in groups if g is not None]
            lower = parts + [0] * (3 - len(parts))
            if caret:
                # The first non-zero part given is the breaking one; all zeros: the last given.
                i = next((k for k, p in enumerate(parts) if p != 0), len(parts) - 1)
            else:
                i = min(1, len(parts) - 1)  # ~1.2[.3] bumps the minor, ~1 the major
            upper = parts[:i] + [parts[i] + 1]
            upper += [0] * (3 - len(upper))
            spec = SpecifierSet(f">={'.'.join(map(str, lower))},<{'.'.join(map(str, upper))}")
            return cls(name, constraint, "range", spec)
        if constraint[0].isdigit():
            if _parse_version(constraint) is None:
                raise PolicyReferenceError(
                    f"policy reference {text!r}: {constraint!r} is not a version; use e.g. "
                    f"'{name}@1.2.0'"
                )
            return cls(name, constraint, "exact")
        try:
            spec = SpecifierSet(constraint)
        except InvalidSpecifier:
            raise PolicyReferenceError(
                f"policy reference {text!r}: {constraint!r} is not a version constraint; use an "
                f"exact version ('{name}@1.2.0'), a caret or tilde range ('{name}@^1.2', "
                f"'{name}@~1.2'), PEP 440 specifiers ('{name}@>=1.1,<2') or 'latest'"
            ) from None
        return cls(name, constraint, "range", spec)

    def matches(self, version: str | Version) -> bool:
        """Whether ``version`` satisfies the constraint (``latest``: any release).

        A pre-release matches an exact pin of itself, or a range naming a pre-release
        of the same ``major.minor.patch``; never ``latest``.
        """
        v = _parse_version(str(version))
        if v is None:
            return False
        if self.kind == "latest":
            return not v.is_prerelease
        if self.kind == "exact":
            pin = _parse_version(self.constraint)
            assert pin is not None  # checked by parse()
            return v.precedence == pin.precedence and (not pin.build or v.build == pin.build)
        assert self.specifier is not None
        if v.is_prerelease:
            return v.core in _prerelease_cores(self.specifier) and self.specifier.contains(
                v.pep440, prereleases=True
            )
        return self.specifier.contains(v.pep440, prereleases=False)

    def select(self, versions: Iterable[str]) -> str | None:
        """The highest of ``versions`` that matches, or None."""
        best: _Version | None = None
        for text in versions:
            v = _parse_version(text)
            if v is not None and self.matches(text) and (best is None or v.key > best.key):
                best = v
        return None if best is None else best.text

    def __str__(self) -> str:
        return self.name if self.kind == "latest" else f"{self.name}@{self.constraint}"


@dataclass(frozen=True)
class ResolvedPolicy:
    """A reference resolved to one version, and where its bundle lives (or will be cached)."""

    name: str
    version: str
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def _not_found(ref: PolicyRef, versions: list[str], where: str) -> PolicyNotFoundError:
    if not versions:
        return PolicyNotFoundError(f"no policy named {ref.name!r} in {where}")
    hint = ""
    pre = [v for v in versions if (pv := _parse_version(v)) is not None and pv.is_prerelease]
    if pre and ref.kind != "exact":
        hint = (
            f"; pre-releases ({', '.join(pre)}) match only when pinned, e.g. '{ref.name}@{pre[-1]}'"
        )
    return PolicyNotFoundError(
        f"no version of {ref.name!r} in {where} matches {ref.constraint!r}; available: "
        f"{', '.join(versions)}{hint}"
    )


def _sorted_versions(versions: Iterable[str]) -> list[str]:
    """The valid versions among ``versions``, lowest first (semver precedence)."""
    return sorted((v for v in versions if _parse_version(v) is not None), key=_version_key)


class BundleSource(Protocol):
    """What a :class:`~guardrail.policy.rollout.Rollout` needs from a registry."""

    def resolve(self, ref: str | PolicyRef) -> ResolvedPolicy: ...

    def load(
        self,
        ref: str | PolicyRef,
        *,
        adapter: ModelAdapter | None = None,
        trust_store: TrustStore | None = None,
    ) -> PolicyBundle: ...


def _load_checked(
    path: Path,
    name: str,
    version: str,
    *,
    adapter: ModelAdapter | None,
    trust_store: TrustStore | None,
) -> PolicyBundle:
    """Load a registry bundle: integrity, signature, identity (name and version), model fit.

    The files are read consistently (see :func:`guardrail.policy.signing.load_verified`): a
    bundle replaced while it is read is read again whole, never reported as corrupt.
    """
    from guardrail.policy.signing import load_verified

    bundle = load_verified(path, trust_store)
    if bundle.name != name or not _same_version(bundle.version, version):
        raise PolicyIntegrityError(
            f"{path}: the bundle's manifest says {bundle.ref} but it is stored as {name}@{version}; "
            "registry directories must be <name>/<version> of their manifest. Re-publish it with "
            "PolicyRegistry.publish()"
        )
    if adapter is not None:
        bundle.check_compatible(adapter)
    return bundle


# ----------------------------------------------------------------------------- downgrades


@dataclass(frozen=True)
class PolicyDowngrade:
    """An explicitly pinned version served below one the registry served before."""

    name: str
    version: str
    highest_served: str
    ref: str
    registry: str

    @property
    def message(self) -> str:
        return (
            f"{self.name}@{self.version} served by explicit pin {self.ref!r} although "
            f"{self.name}@{self.highest_served} was served before from {self.registry}"
        )


class _VersionHistory:
    """The versions a registry served, per policy name; persisted when ``path`` is set.

    The file is JSON, ``{"schema": 1, "served": {"<name>": ["<version>", ...]}}``,
    replaced atomically; concurrent writers merge what the file holds with their own.
    """

    MAX_PER_NAME = 256

    def __init__(self, path: Path | None):
        self.path = path
        self._memory: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def _read(self) -> dict[str, set[str]]:
        if self.path is None:
            return {}
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(
                f"{self.path}: the record of served policy versions is unreadable ({exc}); it "
                "guards against silently serving an older version after a newer one was "
                "removed. Restore the file, or delete it to start a new record"
            ) from None
        served = raw.get("served") if isinstance(raw, dict) else None
        if not isinstance(served, dict) or not all(
            isinstance(v, builtins.list) and all(isinstance(x, str) for x in v)
            for v in served.values()
        ):
            raise RegistryError(
                f"{self.path}: the record of served policy versions is malformed (expected "
                '{"schema": 1, "served": {"<name>": ["<version>", ...]}}); restore the file, or '
                "delete it to start a new record"
            )
        return {
            name: {v for v in versions if _parse_version(v) is not None}
            for name, versions in served.items()
        }

    def served(self, name: str) -> set[str]:
        """Every version of ``name`` served so far (this process and the file)."""
        with self._lock:
            return self._memory.get(name, set()) | self._read().get(name, set())

    def check(self, ref: PolicyRef, version: str, where: str) -> None:
        """Raise :class:`PolicyDowngradeError` if a range or ``latest`` resolved below a
        served version it also matches."""
        if ref.kind == "exact":
            return
        chosen = _parse_version(version)
        if chosen is None:
            return
        higher = [
            v
            for v in self.served(ref.name)
            if (parsed := _parse_version(v)) is not None
            and parsed.key > chosen.key
            and ref.matches(v)
        ]
        if not higher:
            return
        top = max(higher, key=_version_key)
        record = f" (recorded in {str(self.path)!r})" if self.path is not None else ""
        raise PolicyDowngradeError(
            f"policy reference {str(ref)!r} now resolves to {ref.name}@{version} in {where}, but "
            f"{ref.name}@{top} was served before{record}: the newer version was removed or "
            f"hidden, and serving the older one silently could undo a fix. Restore {top}; or, "
            f"to roll back on purpose, pin the version explicitly ('{ref.name}@{version}')"
        )

    def record(self, name: str, version: str) -> str | None:
        """Note that ``version`` was served; return the highest version served before it
        if that is higher (a downgrade), else None."""
        with self._lock:
            before = self._memory.get(name, set()) | self._read().get(name, set())
            self._memory.setdefault(name, set()).add(version)
            if version not in before:
                self._write(name, version)
        chosen = _version_key(version)
        higher = [v for v in before if _version_key(v) > chosen]
        return max(higher, key=_version_key) if higher else None

    def _write(self, name: str, version: str) -> None:
        if self.path is None:
            return
        served = self._read()
        for known, versions in self._memory.items():
            served.setdefault(known, set()).update(versions)
        served.setdefault(name, set()).add(version)
        body = {
            "schema": 1,
            "served": {
                key: sorted(versions, key=_version_key)[-self.MAX_PER_NAME :]
                for key, versions in sorted(served.items())
            },
        }
        tmp: Path | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f"{self.path.name}.tmp-", dir=self.path.parent)
            os.close(fd)
            tmp = Path(tmp_name)
            _write_synced(tmp, (json.dumps(body, indent=2) + "\n").encode())
            os.replace(tmp, self.path)
            tmp = None
            _fsync_dir(self.path.parent)
        except OSError as exc:
            # Availability over bookkeeping: the load goes on; this process still remembers.
            log.warning("registry.versions_seen_unwritable", path=str(self.path), error=str(exc))
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)


DowngradeHook = Callable[[PolicyDowngrade], None]


# ----------------------------------------------------------------------------- local


class PolicyRegistry:
    """A directory of bundles, ``<root>/<name>/<version>/``, resolved by reference.

    Args:
        root: the registry directory.
        state_dir: where to keep the record of served versions (``.versions-seen.json``)
            that downgrade protection checks; None keeps it in memory for this object's
            lifetime. Put it outside ``root`` if others can write to the registry.
        on_downgrade: called with a :class:`PolicyDowngrade` whenever an explicit pin
            serves a version below one served before (also logged as
            ``guardrail.policy.downgrade`` and appended to :attr:`downgrades`). An
            exception it raises aborts the load.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        state_dir: str | os.PathLike[str] | None = None,
        on_downgrade: DowngradeHook | None = None,
    ):
        self.root = Path(root)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.on_downgrade = on_downgrade
        self.downgrades: deque[PolicyDowngrade] = deque(maxlen=256)
        self._history = _VersionHistory(
            self.state_dir / VERSIONS_SEEN if self.state_dir is not None else None
        )

    def __repr__(self) -> str:
        return f"PolicyRegistry({str(self.root)!r})"

    def versions(self, name: str) -> builtins.list[str]:
        """The stored versions of ``name``, oldest first (empty when there are none)."""
        directory = self.root / name
        if not _NAME.match(name) or not directory.is_dir():
            return []
        found = [
            p.name
            for p in directory.iterdir()
            if not p.name.startswith(".")
            and _VERSION_DIR.match(p.name)
            and (p / MANIFEST).is_file()
        ]
        return _sorted_versions(found)

    def list(self) -> dict[str, builtins.list[str]]:
        """Every policy name with its versions, oldest first: ``{"organism": ["1.0.0", ...]}``."""
        if not self.root.is_dir():
            return {}
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))
        return {name: versions for name in names if (versions := self.versions(name))}

    def resolve(self, ref: str | PolicyRef) -> ResolvedPolicy:
        """The version ``ref`` selects and its directory.

        Raises :class:`PolicyNotFoundError` if none matches, and
        :class:`PolicyDowngradeError` if a range or ``latest`` selects a version below
        one served before that it also matches.
        """
        from guardrail.policy.signing import _retry_while_changing, _stat_key

        parsed = PolicyRef.parse(ref)
        directory = self.root / parsed.name
        if not directory.is_dir():
            return self._resolve_once(parsed)
        # A version being re-published (publish(overwrite=True)) is absent from the
        # listing for a moment: list again while the directory is changing.
        return _retry_while_changing(
            lambda: self._resolve_once(parsed),
            lambda: _stat_key(directory),
            (PolicyNotFoundError, PolicyDowngradeError),
        )

    def _resolve_once(self, parsed: PolicyRef) -> ResolvedPolicy:
        where = f"registry {str(self.root)!r}"
        versions = self.versions(parsed.name)
        version = parsed.select(versions)
        if version is None:
            if not self.root.is_dir():
                where += " (the directory does not exist)"
            raise _not_found(parsed, versions, where)
        self._history.check(parsed, version, where)
        return ResolvedPolicy(parsed.name, version, self.root / parsed.name / version)

    def load(
        self,
        ref: str | PolicyRef,
        *,
        adapter: ModelAdapter | None = None,
        trust_store: TrustStore | None = None,
    ) -> PolicyBundle:
        """Resolve ``ref`` and load the bundle, verified.

        Checks integrity, that the manifest's name and version match the directory,
        the signature when ``trust_store`` is given (unsigned bundles are refused), and
        the fit to ``adapter``'s model when given. The version served is recorded for
        downgrade protection.
        """
        parsed = PolicyRef.parse(ref)
        resolved = self.resolve(parsed)
        bundle = _load_checked(
            resolved.path, resolved.name, resolved.version, adapter=adapter, trust_store=trust_store
        )
        self._served(parsed, resolved.version, str(self.root))
        return bundle

    def _served(self, ref: PolicyRef, version: str, where: str) -> None:
        """Record a served version; report an explicit pin below the highest served."""
        higher = self._history.record(ref.name, version)
        if higher is None or ref.kind != "exact":
            return
        downgrade = PolicyDowngrade(ref.name, version, higher, str(ref), where)
        self.downgrades.append(downgrade)
        log.warning(
            "guardrail.policy.downgrade",
            policy_name=ref.name,
            policy_version=version,
            highest_served=higher,
            ref=str(ref),
            registry=where,
        )
        if self.on_downgrade is not None:
            self.on_downgrade(downgrade)

    def publish(
        self,
        bundle: PolicyBundle | str | os.PathLike[str],
        *,
        overwrite: bool = False,
        trust_store: TrustStore | None = None,
    ) -> Path:
        """Store ``bundle`` (a bundle or a bundle directory) as ``<root>/<name>/<version>``.

        A directory keeps its ``signature.json``. An existing version is never replaced
        unless ``overwrite=True`` (versions are immutable once released: publish a new
        one). With ``trust_store``, only bundles it verifies are published. The write
        is atomic (see :meth:`PolicyBundle.save_pretrained`).
        """
        if not isinstance(bundle, PolicyBundle):
            bundle = PolicyBundle.from_pretrained(bundle)
        if trust_store is not None:
            from guardrail.policy.signing import verify_bundle

            verify_bundle(bundle, trust_store)
        if not _VERSION_DIR.match(bundle.version):
            raise RegistryError(
                f"cannot publish {bundle.ref}: version {bundle.version!r} is not semantic"
            )
        directory = self.root / bundle.name
        directory.mkdir(parents=True, exist_ok=True)
        lock = directory / f".{bundle.version}.lock"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise RegistryError(
                f"another publish of {bundle.ref} is in progress ({lock} exists); if none is, "
                "delete that lock file and retry"
            ) from None
        os.close(fd)
        try:
            same = [v for v in self.versions(bundle.name) if _same_version(v, bundle.version)]
            if same and not overwrite:
                raise RegistryError(
                    f"{bundle.name}@{same[0]} is already published in {str(self.root)!r}; released "
                    "versions are immutable, so publish a new version (e.g. with "
                    "bundle.with_version(...)) or pass overwrite=True to replace it"
                )
            for old in same:
                if old != bundle.version:
                    shutil.rmtree(directory / old)
            return bundle.save_pretrained(directory / bundle.version)
        finally:
            lock.unlink(missing_ok=True)


def write_index(root: str | os.PathLike[str]) -> Path:
    """Write ``<root>/index.json`` for serving a local registry as a remote one."""
    registry = PolicyRegistry(root)
    path = registry.root / INDEX
    fd, tmp = tempfile.mkstemp(prefix=f".{INDEX}.tmp-", dir=registry.root)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(registry.list(), fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- remote


class _HTTPStatus(Exception):
    def __init__(self, url: str, code: int, reason: str):
        super().__init__(f"HTTP {code} {reason}".strip())
        self.url, self.code, self.reason = url, code, reason


class _DeadlineExceeded(Exception):
    """The overall deadline of a registry call passed (never retried)."""


def _attempts(n: int) -> str:
    return f"{n} attempt" if n == 1 else f"{n} attempts"


def _transient(exc: BaseException) -> bool:
    """Retry connection problems, timeouts, 5xx and 429; never 404 or other 4xx."""
    if isinstance(exc, _HTTPStatus):
        return exc.code >= 500 or exc.code == 429
    return isinstance(exc, (OSError, http.client.HTTPException))


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, the port defaulted by scheme; credentials are
    sent only where this equals the registry's own."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1  # unparsable: never equal to a real origin
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


class _stop_at(stop_base):  # noqa: N801 - named like tenacity's stop conditions
    """Stop retrying when the next attempt would start past ``deadline`` (monotonic)."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return time.monotonic() + (retry_state.upcoming_sleep or 0.0) >= self.deadline


class _Request(urllib.request.Request):
    """A request that carries the monotonic deadline of the registry call it belongs to."""

    def __init__(self, url: str, *, deadline: float, **kwargs: Any):
        super().__init__(url, **kwargs)
        self.deadline = deadline


class _DeadlineReader(io.RawIOBase):
    """A socket's read side where every receive waits at most until the deadline."""

    def __init__(self, sock: socket.socket, deadline: float, timeout: float | None):
        super().__init__()
        self._sock = sock
        # An unbuffered socket file keeps the socket open after the connection lets go
        # of it (urllib closes the connection as soon as the headers are in).
        self._raw = sock.makefile("rb", buffering=0)
        self._deadline, self._timeout = deadline, timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise _DeadlineExceeded
        self._sock.settimeout(remaining if self._timeout is None else min(self._timeout, remaining))
        try:
            return self._raw.readinto(buffer)
        except TimeoutError:
            if time.monotonic() >= self._deadline:
                raise _DeadlineExceeded from None
            raise

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineSocket:
    """A connected socket (plain or TLS) whose reads are bounded by a deadline."""

    def __init__(self, sock: socket.socket, deadline: float, timeout: float | None):
        self._sock, self._deadline, self._timeout = sock, deadline, timeout

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        if mode != "rb":  # http.client reads responses only through makefile("rb")
            raise ValueError(f"unsupported mode {mode!r}")
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline, self._timeout))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _DeadlineConnection(http.client.HTTPConnection):
    """An HTTP connection whose connect and every read end by the call's deadline."""

    def __init__(self, *args: Any, deadline: float = math.inf, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise _DeadlineExceeded
        timeout = self.timeout if isinstance(self.timeout, (int, float)) else None
        self.timeout = remaining if timeout is None else min(timeout, remaining)
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self._deadline, timeout)


class _DeadlineHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


def _deadline_of(request: urllib.request.Request) -> float:
    return request.deadline if isinstance(request, _Request) else math.inf


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_DeadlineConnection, req, deadline=_deadline_of(req))


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        context = getattr(self, "_context", None)
        return self.do_open(
            _DeadlineHTTPSConnection, req, context=context, deadline=_deadline_of(req)
        )


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects within http(s), sending the registry's credentials (its
    ``headers``) only to its own origin and refusing https -> http unless allowed."""

    _ALWAYS = frozenset({"authorization", "proxy-authorization", "cookie"})

    def __init__(self, base_url: str, credentials: Mapping[str, str], allow_insecure: bool):
        self._origin = _origin(base_url)
        self._credentials = credentials  # the registry's own dict: later changes count
        self._allow_insecure = allow_insecure

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is None:
            return None
        source, target = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if target.scheme not in ("http", "https"):
            fp.close()
            raise RegistryError(
                f"GET {req.full_url} redirected to {newurl!r}, which is not http(s); a registry "
                "serves files over http(s) only: fix the server's redirect or the registry URL"
            )
        if source.scheme == "https" and target.scheme == "http" and not self._allow_insecure:
            fp.close()
            raise RegistryError(
                f"GET {req.full_url} redirected from https to plain http ({newurl!r}), where "
                "anyone on the network path can change the answer; fix the server's redirect, "
                "or pass allow_insecure=True to RemoteRegistry if that network is trusted"
            )
        names = self._ALWAYS | {k.lower() for k in self._credentials}
        kept = {k: v for k, v in new.header_items() if k.lower() not in names}
        if _origin(newurl) == self._origin:
            kept.update(self._credentials)
        elif any(k.lower() in names for k in req.headers):
            log.info("registry.redirect_credentials_dropped", url=req.full_url, to=newurl)
        return _Request(
            new.full_url,
            deadline=_deadline_of(req),
            headers=kept,
            origin_req_host=new.origin_req_host,
            unverifiable=True,
        )


class RemoteRegistry:
    """An HTTP(S) registry (layout in the module docstring) behind a local cache.

    Args:
        base_url: ``http://`` or ``https://`` URL of the registry root.
        cache_dir: where fetched bundles are kept, as a normal local registry
            (``<cache_dir>/<name>/<version>/``). A version is downloaded once, verified,
            then moved into place atomically; afterwards it is served from the cache.
        retries: retries after the first attempt, on connection errors, timeouts, HTTP
            5xx and 429 (never on 404 or other 4xx); exponential backoff between them.
        timeout: seconds one network operation (connect, one read) may wait.
        deadline_s: seconds one call (:meth:`index`, :meth:`resolve`, :meth:`fetch`,
            :meth:`load`) may spend on the network in all, retries and backoff
            included; past it the call raises :class:`RegistryUnavailableError`. This
            bounds a server that drips bytes slower than ``timeout`` never notices.
        backoff, max_backoff: the first wait and the cap of the exponential backoff (s).
        max_bytes: the largest file accepted.
        headers: extra request headers (e.g. ``{"Authorization": "Bearer ..."}``). They
            are sent only to the origin of ``base_url`` (scheme, host and port): a
            redirect to another origin drops them.
        offline_fallback: when the index cannot be fetched, resolve ranges against the
            cached versions (logged as a warning) instead of failing.
        allow_insecure: let a plain ``http://`` registry serve bundles without a trust
            store, and follow redirects from https to http. Without it, :meth:`fetch`
            and :meth:`load` over http need ``trust_store=`` (signatures then protect
            the bundles) and refuse with :class:`InsecureRegistryError` otherwise.
        state_dir: where the record of served versions for downgrade protection is
            kept (``.versions-seen.json``); ``cache_dir`` by default.
        on_downgrade: called with a :class:`PolicyDowngrade` when an explicit pin
            serves a version below one served before (see :class:`PolicyRegistry`).
    """

    def __init__(
        self,
        base_url: str,
        cache_dir: str | os.PathLike[str],
        *,
        retries: int = 3,
        timeout: float = 10.0,
        deadline_s: float = 120.0,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        max_bytes: int = 256 * 2**20,
        headers: Mapping[str, str] | None = None,
        offline_fallback: bool = True,
        allow_insecure: bool = False,
        state_dir: str | os.PathLike[str] | None = None,
        on_downgrade: DowngradeHook | None = None,
    ):
        scheme = urllib.parse.urlsplit(base_url).scheme
        if scheme not in ("http", "https"):
            raise RegistryError(
                f"remote registry URL {base_url!r} must start with http:// or https://"
            )
        if retries < 0 or timeout <= 0:
            raise RegistryError(f"retries must be >= 0 and timeout > 0 (got {retries}, {timeout})")
        if not deadline_s > 0:
            raise RegistryError(
                f"deadline_s must be > 0 seconds (got {deadline_s}); it bounds each registry call"
            )
        self.base_url = base_url.rstrip("/")
        self.cache = PolicyRegistry(
            cache_dir,
            state_dir=state_dir if state_dir is not None else cache_dir,
            on_downgrade=on_downgrade,
        )
        self.retries = retries
        self.timeout = timeout
        self.deadline_s = deadline_s
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_bytes = max_bytes
        self.headers = dict(headers or {})
        self.offline_fallback = offline_fallback
        self.allow_insecure = allow_insecure
        self._opener = urllib.request.build_opener(
            _HTTPHandler(),
            _HTTPSHandler(),
            _RedirectHandler(self.base_url, self.headers, allow_insecure),
        )
        if scheme == "http" and allow_insecure:
            log.warning("registry.insecure_transport", url=self.base_url)

    def __repr__(self) -> str:
        return f"RemoteRegistry({self.base_url!r}, cache={str(self.cache.root)!r})"

    @property
    def downgrades(self) -> deque[PolicyDowngrade]:
        """Explicit pins served below a version served before (most recent last)."""
        return self.cache.downgrades

    # ------------------------------------------------------------------ HTTP

    def _url(self, *parts: str) -> str:
        return "/".join([self.base_url, *(urllib.parse.quote(p) for p in parts)])

    def _deadline(self) -> float:
        return time.monotonic() + self.deadline_s

    def _get(self, url: str, deadline: float, *, missing_ok: bool = False) -> bytes | None:
        """GET ``url`` with retries until ``deadline``; None for a 404 when ``missing_ok``."""
        from guardrail._version import __version__

        headers = {"User-Agent": f"mars-guardrail/{__version__}", **self.headers}
        attempts = 0

        def once() -> bytes:
            nonlocal attempts
            attempts += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _DeadlineExceeded
            request = _Request(url, deadline=deadline, headers=headers)
            try:
                with self._opener.open(request, timeout=min(self.timeout, remaining)) as response:
                    data: bytes = response.read(self.max_bytes + 1)
            except urllib.error.HTTPError as exc:
                exc.close()
                raise _HTTPStatus(url, exc.code, str(exc.reason)) from None
            except OSError:
                if time.monotonic() >= deadline:  # e.g. a connect cut short by the deadline
                    raise _DeadlineExceeded from None
                raise
            if len(data) > self.max_bytes:
                raise RegistryError(f"GET {url}: larger than max_bytes={self.max_bytes}")
            return data

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("registry.retry", url=url, attempt=state.attempt_number, error=str(exc))

        retrying = Retrying(
            stop=stop_after_attempt(self.retries + 1) | _stop_at(deadline),
            wait=wait_exponential(multiplier=self.backoff, max=self.max_backoff),
            retry=retry_if_exception(_transient),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(once)
        except _DeadlineExceeded:
            raise RegistryUnavailableError(
                f"GET {url}: no complete answer within the deadline of {self.deadline_s:g} s "
                f"for this registry call ({_attempts(attempts)}); the registry or the network is "
                "too slow or stalled. Retry later, or raise the limit with "
                "RemoteRegistry(..., deadline_s=...)"
            ) from None
        except _HTTPStatus as exc:
            if exc.code == 404:
                if missing_ok:
                    return None
                raise PolicyNotFoundError(f"GET {url}: not found (HTTP 404)") from None
            if _transient(exc):
                raise RegistryUnavailableError(
                    f"GET {url} failed after {_attempts(attempts)}: {exc}; the registry is down or "
                    "overloaded, retry later"
                ) from None
            raise RegistryError(f"GET {url}: {exc}; check the URL and credentials") from None
        except (OSError, http.client.HTTPException) as exc:
            raise RegistryUnavailableError(
                f"GET {url} failed after {_attempts(attempts)}: {exc}; check the URL and the network"
            ) from exc

    def _check_transport(self, trust_store: TrustStore | None) -> None:
        if trust_store is not None or self.allow_insecure:
            return
        if urllib.parse.urlsplit(self.base_url).scheme == "http":
            raise InsecureRegistryError(
                f"remote registry {self.base_url!r} is plain http and no trust store was given, "
                "so anyone on the network path could serve a self-consistent bundle (e.g. one "
                "that disables steering). Use an https:// registry URL or pass trust_store= "
                "(the signers' public keys) to load()/fetch(); or, on a network you trust "
                "(e.g. a local test server), construct RemoteRegistry(..., allow_insecure=True)"
            )

    # ------------------------------------------------------------------ listing

    def index(self) -> dict[str, builtins.list[str]]:
        """``GET {base}/index.json``: every name with its versions, oldest first.

        Entries with an invalid name or version are skipped (and logged).
        """
        return self._index(self._deadline())

    def _index(self, deadline: float) -> dict[str, builtins.list[str]]:
        url = self._url(INDEX)
        data = self._get(url, deadline)
        try:
            raw = json.loads(data or b"")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"GET {url}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise RegistryError(
                f"GET {url}: expected an object {{name: [versions]}}, got {type(raw).__name__}"
            )
        index: dict[str, builtins.list[str]] = {}
        for name, versions in raw.items():
            ok = isinstance(versions, builtins.list) and all(isinstance(v, str) for v in versions)
            if not isinstance(name, str) or not _NAME.match(name) or not ok:
                log.warning("registry.index_entry_skipped", url=url, name=str(name)[:80])
                continue
            good = [v for v in versions if _VERSION_DIR.match(v) and _parse_version(v) is not None]
            if len(good) != len(versions):
                log.warning("registry.index_versions_skipped", url=url, name=name)
            index[name] = _sorted_versions(good)
        return index

    def list(self) -> dict[str, builtins.list[str]]:
        """Same as :meth:`index`."""
        return self.index()

    # ------------------------------------------------------------------ resolution

    def resolve(self, ref: str | PolicyRef) -> ResolvedPolicy:
        """The version ``ref`` selects; its ``path`` is the cache directory (maybe not yet fetched).

        An exact version already in the cache is resolved without network access. A
        range or ``latest`` resolving below a version served before that it also
        matches raises :class:`PolicyDowngradeError`.
        """
        return self._resolve(PolicyRef.parse(ref), self._deadline())

    def _resolve(self, parsed: PolicyRef, deadline: float) -> ResolvedPolicy:
        if parsed.kind == "exact":
            cached = parsed.select(self.cache.versions(parsed.name))
            if cached is not None:
                return ResolvedPolicy(parsed.name, cached, self.cache.root / parsed.name / cached)
        try:
            versions = self._index(deadline).get(parsed.name, [])
        except RegistryUnavailableError as exc:
            if not self.offline_fallback:
                raise
            try:
                resolved = self.cache.resolve(parsed)
            except PolicyNotFoundError:
                raise exc from None
            log.warning(
                "registry.offline_fallback",
                ref=str(parsed),
                version=resolved.version,
                error=str(exc),
            )
            return resolved
        version = parsed.select(versions)
        where = f"remote registry {self.base_url!r}"
        if version is None:
            raise _not_found(parsed, versions, where)
        self.cache._history.check(parsed, version, where)
        return ResolvedPolicy(parsed.name, version, self.cache.root / parsed.name / version)

    def fetch(self, ref: str | PolicyRef, *, trust_store: TrustStore | None = None) -> Path:
        """Make sure the version ``ref`` selects is in the cache; return its directory.

        A download is written to a temporary directory, verified like any bundle
        (hashes, values, manifest name and version; the signature with ``trust_store``)
        and only then moved into the cache. A failed check raises
        :class:`PolicyIntegrityError` (or :class:`PolicySignatureError`) and leaves the
        cache as it was. Over plain http, ``trust_store`` is required unless the
        registry was built with ``allow_insecure=True`` (:class:`InsecureRegistryError`).
        """
        return self._fetch(PolicyRef.parse(ref), trust_store, self._deadline())

    def _fetch(self, parsed: PolicyRef, trust_store: TrustStore | None, deadline: float) -> Path:
        self._check_transport(trust_store)
        resolved = self._resolve(parsed, deadline)
        if resolved.path.is_dir():
            return resolved.path
        name, version = resolved.name, resolved.version
        parent = resolved.path.parent
        created = [d for d in (parent, self.cache.root) if not d.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=parent))
        try:
            manifest = self._get(self._url(name, version, MANIFEST), deadline)
            tensors = self._get(self._url(name, version, TENSORS), deadline)
            signature = self._get(self._url(name, version, SIGNATURE), deadline, missing_ok=True)
            for fname, data in ((MANIFEST, manifest), (TENSORS, tensors), (SIGNATURE, signature)):
                if data is not None:
                    _write_synced(tmp / fname, data)
            try:
                _load_checked(tmp, name, version, adapter=None, trust_store=trust_store)
            except PolicyIntegrityError as exc:
                raise type(exc)(
                    f"download of {name}@{version} from {self.base_url} rejected: {exc}"
                ) from exc
            try:
                os.replace(tmp, resolved.path)
            except OSError as exc:  # fetched concurrently by someone else: keep theirs
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not resolved.path.is_dir():
                    raise
            _fsync_dir(parent)
            log.info("registry.fetched", ref=resolved.ref, url=self.base_url)
            return resolved.path
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            for directory in created:  # leave no empty directories behind a failed fetch
                if directory.is_dir() and not any(directory.iterdir()):
                    directory.rmdir()

    def load(
        self,
        ref: str | PolicyRef,
        *,
        adapter: ModelAdapter | None = None,
        trust_store: TrustStore | None = None,
    ) -> PolicyBundle:
        """Fetch (if not cached) and load the bundle ``ref`` selects, verified as in
        :meth:`PolicyRegistry.load`; the version served is recorded for downgrade
        protection."""
        parsed = PolicyRef.parse(ref)
        path = self._fetch(parsed, trust_store, self._deadline())
        bundle = _load_checked(
            path, path.parent.name, path.name, adapter=adapter, trust_store=trust_store
        )
        self.cache._served(parsed, path.name, self.base_url)
        return bundle
