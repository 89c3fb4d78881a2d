"""Ed25519 signatures over policy bundles, and the trust store that checks them.

The manifest pins the hash of ``tensors.safetensors`` (``files``) and its own
content (``digest``), so a signature over the manifest's canonical bytes
(:meth:`~guardrail.policy.Manifest.canonical_bytes`, i.e. the exact bytes
``save_pretrained`` writes to ``manifest.json``) covers the whole bundle.

A signature lives beside the manifest as ``signature.json``::

    {
      "key_id": "release-2025",            # names the public key in the trust store
      "algorithm": "ed25519",
      "signature": "<base64 of the 64-byte Ed25519 signature>",
      "manifest_digest": "sha256:..."      # the signed manifest's digest field
    }

Typical use::

    private_pem, public_pem = generate_keypair()
    sign_bundle("policies/organism/1.1.0", private_pem, "release-2025")

    trust = TrustStore.from_dir("trusted-keys/")      # release-2025.pub, ...
    bundle = load_verified("policies/organism/1.1.0", trust)   # refuses unsigned bundles

Command line: ``guardrail policy keygen``, ``guardrail policy sign`` and
``guardrail policy verify --trust-store DIR`` (exit code 3 on a signature failure).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guardrail.atomic import fsync_dir as _fsync_dir
from guardrail.atomic import write_synced as _write_synced
from guardrail.errors import BundleNotFoundError, PolicyIntegrityError, PolicySignatureError
from guardrail.policy.bundle import MANIFEST, SIGNATURE, TENSORS, PolicyBundle

if TYPE_CHECKING:
    from guardrail.adapters import ModelAdapter

__all__ = [
    "ALGORITHM",
    "SIGNATURE",
    "Signature",
    "TrustStore",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "load_verified",
    "sign_bundle",
    "verify_bundle",
]

ALGORITHM = "ed25519"
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_BUNDLE_FILES = (MANIFEST, TENSORS, SIGNATURE)
_T = TypeVar("_T")

PrivateKeyLike = Ed25519PrivateKey | bytes | str | os.PathLike[str]
PublicKeyLike = Ed25519PublicKey | bytes | str | os.PathLike[str]


class Signature(BaseModel):
    """``signature.json``: who signed which manifest, and the signature itself."""

    model_config = ConfigDict(extra="forbid")

    key_id: str = Field(description="id of the signing key; the trust store's name for it")
    algorithm: Literal["ed25519"] = "ed25519"
    signature: str = Field(description="base64 of the Ed25519 signature over the manifest bytes")
    manifest_digest: str = Field(description="the signed manifest's `digest` field")

    def canonical_bytes(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def check_key_id(key_id: str) -> str:
    """Return ``key_id`` if it is usable as a key name (and file name), else raise."""
    if not isinstance(key_id, str) or not _KEY_ID.match(key_id):
        raise PolicySignatureError(
            f"key id {key_id!r} is not valid; use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. 'release-2025')"
        )
    return key_id


# ----------------------------------------------------------------------------- keys


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as ``(private_pem, public_pem)`` (PKCS#8 / SubjectPublicKeyInfo).

    The private key is not encrypted: store it in a secret manager or a file only
    its owner can read.
    """
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def _pem_bytes(value: bytes | str | os.PathLike[str], what: str) -> tuple[bytes, str]:
    """PEM bytes from PEM bytes/text or a file path; also a description for messages."""
    if isinstance(value, bytes):
        return value, f"the given {what}"
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode(), f"the given {what}"
    path = Path(value)
    try:
        return path.read_bytes(), str(path)
    except OSError as exc:
        raise PolicySignatureError(f"cannot read {what} file {str(path)!r}: {exc}") from exc


def load_private_key(key: PrivateKeyLike, password: bytes | None = None) -> Ed25519PrivateKey:
    """An Ed25519 private key from a key object, PEM bytes/text or a PEM file path."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    data, where = _pem_bytes(key, "private key")
    try:
        loaded = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        raise PolicySignatureError(
            f"{where} is not a readable PEM private key ({exc}); create one with "
            "`guardrail policy keygen`"
        ) from exc
    if not isinstance(loaded, Ed25519PrivateKey):
        raise PolicySignatureError(
            f"{where} is a {type(loaded).__name__}, not an Ed25519 key; create one with "
            "`guardrail policy keygen`"
        )
    return loaded


def load_public_key(key: PublicKeyLike) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, PEM bytes/text or a PEM file path."""
    if isinstance(key, Ed25519PublicKey):
        return key
    data, where = _pem_bytes(key, "public key")
    try:
        loaded = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise PolicySignatureError(f"{where} is not a readable PEM public key ({exc})") from exc
    if not isinstance(loaded, Ed25519PublicKey):
        raise PolicySignatureError(f"{where} is a {type(loaded).__name__}, not an Ed25519 key")
    return loaded


