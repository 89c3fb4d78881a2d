"""Policy registries: named, versioned bundles found by reference.

A local registry is a directory of bundles laid out like ``policies/``::

    <root>/<name>/<version>/manifest.json, tensors.safetensors[, signature.json]

References and version order are in :mod:`guardrail.policy.versions`, downgrade
protection in :mod:`guardrail.policy.history`, the HTTP(S) registry in
:mod:`guardrail.policy.remote`.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import tempfile
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from guardrail.errors import (
    PolicyDowngradeError,
    PolicyIntegrityError,
    PolicyNotFoundError,
    RegistryError,
)
from guardrail.logs import get_logger
from guardrail.policy.bundle import MANIFEST, PolicyBundle
from guardrail.policy.history import VERSIONS_SEEN, DowngradeHook, PolicyDowngrade, _VersionHistory
from guardrail.policy.versions import (
    _NAME,
    _VERSION_DIR,
    PolicyRef,
    ResolvedPolicy,
    _not_found,
    _same_version,
    _sorted_versions,
)

if TYPE_CHECKING:
    from guardrail.adapters import ModelAdapter
    from guardrail.policy.signing import TrustStore


__all__ = [
    "BundleSource",
    "INDEX",
    "PolicyRegistry",
    "write_index",
]
INDEX = "index.json"
log = get_logger(component="registry")


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
            if same and not overwrite and _same_content(directory / same[0], bundle):
                return directory / same[0]  # publishing a release again is a no-op
            if same and not overwrite:
                raise RegistryError(
                    f"{bundle.name}@{same[0]} is already published in {str(self.root)!r} with "
                    "other content; released versions are immutable (caches key on the "
                    "version), so publish a new version (guardrail policy derive SRC --version "
                    "X.Y.Z, or bundle.with_version(...)); overwrite=True is only for repairing "
                    "a registry, never for a released version"
                )
            for old in same:
                if old != bundle.version:
                    shutil.rmtree(directory / old)
            return bundle.save_pretrained(directory / bundle.version)
        finally:
            lock.unlink(missing_ok=True)


def _same_content(path: Path, bundle: PolicyBundle) -> bool:
    """Whether the bundle stored at ``path`` has ``bundle``'s content (manifest digest)."""
    try:
        stored = PolicyBundle.from_pretrained(path)
    except PolicyIntegrityError:
        return False
    return stored.manifest.digest == bundle.sealed_manifest().digest


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
