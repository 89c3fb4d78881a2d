"""Security review of the policy registry (issue 25): credentials stay with the origin,
an overall deadline per call, no unauthenticated plain http, downgrade protection,
semver pre-releases, and bundles replaced while they are loaded.

Every server here listens on 127.0.0.1 and every loop is bounded.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import shutil
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from guardrail.errors import (
    InsecureRegistryError,
    PolicyDowngradeError,
    PolicyError,
    PolicyIntegrityError,
    RegistryError,
    RegistryUnavailableError,
)
from guardrail.policy import PolicyBundle
from guardrail.policy.history import VERSIONS_SEEN, PolicyDowngrade
from guardrail.policy.registry import PolicyRegistry, write_index
from guardrail.policy.remote import RemoteRegistry, _RedirectHandler
from guardrail.policy.signing import TrustStore, generate_keypair, load_verified, sign_bundle
from guardrail.policy.versions import PolicyRef, _sorted_versions

from .conftest import random_policy

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return generate_keypair()


@pytest.fixture()
def trust(keys) -> TrustStore:
    return TrustStore({"release": keys[1]})


@pytest.fixture()
def registry(tmp_path, tiny_llama) -> PolicyRegistry:
    reg = PolicyRegistry(tmp_path / "registry")
    for seed, version in enumerate(["1.0.0", "1.1.0", "1.10.0"]):
        reg.publish(random_policy(*tiny_llama, name="test", version=version, seed=seed))
    return reg


class _Server(http.server.ThreadingHTTPServer):
    """Serves ``root`` (when given), records each request's path and credential headers,
    and answers with a redirect when ``redirect`` maps the path to a URL."""

    def __init__(
        self,
        root: Path | None,
        redirect: Callable[[str], str | None] | None = None,
        handler: type[http.server.BaseHTTPRequestHandler] | None = None,
    ):
        self.root, self.redirect = root, redirect
        self.seen: list[tuple[str, str | None, str | None]] = []
        super().__init__(("127.0.0.1", 0), handler or _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: _Server

    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=str(args[2].root or "."), **kwargs)

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def do_GET(self):  # noqa: N802 - http.server API
        headers = self.headers
        self.server.seen.append((self.path, headers.get("Authorization"), headers.get("X-Api-Key")))
        target = self.server.redirect(self.path) if self.server.redirect else None
        if target is not None:
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.server.root is None:
            self.send_error(404)
            return
        super().do_GET()


@contextlib.contextmanager
def running(server: http.server.HTTPServer) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _remote(url: str, cache: Path, **kwargs) -> RemoteRegistry:
    kwargs.setdefault("allow_insecure", True)
    return RemoteRegistry(url, cache, backoff=0.001, max_backoff=0.01, timeout=5, **kwargs)


# ----------------------------------------------------------------------------- 1. credentials


CREDENTIALS = {"Authorization": "Bearer s3cret", "X-Api-Key": "k3y"}


def test_credentials_are_not_forwarded_to_another_origin(registry, tmp_path):
    write_index(registry.root)
    target = _Server(registry.root)
    origin = _Server(None, redirect=lambda path: target.url + path)
    with running(target), running(origin):
        remote = _remote(origin.url, tmp_path / "cache", headers=CREDENTIALS)
        assert remote.load("test@1.1.0").ref == "test@1.1.0"
    assert origin.seen and all(
        auth == "Bearer s3cret" and key == "k3y" for _, auth, key in origin.seen
    )
    # the other port got every file, and never the credentials
    assert {path for path, _, _ in target.seen} >= {"/index.json", "/test/1.1.0/manifest.json"}
    assert all(auth is None and key is None for _, auth, key in target.seen)


def test_credentials_follow_a_redirect_within_the_origin(registry, tmp_path):
    write_index(registry.root)
    server = _Server(
        registry.root,
        redirect=lambda path: path.removeprefix("/old") if path.startswith("/old/") else None,
    )
    with running(server):
        remote = _remote(server.url + "/old", tmp_path / "cache", headers=CREDENTIALS)
        assert remote.load("test@1.0.0").ref == "test@1.0.0"
    moved = [entry for entry in server.seen if not entry[0].startswith("/old/")]
    assert moved and all(auth == "Bearer s3cret" for _, auth, _ in moved)


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        ("https://127.0.0.1:8443/index.json", "http://127.0.0.1:8080/index.json", "plain http"),
        ("http://127.0.0.1:8080/index.json", "ftp://127.0.0.1/index.json", "not http"),
    ],
)
def test_redirects_that_lower_the_transport_are_refused(source, target, message):
    handler = _RedirectHandler("https://127.0.0.1:8443", CREDENTIALS, allow_insecure=False)
    request = urllib.request.Request(source, headers=CREDENTIALS)
    with pytest.raises(RegistryError, match=message):
        handler.redirect_request(request, io.BytesIO(), 302, "Found", {}, target)


# ----------------------------------------------------------------------------- 2. deadline


class _DripHandler(http.server.BaseHTTPRequestHandler):
    """Answers one byte every 50 ms (for at most 10 s): in the status line, or in the body."""

    phase = "headers"

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self):  # noqa: N802
        head = b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n"
        end = time.monotonic() + 10
        try:
            if self.phase == "body":
                self.wfile.write(head)
                self.wfile.flush()
                head = b"{" + b" " * 99_999
            for byte in head:
                if time.monotonic() > end or self.server.stopping.is_set():  # type: ignore[attr-defined]
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:  # the client gave up
            return


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_a_slow_drip_server_cannot_outlast_the_deadline(tmp_path, phase):
    handler = type("Drip", (_DripHandler,), {"phase": phase})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.stopping = threading.Event()  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{server.server_address[1]}"
    remote = RemoteRegistry(url, tmp_path / "cache", timeout=2, deadline_s=0.5, retries=3)
    with running(server):
        start = time.monotonic()
        try:
            with pytest.raises(RegistryUnavailableError, match=r"deadline of 0\.5 s.*deadline_s="):
                remote.index()
        finally:
            server.stopping.set()  # type: ignore[attr-defined]
        assert time.monotonic() - start < 3


class _Busy(_Handler):
    def do_GET(self):  # noqa: N802
        self.server.seen.append((self.path, None, None))
        self.send_error(503, "busy")


def test_the_deadline_also_bounds_retries(tmp_path):
    server = _Server(None, handler=_Busy)
    remote = RemoteRegistry(
        server.url, tmp_path / "c", retries=50, backoff=0.2, max_backoff=0.2, deadline_s=0.6
    )
    with running(server):
        start = time.monotonic()
        with pytest.raises(RegistryUnavailableError, match="HTTP 503"):
            remote.index()
        assert time.monotonic() - start < 2
    assert 2 <= len(server.seen) < 10  # retried, but not 51 times


def test_deadline_must_be_positive(tmp_path):
    with pytest.raises(RegistryError, match="deadline_s must be > 0"):
        RemoteRegistry("https://127.0.0.1:1", tmp_path, deadline_s=0)


# ----------------------------------------------------------------------------- 3. plain http


def test_plain_http_needs_a_trust_store_or_the_opt_in(registry, tmp_path, keys, trust):
    sign_bundle(registry.root / "test" / "1.1.0", keys[0], "release")
    write_index(registry.root)
    server = _Server(registry.root)
    with running(server):
        strict = RemoteRegistry(server.url, tmp_path / "strict", backoff=0.001)
        with pytest.raises(
            InsecureRegistryError, match=r"plain http.*https://.*trust_store=.*allow_insecure=True"
        ):
            strict.load("test@1.1.0")
        assert not (tmp_path / "strict").exists()  # nothing fetched
        assert strict.resolve("test").version == "1.10.0"  # listing needs no bundle trust
        assert strict.load("test@1.1.0", trust_store=trust).ref == "test@1.1.0"
        relaxed = _remote(server.url, tmp_path / "relaxed", allow_insecure=True)
        assert relaxed.load("test@1.0.0").ref == "test@1.0.0"


# ----------------------------------------------------------------------------- 4. downgrades


def test_local_downgrade_is_refused_after_a_restart(registry, tmp_path):
    state = tmp_path / "state"
    assert PolicyRegistry(registry.root, state_dir=state).load("test").version == "1.10.0"
    assert json.loads((state / VERSIONS_SEEN).read_text())["served"] == {"test": ["1.10.0"]}
    shutil.rmtree(registry.root / "test" / "1.10.0")  # the newest release disappears

    seen: list[PolicyDowngrade] = []
    restarted = PolicyRegistry(registry.root, state_dir=state, on_downgrade=seen.append)
    for ref in ("test", "test@latest", "test@^1", "test@>=1.0"):
        with pytest.raises(
            PolicyDowngradeError,
            match=r"resolves to test@1\.1\.0 .* test@1\.10\.0 was served before .*"
            r"pin the version explicitly \('test@1\.1\.0'\)",
        ):
            restarted.load(ref)
    # a range that never admitted 1.10.0 is no downgrade
    assert restarted.load("test@~1.1").version == "1.1.0"
    assert not seen

    with capture_logs() as logs:
        assert restarted.load("test@1.1.0").version == "1.1.0"  # an explicit rollback
    expected = PolicyDowngrade("test", "1.1.0", "1.10.0", "test@1.1.0", str(registry.root))
    assert seen == [expected] and list(restarted.downgrades) == [expected]
    [event] = [e for e in logs if e["event"] == "guardrail.policy.downgrade"]
    assert event["log_level"] == "warning" and event["highest_served"] == "1.10.0"


def test_local_history_without_state_dir_lasts_for_the_object(registry):
    assert registry.load("test@^1").version == "1.10.0"
    shutil.rmtree(registry.root / "test" / "1.10.0")
    with pytest.raises(PolicyDowngradeError):
        registry.resolve("test@^1")
    assert PolicyRegistry(registry.root).resolve("test@^1").version == "1.1.0"  # no record
    assert not list(registry.root.glob(".*"))  # nothing written into the registry


def test_remote_downgrade_is_refused(registry, tmp_path):
    cache = tmp_path / "cache"
    write_index(registry.root)
    server = _Server(registry.root)
    with running(server):
        assert _remote(server.url, cache).load("test").version == "1.10.0"
        assert (cache / VERSIONS_SEEN).is_file()
        shutil.rmtree(registry.root / "test" / "1.10.0")
        write_index(registry.root)  # the registry no longer lists 1.10.0
        seen: list[PolicyDowngrade] = []
        remote = _remote(server.url, cache, on_downgrade=seen.append)
        with pytest.raises(PolicyDowngradeError, match="test@1.10.0 was served before"):
            remote.load("test")
        with pytest.raises(PolicyDowngradeError):
            remote.fetch("test@^1")
        assert remote.load("test@1.1.0").version == "1.1.0"
        assert (
            [d.highest_served for d in seen]
            == ["1.10.0"]
            == [d.highest_served for d in remote.downgrades]
        )


def test_an_unreadable_history_fails_closed(registry, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / VERSIONS_SEEN).write_text("{not json")
    with pytest.raises(RegistryError, match=r"unreadable .* delete it to start a new record"):
        PolicyRegistry(registry.root, state_dir=state).load("test")


# ----------------------------------------------------------------------------- 5. semver


SEMVER_ORDER = [
    "1.0.0-1",
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0",
    "1.0.1-0",
    "1.0.1",
]


def test_versions_sort_by_semver_precedence():
    assert _sorted_versions(reversed(SEMVER_ORDER)) == SEMVER_ORDER


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("p", "1.0.1"),
        ("p@^1", "1.0.1"),
        ("p@~1.0", "1.0.1"),
        ("p@<1.0.1", "1.0.0"),
        ("p@1.0.0-1", "1.0.0-1"),  # pre-releases: only when named
        ("p@1.0.0-beta.11", "1.0.0-beta.11"),
        ("p@>=1.0.0-beta.2,<=1.0.0-rc.1", "1.0.0-rc.1"),
        ("p@>=1.0.0-beta.2,<1.0.0-rc.1", "1.0.0-beta.11"),
    ],
)
def test_pre_releases_only_when_named(ref, expected):
    versions = [*SEMVER_ORDER, "1.1.0-1", "1.2.0-rc.1", "2.0.0-0"]
    assert PolicyRef.parse(ref).select(versions) == expected


def test_numeric_pre_release_is_not_latest(tmp_path, tiny_llama):
    reg = PolicyRegistry(tmp_path / "registry")
    for version in ("1.0.0", "1.1.0-1", "1.0.1-rc.1"):
        reg.publish(random_policy(*tiny_llama, name="test", version=version))
    assert reg.versions("test") == ["1.0.0", "1.0.1-rc.1", "1.1.0-1"]
    assert reg.resolve("test").version == "1.0.0"
    assert reg.resolve("test@^1").version == "1.0.0"
    assert reg.load("test@1.1.0-1").version == "1.1.0-1"
    # a range naming a pre-release admits those of the same major.minor.patch only
    assert not PolicyRef.parse("p@>=1.0.1-rc.1").matches("1.1.0-1")


# ----------------------------------------------------------------------------- 6. replaced bundles


def _signed(tiny_llama, keys, directory: Path, version: str, tau: float) -> PolicyBundle:
    path = random_policy(*tiny_llama, name="live", version=version, tau=tau).save_pretrained(
        directory
    )
    sign_bundle(path, keys[0], "release")
    return PolicyBundle.from_pretrained(path)  # carries its signature along


def _replace_files(source: Path, target: Path) -> None:
    """Rename each of the source's files into ``target``, one at a time."""
    staged = []
    for file in sorted(source.iterdir()):
        fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=target)
        with os.fdopen(fd, "wb") as fh:
            fh.write(file.read_bytes())
        staged.append((tmp, target / file.name))
    for tmp, final in staged:
        os.replace(tmp, final)