class TrustStore:
    """The public keys a deployment trusts to sign policy bundles, by key id.

    ``TrustStore.from_dir(path)`` reads every ``<key_id>.pub`` PEM file in ``path``;
    :meth:`add` adds keys from code.
    """

    def __init__(self, keys: Mapping[str, PublicKeyLike] | None = None):
        self._keys: dict[str, Ed25519PublicKey] = {}
        for key_id, key in (keys or {}).items():
            self.add(key_id, key)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> TrustStore:
        """Load every ``*.pub`` file of ``path``; the file's stem is the key id."""
        directory = Path(path)
        if not directory.is_dir():
            raise PolicySignatureError(
                f"trust store {str(directory)!r} is not a directory; pass a directory of "
                "<key_id>.pub PEM files"
            )
        store = cls()
        for file in sorted(directory.glob("*.pub")):
            store.add(file.stem, file)
        if not store._keys:
            raise PolicySignatureError(
                f"trust store {str(directory)!r} holds no <key_id>.pub files, so no bundle could "
                "verify; copy the signers' public keys there (`guardrail policy keygen` writes one)"
            )
        return store

    def add(self, key_id: str, public_key: PublicKeyLike) -> None:
        """Trust ``public_key`` (key object, PEM bytes/text or PEM file) under ``key_id``."""
        self._keys[check_key_id(key_id)] = load_public_key(public_key)

    def get(self, key_id: str) -> Ed25519PublicKey | None:
        return self._keys.get(key_id)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self.key_ids)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"TrustStore({self.key_ids})"


# ----------------------------------------------------------------------------- sign / verify


def sign_bundle(
    directory: str | os.PathLike[str],
    private_key: PrivateKeyLike,
    key_id: str,
    *,
    password: bytes | None = None,
) -> Signature:
    """Sign the saved bundle in ``directory``; write ``signature.json`` atomically beside it.

    The bundle is verified first (a corrupt bundle is never signed). An existing
    signature is replaced. ``private_key`` is a key object, PEM bytes/text or a PEM file path.
    """
    check_key_id(key_id)
    key = load_private_key(private_key, password)
    bundle = PolicyBundle.from_pretrained(directory)
    manifest = bundle.manifest
    signature = Signature(
        key_id=key_id,
        signature=base64.b64encode(key.sign(manifest.canonical_bytes())).decode("ascii"),
        manifest_digest=str(manifest.digest),
    )
    path = Path(directory)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{SIGNATURE}.tmp-", dir=path)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write_synced(tmp, signature.canonical_bytes())
        os.replace(tmp, path / SIGNATURE)
        _fsync_dir(path)
    finally:
        tmp.unlink(missing_ok=True)
    return signature


def read_signature(bundle: PolicyBundle) -> Signature | None:
    """The bundle's parsed ``signature.json``, or None when it is unsigned."""
    raw = bundle.extra_files.get(SIGNATURE)
    if raw is None:
        return None
    try:
        return Signature.model_validate_json(raw)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise PolicySignatureError(
            f"policy {bundle.ref}: {SIGNATURE} is malformed ({details}); re-sign the bundle with "
            "`guardrail policy sign`"
        ) from None


def verify_bundle(bundle: PolicyBundle | str | os.PathLike[str], trust_store: TrustStore) -> str:
    """Check the bundle's signature against ``trust_store`` and return the signing key id.

    A path is loaded (and integrity-checked) first, consistently as in
    :func:`load_verified`. Raises :class:`PolicySignatureError`
    when the bundle is unsigned, signed by a key the store does not hold, signed over
    a different manifest, or the signature does not verify.
    """
    if not isinstance(bundle, PolicyBundle):
        _, key_id = _read_consistent(Path(bundle), trust_store)
        assert key_id is not None  # verified under trust_store
        return key_id
    return _verify(bundle, trust_store)


