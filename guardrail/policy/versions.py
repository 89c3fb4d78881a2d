"""Policy references and semantic versions: which version a reference names.

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
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from guardrail.errors import PolicyNotFoundError, PolicyReferenceError

if TYPE_CHECKING:
    pass


__all__ = [
    "PolicyRef",
    "ResolvedPolicy",
]
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
