"""Policy registries: reference resolution, local publish/load, remote fetch with retries."""

from __future__ import annotations

import contextlib
import http.server
import shutil
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet

from guardrail.adapters import ModelAdapter
from guardrail.errors import (
    PolicyCompatibilityError,
    PolicyIntegrityError,
    PolicyNotFoundError,
    PolicyReferenceError,
    PolicySignatureError,
    RegistryError,
    RegistryUnavailableError,
)
from guardrail.policy import TENSORS, PolicyBundle
from guardrail.policy.registry import PolicyRegistry, write_index
from guardrail.policy.remote import RemoteRegistry
from guardrail.policy.signing import TrustStore, generate_keypair, sign_bundle
from guardrail.policy.versions import PolicyRef

from .conftest import random_policy, tiny

VERSIONS = [
    "0.3.1",
    "0.3.9",
    "0.4.0",
    "1.0.0",
    "1.2.0",
    "1.2.7",
    "1.9.0",
    "1.10.0",
    "2.0.0",
    "2.1.0-rc.1",
]


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("p", "2.0.0"),  # latest skips the pre-release
        ("p@latest", "2.0.0"),
        ("p@1.2.0", "1.2.0"),
        ("p@2.1.0-rc.1", "2.1.0-rc.1"),  # an exact pin may name a pre-release
        ("p@^1.2", "1.10.0"),  # numeric, not string, ordering
        ("p@^0.3", "0.3.9"),  # 0.x: the minor is breaking
        ("p@^0.4", "0.4.0"),
        ("p@~1.2", "1.2.7"),
        ("p@~1", "1.10.0"),
        ("p@>=1.1,<2", "1.10.0"),
        ("p@>=1.0, <1.9", "1.2.7"),
        ("p@!=2.0.0", "1.10.0"),
        ("p@>=2.1.0rc1", "2.1.0-rc.1"),  # a specifier naming a pre-release admits it
        ("p@==1.9.*", "1.9.0"),
        ("p@^3", None),
        ("p@~1.3", None),
    ],
)
def test_reference_selects_highest_match(ref, expected):
    assert PolicyRef.parse(ref).select(VERSIONS) == expected


@pytest.mark.parametrize(
    ("ref", "spec"),
    [
        ("p@^1.2", ">=1.2.0,<2.0.0"),
        ("p@^1.2.3", ">=1.2.3,<2.0.0"),
        ("p@^0.3", ">=0.3.0,<0.4.0"),
        ("p@^0.0.3", ">=0.0.3,<0.0.4"),
        ("p@^0", ">=0.0.0,<1.0.0"),
        ("p@~1.2", ">=1.2.0,<1.3.0"),
        ("p@~1.2.3", ">=1.2.3,<1.3.0"),
        ("p@~1", ">=1.0.0,<2.0.0"),
    ],
)
def test_caret_and_tilde_ranges(ref, spec):
    parsed = PolicyRef.parse(ref)
    assert parsed.kind == "range" and parsed.specifier == SpecifierSet(spec)
    assert not parsed.matches("2.0.0-rc.1") and not parsed.matches("1.3.0-rc.1")


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("Bad Name@1.0.0", "not a valid policy name"),
        ("p@", "empty version after '@'"),
        ("p@banana", "not a version constraint"),
        ("p@^x", "not a version constraint"),
        ("p@1.0.x", "not a version"),
    ],
)
def test_malformed_references_explain_the_fix(ref, message):
    with pytest.raises(PolicyReferenceError, match=message):
        PolicyRef.parse(ref)


# ----------------------------------------------------------------------------- local registry


@pytest.fixture()
def registry(tmp_path, tiny_llama):
    reg = PolicyRegistry(tmp_path / "registry")
    for seed, version in enumerate(["1.0.0", "1.1.0", "1.10.0", "2.0.0-rc.1"]):
        reg.publish(random_policy(*tiny_llama, name="test", version=version, seed=seed))
    reg.publish(random_policy(*tiny_llama, name="other", version="0.3.0"))
    return reg


def test_list_and_resolve(registry):
    (registry.root / "test" / ".1.2.0.tmp-abc").mkdir()  # debris of an interrupted save
    assert registry.list() == {
        "other": ["0.3.0"],
        "test": ["1.0.0", "1.1.0", "1.10.0", "2.0.0-rc.1"],
    }
    assert registry.resolve("test").version == "1.10.0"
    assert registry.resolve("test@~1.1").path == registry.root / "test" / "1.1.0"
    assert registry.load("test@^1").version == "1.10.0"
    assert registry.load("test@2.0.0-rc.1").version == "2.0.0-rc.1"
    assert registry.load("other@^0.3").ref == "other@0.3.0"