def _verify(bundle: PolicyBundle, trust_store: TrustStore) -> str:
    where = f"policy {bundle.ref}"
    signature = read_signature(bundle)
    if signature is None:
        raise PolicySignatureError(
            f"{where} is unsigned but a trust store is configured; sign it with "
            "`guardrail policy sign DIR --key KEY.pem --key-id ID` using a trusted key"
        )
    public_key = trust_store.get(signature.key_id)
    if public_key is None:
        raise PolicySignatureError(
            f"{where} is signed by key {signature.key_id!r}, which is not in the trust store "
            f"(trusted: {trust_store.key_ids}); add {signature.key_id}.pub to the trust store "
            "if you trust that signer"
        )
    manifest = bundle.manifest
    if manifest.digest is None or signature.manifest_digest != manifest.digest:
        raise PolicySignatureError(
            f"{where}: the signature is over a different manifest (signed "
            f"{signature.manifest_digest[:19]}..., bundle is {str(manifest.digest)[:19]}...); "
            "the bundle changed after signing. Re-sign it or restore the signed version"
        )
    try:
        raw = base64.b64decode(signature.signature, validate=True)
    except (binascii.Error, ValueError):
        raise PolicySignatureError(f"{where}: the signature is not valid base64") from None
    try:
        public_key.verify(raw, manifest.canonical_bytes())
    except InvalidSignature:
        raise PolicySignatureError(
            f"{where}: the signature does not verify with key {signature.key_id!r}; the bundle or "
            "its signature was tampered with, or it was signed with another key of that id"
        ) from None
    return signature.key_id


def load_verified(
    directory: str | os.PathLike[str],
    trust_store: TrustStore | None,
    adapter: ModelAdapter | None = None,
) -> PolicyBundle:
    """Load a bundle: integrity, then (with a trust store) its signature, then model fit.

    With ``trust_store=None`` this is :meth:`PolicyBundle.from_pretrained`; with one,
    unsigned or wrongly signed bundles raise :class:`PolicySignatureError`.

    A bundle replaced while it is read (``save_pretrained``, ``publish(overwrite=True)``
    or any other rename of new files into place) can be seen half old, half new, or
    briefly not at all. A failed read is therefore repeated, whole, while the files
    keep changing (for up to 2 s); an error is raised once a read failed on files that
    stayed unchanged from before that read until 50 ms after it, i.e. a fault in the
    files themselves. ``verify_bundle`` on a path reads the same way.
    """
    bundle, _ = _read_consistent(Path(directory), trust_store)
    if adapter is not None:
        bundle.check_compatible(adapter)
    return bundle


# A read that fails is repeated as long as the files it read keep changing (a
# replacement in progress), for at most _RETRY_BUDGET_S; it fails for good once the files
# stayed unchanged from before the failed read until _SETTLE_S after it.
_RETRY_BUDGET_S = 2.0
_SETTLE_S = 0.05
_POLL_S = 0.002


def _stat_key(path: Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _snapshot(directory: Path) -> tuple[tuple[int, ...] | None, ...]:
    """Identity of the bundle directory and its files: changes when any is replaced."""
    return tuple(_stat_key(p) for p in (directory, *(directory / f for f in _BUNDLE_FILES)))


def _changes_within(snapshot: Callable[[], object], before: object) -> bool:
    """Whether ``snapshot()`` differs from ``before`` now or within the next ``_SETTLE_S``."""
    end = time.monotonic() + _SETTLE_S
    while True:
        if snapshot() != before:
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(_POLL_S)


def _retry_while_changing(
    read: Callable[[], _T],
    snapshot: Callable[[], object],
    errors: tuple[type[Exception], ...],
) -> _T:
    """``read()``, repeated while it raises one of ``errors`` and ``snapshot()`` (the
    identity of the files it reads) shows them changing; see ``_RETRY_BUDGET_S``."""
    give_up = time.monotonic() + _RETRY_BUDGET_S
    while True:
        before = snapshot()
        try:
            return read()
        except errors:
            if time.monotonic() >= give_up or not _changes_within(snapshot, before):
                raise


def _read_consistent(
    directory: Path, trust_store: TrustStore | None
) -> tuple[PolicyBundle, str | None]:
    """Load ``directory`` (and verify it under ``trust_store``) from one consistent read.

    Returns the bundle and the signing key id (None without a trust store).
    """

    def read() -> tuple[PolicyBundle, str | None]:
        bundle = PolicyBundle.from_pretrained(directory)
        return bundle, (_verify(bundle, trust_store) if trust_store is not None else None)

    # BundleNotFoundError: the directory is being swapped (save_pretrained renames it).
    return _retry_while_changing(
        read, lambda: _snapshot(directory), (PolicyIntegrityError, BundleNotFoundError)
    )
