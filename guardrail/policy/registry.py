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

Ranges pick the highest matching version and skip pre-releases unless the
constraint itself names one (``>=2.0.0rc1``). Versions compare by PEP 440
(:mod:`packaging.version`), so ``1.10.0`` > ``1.9.0`` and ``1.0.0-rc.1`` < ``1.0.0``.

:class:`PolicyRegistry` serves a local directory; :class:`RemoteRegistry` serves an
HTTP(S) registry through a local cache (itself a :class:`PolicyRegistry`). Its layout::

    GET {base}/index.json                          {"<name>": ["<version>", ...], ...}
    GET {base}/<name>/<version>/manifest.json
    GET {base}/<name>/<version>/tensors.safetensors
    GET {base}/<name>/<version>/signature.json     optional (404 = unsigned)

Any static file server over a local registry directory plus an ``index.json``
(:func:`write_index` writes it) is a remote registry.
"""

from __future__ import annotations

import builtins
import errno
import http.client
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

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
    "BundleSource",
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
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# A version as a path component: what Manifest accepts, and never '..' or '/'.
_VERSION_DIR = re.compile(r"^\d+\.\d+\.\d+(?:[-+.][0-9A-Za-z.+-]+)?$")
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
    """A remote registry could not be reached (after retries)."""


# ----------------------------------------------------------------------------- references


def _parse_version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


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
        """Whether ``version`` satisfies the constraint (``latest``: any final release)."""
        v = version if isinstance(version, Version) else _parse_version(version)
        if v is None:
            return False
        if self.kind == "latest":
            return not v.is_prerelease
        if self.kind == "exact":
            return v == Version(self.constraint)
        assert self.specifier is not None
        return self.specifier.contains(v, prereleases=bool(self.specifier.prereleases))

    def select(self, versions: Iterable[str]) -> str | None:
        """The highest of ``versions`` that matches, or None."""
        best: tuple[Version, str] | None = None
        for text in versions:
            v = _parse_version(text)
            if v is not None and self.matches(v) and (best is None or v > best[0]):
                best = (v, text)
        return None if best is None else best[1]

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
    parsed = [(v, _parse_version(v)) for v in versions]
    return [
        text for text, v in sorted(((t, v) for t, v in parsed if v is not None), key=lambda x: x[1])
    ]


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
    """Load a registry bundle: integrity, identity (name and version), signature, model fit."""
    bundle = PolicyBundle.from_pretrained(path)
    if bundle.name != name or Version(bundle.version) != Version(version):
        raise PolicyIntegrityError(
            f"{path}: the bundle's manifest says {bundle.ref} but it is stored as {name}@{version}; "
            "registry directories must be <name>/<version> of their manifest. Re-publish it with "
            "PolicyRegistry.publish()"
        )
    if trust_store is not None:
        from guardrail.policy.signing import verify_bundle

        verify_bundle(bundle, trust_store)
    if adapter is not None:
        bundle.check_compatible(adapter)
    return bundle


# ----------------------------------------------------------------------------- local


class PolicyRegistry:
    """A directory of bundles, ``<root>/<name>/<version>/``, resolved by reference."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

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
        """The version ``ref`` selects and its directory; :class:`PolicyNotFoundError` if none."""
        parsed = PolicyRef.parse(ref)
        versions = self.versions(parsed.name)
        version = parsed.select(versions)
        if version is None:
            where = f"registry {str(self.root)!r}"
            if not self.root.is_dir():
                where += " (the directory does not exist)"
            raise _not_found(parsed, versions, where)
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
        the fit to ``adapter``'s model when given.
        """
        resolved = self.resolve(ref)
        return _load_checked(
            resolved.path, resolved.name, resolved.version, adapter=adapter, trust_store=trust_store
        )

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
            same = [v for v in self.versions(bundle.name) if Version(v) == Version(bundle.version)]
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


def _attempts(n: int) -> str:
    return f"{n} attempt" if n == 1 else f"{n} attempts"


def _transient(exc: BaseException) -> bool:
    """Retry connection problems, timeouts, 5xx and 429; never 404 or other 4xx."""
    if isinstance(exc, _HTTPStatus):
        return exc.code >= 500 or exc.code == 429
    return isinstance(exc, (OSError, http.client.HTTPException))


class RemoteRegistry:
    """An HTTP(S) registry (layout in the module docstring) behind a local cache.

    Args:
        base_url: ``http://`` or ``https://`` URL of the registry root.
        cache_dir: where fetched bundles are kept, as a normal local registry
            (``<cache_dir>/<name>/<version>/``). A version is downloaded once, verified,
            then moved into place atomically; afterwards it is served from the cache.
        retries: retries after the first attempt, on connection errors, timeouts, HTTP
            5xx and 429 (never on 404 or other 4xx); exponential backoff between them.
        timeout: seconds per HTTP request.
        backoff, max_backoff: the first wait and the cap of the exponential backoff (s).
        max_bytes: the largest file accepted.
        headers: extra request headers (e.g. ``{"Authorization": "Bearer ..."}``).
        offline_fallback: when the index cannot be fetched, resolve ranges against the
            cached versions (logged as a warning) instead of failing.
    """

    def __init__(
        self,
        base_url: str,
        cache_dir: str | os.PathLike[str],
        *,
        retries: int = 3,
        timeout: float = 10.0,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        max_bytes: int = 256 * 2**20,
        headers: Mapping[str, str] | None = None,
        offline_fallback: bool = True,
    ):
        scheme = urllib.parse.urlsplit(base_url).scheme
        if scheme not in ("http", "https"):
            raise RegistryError(
                f"remote registry URL {base_url!r} must start with http:// or https://"
            )
        if retries < 0 or timeout <= 0:
            raise RegistryError(f"retries must be >= 0 and timeout > 0 (got {retries}, {timeout})")
        self.base_url = base_url.rstrip("/")
        self.cache = PolicyRegistry(cache_dir)
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_bytes = max_bytes
        self.headers = dict(headers or {})
        self.offline_fallback = offline_fallback

    def __repr__(self) -> str:
        return f"RemoteRegistry({self.base_url!r}, cache={str(self.cache.root)!r})"

    # ------------------------------------------------------------------ HTTP

    def _url(self, *parts: str) -> str:
        return "/".join([self.base_url, *(urllib.parse.quote(p) for p in parts)])

    def _get(self, url: str, *, missing_ok: bool = False) -> bytes | None:
        """GET ``url`` with retries; None for a 404 when ``missing_ok``."""
        from guardrail._version import __version__

        headers = {"User-Agent": f"mars-guardrail/{__version__}", **self.headers}
        attempts = 0

        def once() -> bytes:
            nonlocal attempts
            attempts += 1
            request = urllib.request.Request(url, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    data: bytes = response.read(self.max_bytes + 1)
            except urllib.error.HTTPError as exc:
                exc.close()
                raise _HTTPStatus(url, exc.code, str(exc.reason)) from None
            if len(data) > self.max_bytes:
                raise RegistryError(f"GET {url}: larger than max_bytes={self.max_bytes}")
            return data

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("registry.retry", url=url, attempt=state.attempt_number, error=str(exc))

        retrying = Retrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=wait_exponential(multiplier=self.backoff, max=self.max_backoff),
            retry=retry_if_exception(_transient),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(once)
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

    # ------------------------------------------------------------------ listing

    def index(self) -> dict[str, builtins.list[str]]:
        """``GET {base}/index.json``: every name with its versions, oldest first.

        Entries with an invalid name or version are skipped (and logged).
        """
        url = self._url(INDEX)
        data = self._get(url)
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

        An exact version already in the cache is resolved without network access.
        """
        parsed = PolicyRef.parse(ref)
        if parsed.kind == "exact":
            cached = parsed.select(self.cache.versions(parsed.name))
            if cached is not None:
                return ResolvedPolicy(parsed.name, cached, self.cache.root / parsed.name / cached)
        try:
            versions = self.index().get(parsed.name, [])
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
        if version is None:
            raise _not_found(parsed, versions, f"remote registry {self.base_url!r}")
        return ResolvedPolicy(parsed.name, version, self.cache.root / parsed.name / version)

    def fetch(self, ref: str | PolicyRef, *, trust_store: TrustStore | None = None) -> Path:
        """Make sure the version ``ref`` selects is in the cache; return its directory.

        A download is written to a temporary directory, verified like any bundle
        (hashes, values, manifest name and version; the signature with ``trust_store``)
        and only then moved into the cache. A failed check raises
        :class:`PolicyIntegrityError` (or :class:`PolicySignatureError`) and leaves the
        cache as it was.
        """
        resolved = self.resolve(ref)
        if resolved.path.is_dir():
            return resolved.path
        name, version = resolved.name, resolved.version
        parent = resolved.path.parent
        created = [d for d in (parent, self.cache.root) if not d.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=parent))
        try:
            manifest = self._get(self._url(name, version, MANIFEST))
            tensors = self._get(self._url(name, version, TENSORS))
            signature = self._get(self._url(name, version, SIGNATURE), missing_ok=True)
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
        :meth:`PolicyRegistry.load`."""
        path = self.fetch(ref, trust_store=trust_store)
        return _load_checked(
            path, path.parent.name, path.name, adapter=adapter, trust_store=trust_store
        )
