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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guardrail.atomic import fsync_dir as _fsync_dir
from guardrail.atomic import write_synced as _write_synced
from guardrail.errors import PolicySignatureError
from guardrail.policy.bundle import SIGNATURE, PolicyBundle

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

    A path is loaded (and integrity-checked) first. Raises :class:`PolicySignatureError`
    when the bundle is unsigned, signed by a key the store does not hold, signed over
    a different manifest, or the signature does not verify.
    """
    if not isinstance(bundle, PolicyBundle):
        bundle = PolicyBundle.from_pretrained(bundle)
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
    """
    bundle = PolicyBundle.from_pretrained(directory)
    if trust_store is not None:
        verify_bundle(bundle, trust_store)
    if adapter is not None:
        bundle.check_compatible(adapter)
    return bundle