def test_loaded_bundle_equals_published(registry, tiny_llama):
    original = random_policy(*tiny_llama, name="test", version="1.1.0", seed=1)
    loaded = registry.load("test@1.1.0")
    for key, value in original.tensors.items():
        assert torch.equal(loaded.tensors[key], value)


def test_not_found_messages(registry):
    with pytest.raises(PolicyNotFoundError, match="no policy named 'ghost'"):
        registry.load("ghost")
    with pytest.raises(
        PolicyNotFoundError, match=r"matches '\^3'; available: 1.0.0, 1.1.0, 1.10.0"
    ):
        registry.load("test@^3")
    with pytest.raises(PolicyNotFoundError, match="pre-releases .*2.0.0-rc.1.* only when pinned"):
        registry.load("test@>=2")
    with pytest.raises(PolicyNotFoundError, match="does not exist"):
        PolicyRegistry(registry.root / "nowhere").load("test")


def test_publish_refuses_to_overwrite(registry, tiny_llama):
    newer = random_policy(*tiny_llama, name="test", version="1.1.0", seed=7, tau=0.9)
    with pytest.raises(RegistryError, match="already published.*immutable"):
        registry.publish(newer)
    assert registry.load("test@1.1.0").parameters.tau == 0.5  # untouched
    registry.publish(newer, overwrite=True)
    assert registry.load("test@1.1.0").parameters.tau == 0.9
    assert not list((registry.root / "test").glob(".*"))  # no lock or temp files left


def test_publish_refuses_while_another_publish_holds_the_lock(registry, tiny_llama):
    (registry.root / "test" / ".3.0.0.lock").touch()
    with pytest.raises(RegistryError, match="in progress"):
        registry.publish(random_policy(*tiny_llama, name="test", version="3.0.0"))
    assert "3.0.0" not in registry.versions("test")


def test_directory_must_match_manifest(registry):
    shutil.copytree(registry.root / "test" / "1.0.0", registry.root / "test" / "9.9.9")
    with pytest.raises(
        PolicyIntegrityError, match="manifest says test@1.0.0 but it is stored as test@9.9.9"
    ):
        registry.load("test@9.9.9")


def test_load_checks_model_fit(registry, tiny_llama):
    assert registry.load("test", adapter=ModelAdapter(*tiny_llama)).version == "1.10.0"
    other = ModelAdapter(*tiny("llama", seed=1))
    with pytest.raises(PolicyCompatibilityError, match="weights differ"):
        registry.load("test", adapter=other)


# ----------------------------------------------------------------------------- remote registry


class _Server(http.server.ThreadingHTTPServer):
    """Serves a directory; each path fails ``fail_first`` times with 503; optional corruption."""

    def __init__(self, handler, *, fail_first: int, corrupt: bool):
        super().__init__(("127.0.0.1", 0), handler)
        self.requests: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.fail_first, self.corrupt = fail_first, corrupt


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def do_GET(self):  # noqa: N802 - http.server API
        server = self.server
        server.requests[self.path] += 1
        if server.failures[self.path] < server.fail_first:
            server.failures[self.path] += 1
            self.send_error(503, "try again")
            return
        if server.corrupt and self.path.endswith(TENSORS):
            data = bytearray((Path(self.directory) / self.path.lstrip("/")).read_bytes())
            data[-1] ^= 0xFF
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(bytes(data))
            return
        super().do_GET()


@contextlib.contextmanager
def serve(root: Path, *, fail_first: int = 0, corrupt: bool = False):
    """A static HTTP server on 127.0.0.1 over ``root``; yields (base_url, request counter)."""
    write_index(root)

    def handler(*args, **kwargs):
        return _Handler(*args, directory=str(root), **kwargs)

    server = _Server(handler, fail_first=fail_first, corrupt=corrupt)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _remote(url, cache, **kwargs):
    # A plain-http test server on 127.0.0.1: bundles without a trust store need the opt-in.
    kwargs.setdefault("allow_insecure", True)
    return RemoteRegistry(url, cache, backoff=0.001, max_backoff=0.01, timeout=5, **kwargs)


def test_remote_fetch_retries_503_then_serves_from_cache(registry, tmp_path):
    cache = tmp_path / "cache"
    with serve(registry.root, fail_first=2) as (url, requests):
        remote = _remote(url, cache, retries=3)
        assert remote.list()["test"] == ["1.0.0", "1.1.0", "1.10.0", "2.0.0-rc.1"]
        bundle = remote.load("test@^1")
        assert bundle.ref == "test@1.10.0"
        # every file failed twice with 503 and was served on the third attempt
        assert requests["/index.json"] == 3 + 1  # two 503s, then served; once more for load()
        assert requests["/test/1.10.0/manifest.json"] == 3
        assert requests["/test/1.10.0/tensors.safetensors"] == 3
        assert requests["/test/1.10.0/signature.json"] == 3  # two 503s, then a 404: unsigned
        local = registry.load("test@1.10.0")
        for key, value in local.tensors.items():
            assert torch.equal(bundle.tensors[key], value)
        # cached as a normal bundle directory; an exact pin needs no network at all
        assert PolicyRegistry(cache).list() == {"test": ["1.10.0"]}
        before = sum(requests.values())
        assert remote.load("test@1.10.0").ref == "test@1.10.0"
        assert sum(requests.values()) == before