@pytest.mark.parametrize("style", ["directory", "files", "publish"])
def test_a_bundle_replaced_while_loading_never_fails_spuriously(
    tmp_path, tiny_llama, keys, trust, style
):
    """Readers see the old or the new bundle whole: ``save_pretrained`` over it, files
    renamed into it one by one, or ``publish(overwrite=True)`` read through a registry."""
    second = "1.0.0" if style == "publish" else "2.0.0"
    a = _signed(tiny_llama, keys, tmp_path / "a", "1.0.0", tau=0.25)
    b = _signed(tiny_llama, keys, tmp_path / "b", second, tau=0.75)
    registry = PolicyRegistry(tmp_path / "registry")
    registry.publish(tmp_path / "a")
    live = tmp_path / "live"
    shutil.copytree(tmp_path / "a", live)
    stop, swaps, errors = threading.Event(), [0], []

    def replace() -> None:
        sources = [(a, tmp_path / "a"), (b, tmp_path / "b")]
        end = time.monotonic() + 20
        try:
            while not stop.is_set() and time.monotonic() < end:
                bundle, source = sources[swaps[0] % 2]
                if style == "directory":
                    bundle.save_pretrained(live)  # temp dir + renames
                elif style == "files":
                    _replace_files(source, live)
                else:
                    registry.publish(source, overwrite=True)
                swaps[0] += 1
        except Exception as exc:  # surfaced by the assertions below
            errors.append(exc)

    def load() -> PolicyBundle:
        if style == "publish":
            return registry.load("live", trust_store=trust)
        return load_verified(live, trust)

    thread = threading.Thread(target=replace, daemon=True)
    thread.start()
    loaded, failures = [], []
    try:
        end = time.monotonic() + 10
        while (len(loaded) + len(failures) < 200 or swaps[0] < 20) and time.monotonic() < end:
            try:
                bundle = load()
            except PolicyError as exc:  # integrity, signature, not found, "not a directory"
                failures.append(str(exc))
            else:
                loaded.append((bundle.version, bundle.parameters.tau))
    finally:
        stop.set()
        thread.join(timeout=30)
    assert errors == [] and failures == []
    assert set(loaded) <= {("1.0.0", 0.25), (second, 0.75)}
    assert swaps[0] >= 20  # the bundle really was replaced under the reader


def test_a_stable_tampered_bundle_still_fails_at_once(tmp_path, tiny_llama, keys, trust):
    _signed(tiny_llama, keys, tmp_path / "a", "1.0.0", tau=0.25)
    raw = json.loads((tmp_path / "a" / "signature.json").read_text())
    raw["manifest_digest"] = "sha256:" + "0" * 64
    (tmp_path / "a" / "signature.json").write_text(json.dumps(raw))
    start = time.monotonic()
    with pytest.raises(PolicyIntegrityError, match="different manifest"):
        load_verified(tmp_path / "a", trust)
    assert time.monotonic() - start < 1
