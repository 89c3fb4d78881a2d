"""A remote policy registry over HTTP(S), served through a local cache.

:class:`PolicyRegistry` serves a local directory; :class:`RemoteRegistry` serves an
HTTP(S) registry through a local cache (itself a :class:`PolicyRegistry`). Its layout::

    GET {base}/index.json                          {"<name>": ["<version>", ...], ...}
    GET {base}/<name>/<version>/manifest.json
    GET {base}/<name>/<version>/tensors.safetensors
    GET {base}/<name>/<version>/signature.json     optional (404 = unsigned)

Any static file server over a local registry directory plus an ``index.json``
(:func:`write_index` writes it) is a remote registry.

Credentials (``headers=``) go only to the registry's own origin
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
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tenacity import (
    RetryCallState,
)
from tenacity.stop import stop_base

from guardrail.atomic import fsync_dir as _fsync_dir
from guardrail.atomic import write_synced as _write_synced
from guardrail.errors import (
    InsecureRegistryError,
    PolicyIntegrityError,
    PolicyNotFoundError,
    RegistryError,
    RegistryUnavailableError,
)
from guardrail.http import HTTPStatusError, retrying, transient
from guardrail.logs import get_logger
from guardrail.policy.bundle import MANIFEST, SIGNATURE, TENSORS, PolicyBundle
from guardrail.policy.history import DowngradeHook, PolicyDowngrade
from guardrail.policy.registry import INDEX, PolicyRegistry, _load_checked
from guardrail.policy.versions import (
    _NAME,
    _VERSION_DIR,
    PolicyRef,
    ResolvedPolicy,
    _not_found,
    _parse_version,
    _sorted_versions,
)

if TYPE_CHECKING:
    from guardrail.adapters import ModelAdapter
    from guardrail.policy.signing import TrustStore


__all__ = [
    "RemoteRegistry",
]
log = get_logger(component="registry")


class _DeadlineExceeded(Exception):
    """The overall deadline of a registry call passed (never retried)."""


def _attempts(n: int) -> str:
    return f"{n} attempt" if n == 1 else f"{n} attempts"


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
        backoff: the first wait of the exponential backoff (s).
        max_backoff: the cap of the exponential backoff (s).
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
                raise HTTPStatusError(url, exc.code, str(exc.reason)) from None
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

        try:
            return retrying(
                attempts=self.retries + 1,
                backoff=self.backoff,
                max_backoff=self.max_backoff,
                stop=_stop_at(deadline),
                before_sleep=before_sleep,
            )(once)
        except _DeadlineExceeded:
            raise RegistryUnavailableError(
                f"GET {url}: no complete answer within the deadline of {self.deadline_s:g} s "
                f"for this registry call ({_attempts(attempts)}); the registry or the network is "
                "too slow or stalled. Retry later, or raise the limit with "
                "RemoteRegistry(..., deadline_s=...)"
            ) from None
        except HTTPStatusError as exc:
            if exc.code == 404:
                if missing_ok:
                    return None
                raise PolicyNotFoundError(f"GET {url}: not found (HTTP 404)") from None
            if transient(exc):
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