def test_remote_gives_up_after_retries(registry, tmp_path):
    cache = tmp_path / "cache"
    with serve(registry.root, fail_first=10) as (url, requests):
        with pytest.raises(RegistryUnavailableError, match="failed after 2 attempts: HTTP 503"):
            _remote(url, cache, retries=1, offline_fallback=False).load("test@^1")
        assert requests["/index.json"] == 2
    assert not cache.exists()


def test_remote_404_is_not_retried(registry, tmp_path):
    cache = tmp_path / "cache"
    with serve(registry.root) as (url, requests):
        (registry.root / "index.json").write_text('{"test": ["1.0.0", "3.0.0"]}')
        with pytest.raises(PolicyNotFoundError, match="HTTP 404"):
            _remote(url, cache, retries=3).load("test@3.0.0")
        assert requests["/test/3.0.0/manifest.json"] == 1
        with pytest.raises(PolicyNotFoundError, match="matches '~3.1'; available: 1.0.0, 3.0.0"):
            _remote(url, cache).load("test@~3.1")
    assert PolicyRegistry(cache).list() == {}


def test_remote_corrupted_download_is_rejected_and_not_cached(registry, tmp_path):
    cache = tmp_path / "cache"
    with serve(registry.root, corrupt=True) as (url, requests):
        remote = _remote(url, cache)
        with pytest.raises(
            PolicyIntegrityError, match="rejected: .*content hash .* does not match"
        ):
            remote.load("test@1.1.0")
        assert (
            requests["/test/1.1.0/tensors.safetensors"] == 1
        )  # integrity failures are not retried
    assert not cache.exists()  # nothing cached, not even an empty directory
    (cache / "test").mkdir(parents=True)
    with serve(registry.root, corrupt=True) as (url, _):
        with pytest.raises(PolicyIntegrityError):
            _remote(url, cache).load("test@1.1.0")
    assert [p.name for p in cache.rglob("*")] == ["test"]  # the existing cache is left as it was


def test_remote_offline_falls_back_to_cache(registry, tmp_path):
    cache = tmp_path / "cache"
    with serve(registry.root) as (url, _):
        _remote(url, cache).load("test@1.1.0")
    # the server is gone: ranges resolve against the cache when allowed
    assert _remote(url, cache, retries=0).load("test@^1").ref == "test@1.1.0"
    with pytest.raises(RegistryUnavailableError, match="failed after 1 attempt:"):
        _remote(url, cache, retries=0, offline_fallback=False).load("test@^1")
    with pytest.raises(RegistryUnavailableError):
        _remote(url, cache, retries=0).load("test@^2")  # not cached either


def test_remote_signatures(registry, tmp_path):
    private, public = generate_keypair()
    trust = TrustStore({"release": public})
    sign_bundle(registry.root / "test" / "1.1.0", private, "release")
    with serve(registry.root) as (url, _):
        signed = _remote(url, tmp_path / "a").load("test@1.1.0", trust_store=trust)
        assert signed.version == "1.1.0"
        cache = tmp_path / "b"
        with pytest.raises(PolicySignatureError, match="unsigned"):
            _remote(url, cache).load("test@1.0.0", trust_store=trust)
        assert not cache.exists()


def test_remote_url_must_be_http(tmp_path):
    with pytest.raises(RegistryError, match="must start with http:// or https://"):
        RemoteRegistry("file:///etc", tmp_path)


def test_publish_round_trip_through_directory(registry, tmp_path):
    """publish() accepts a bundle directory (e.g. fresh from `guardrail calibrate`)."""
    other = PolicyRegistry(tmp_path / "other")
    other.publish(registry.root / "test" / "1.0.0")
    assert other.list() == {"test": ["1.0.0"]}
    assert isinstance(other.load("test"), PolicyBundle)


def test_publishing_a_release_again_is_a_no_op_and_other_content_is_refused(tmp_path):
    model, tok = tiny("llama")
    registry = PolicyRegistry(tmp_path)
    bundle = random_policy(model, tok, layer=1, name="p", version="1.0.0")
    path = registry.publish(bundle)
    before = (path / "manifest.json").read_bytes()
    assert registry.publish(bundle) == path  # the same release again: nothing changes
    assert (path / "manifest.json").read_bytes() == before
    changed = bundle.with_parameters(tau=0.9)
    with pytest.raises(RegistryError, match="immutable"):
        registry.publish(changed)
    assert registry.load("p@1.0.0").parameters.tau == bundle.parameters.tau
