"""Ed25519 bundle signatures: sign, verify, trust stores, refusals and the CLI."""

from __future__ import annotations

import base64
import json
import stat

import pytest

from guardrail.cli import EXIT_ERROR, EXIT_INTEGRITY, EXIT_OK, main
from guardrail.errors import PolicyIntegrityError, PolicySignatureError
from guardrail.policy import MANIFEST, SIGNATURE, Manifest, PolicyBundle
from guardrail.policy.registry import PolicyRegistry
from guardrail.policy.signing import (
    TrustStore,
    generate_keypair,
    load_verified,
    sign_bundle,
    verify_bundle,
)

from .conftest import random_policy


@pytest.fixture(scope="module")
def keys():
    return {"release": generate_keypair(), "intruder": generate_keypair()}


@pytest.fixture()
def trust(keys):
    return TrustStore({"release": keys["release"][1]})


@pytest.fixture()
def bundle_dir(tmp_path, tiny_llama):
    return random_policy(*tiny_llama, name="signed", version="1.0.0").save_pretrained(
        tmp_path / "b"
    )


def test_sign_and_verify(bundle_dir, keys, trust):
    signature = sign_bundle(bundle_dir, keys["release"][0], "release")
    raw = json.loads((bundle_dir / SIGNATURE).read_text())
    manifest = PolicyBundle.from_pretrained(bundle_dir).manifest
    assert raw == signature.model_dump()
    assert raw["algorithm"] == "ed25519" and raw["key_id"] == "release"
    assert raw["manifest_digest"] == manifest.digest
    assert len(base64.b64decode(raw["signature"])) == 64
    assert verify_bundle(bundle_dir, trust) == "release"
    loaded = load_verified(bundle_dir, trust)
    assert loaded.ref == "signed@1.0.0"
    assert not [p for p in bundle_dir.iterdir() if p.name.startswith(".")]  # no temp files


def test_unsigned_bundle_refused_only_under_a_trust_store(bundle_dir, trust):
    assert load_verified(bundle_dir, None).ref == "signed@1.0.0"
    with pytest.raises(PolicySignatureError, match="unsigned but a trust store is configured"):
        load_verified(bundle_dir, trust)


def test_unknown_key_refused(bundle_dir, keys, trust):
    sign_bundle(bundle_dir, keys["intruder"][0], "intruder")
    with pytest.raises(
        PolicySignatureError, match="key 'intruder', which is not in the trust store"
    ):
        verify_bundle(bundle_dir, trust)


def test_wrong_key_under_a_trusted_id_refused(bundle_dir, keys, trust):
    sign_bundle(bundle_dir, keys["intruder"][0], "release")
    with pytest.raises(PolicySignatureError, match="does not verify with key 'release'"):
        verify_bundle(bundle_dir, trust)


def test_forged_signature_bytes_refused(bundle_dir, keys, trust):
    sign_bundle(bundle_dir, keys["release"][0], "release")
    raw = json.loads((bundle_dir / SIGNATURE).read_text())
    sig = bytearray(base64.b64decode(raw["signature"]))
    sig[0] ^= 1
    raw["signature"] = base64.b64encode(bytes(sig)).decode()
    (bundle_dir / SIGNATURE).write_text(json.dumps(raw))
    with pytest.raises(PolicySignatureError, match="does not verify"):
        load_verified(bundle_dir, trust)


def test_resealed_manifest_edit_refused(bundle_dir, keys, trust):
    """An attacker can recompute the (public) digest after editing; the signature catches it."""
    sign_bundle(bundle_dir, keys["release"][0], "release")
    raw = json.loads((bundle_dir / MANIFEST).read_text())
    raw["parameters"]["tau"] = 99.0
    (bundle_dir / MANIFEST).write_bytes(Manifest.model_validate(raw).sealed().canonical_bytes())
    assert PolicyBundle.from_pretrained(bundle_dir).parameters.tau == 99.0  # integrity passes
    with pytest.raises(PolicySignatureError, match="signature is over a different manifest"):
        load_verified(bundle_dir, trust)


def test_tampered_tensors_refused(bundle_dir, keys, trust):
    sign_bundle(bundle_dir, keys["release"][0], "release")
    tensors = bundle_dir / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(PolicyIntegrityError, match="content hash"):
        load_verified(bundle_dir, trust)


def test_malformed_signature_file(bundle_dir, trust):
    (bundle_dir / SIGNATURE).write_text('{"key_id": "release"}')
    with pytest.raises(
        PolicySignatureError, match="signature.json is malformed.*signature: Field required"
    ):
        load_verified(bundle_dir, trust)


def test_signature_error_is_an_integrity_error():
    assert issubclass(PolicySignatureError, PolicyIntegrityError)


def test_trust_store_from_dir(tmp_path, keys):
    store_dir = tmp_path / "trust"
    store_dir.mkdir()
    with pytest.raises(PolicySignatureError, match="holds no <key_id>.pub files"):
        TrustStore.from_dir(store_dir)
    (store_dir / "release.pub").write_bytes(keys["release"][1])
    (store_dir / "ops.pub").write_bytes(keys["intruder"][1])
    (store_dir / "notes.txt").write_text("ignored")
    store = TrustStore.from_dir(store_dir)
    assert store.key_ids == ["ops", "release"] and "release" in store and len(store) == 2
    (store_dir / "broken.pub").write_text("not a key")
    with pytest.raises(PolicySignatureError, match="not a readable PEM public key"):
        TrustStore.from_dir(store_dir)
    with pytest.raises(PolicySignatureError, match="is not a directory"):
        TrustStore.from_dir(tmp_path / "missing")
    with pytest.raises(PolicySignatureError, match="key id 'bad id' is not valid"):
        TrustStore().add("bad id", keys["release"][1])


def test_private_key_checks(bundle_dir, keys):
    with pytest.raises(PolicySignatureError, match="not a readable PEM private key"):
        sign_bundle(
            bundle_dir, b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n", "k"
        )
    with pytest.raises(PolicySignatureError, match="cannot read private key file"):
        sign_bundle(bundle_dir, bundle_dir / "missing.pem", "k")
    assert not (bundle_dir / SIGNATURE).exists()


def test_signature_survives_publish_and_registry_enforces_it(
    tmp_path, bundle_dir, keys, trust, tiny_llama
):
    sign_bundle(bundle_dir, keys["release"][0], "release")
    registry = PolicyRegistry(tmp_path / "registry")
    registry.publish(bundle_dir, trust_store=trust)
    assert (registry.root / "signed" / "1.0.0" / SIGNATURE).is_file()
    assert registry.load("signed", trust_store=trust).ref == "signed@1.0.0"
    registry.publish(random_policy(*tiny_llama, name="signed", version="1.1.0"))  # unsigned
    with pytest.raises(PolicySignatureError, match="signed@1.1.0 is unsigned"):
        registry.load("signed", trust_store=trust)
    with pytest.raises(PolicySignatureError, match="unsigned"):
        registry.publish(
            random_policy(*tiny_llama, name="signed", version="1.2.0"), trust_store=trust
        )


def test_resaving_a_changed_bundle_drops_its_signature(tmp_path, bundle_dir, keys, trust):
    sign_bundle(bundle_dir, keys["release"][0], "release")
    changed = PolicyBundle.from_pretrained(bundle_dir).with_parameters(tau=0.1)
    path = changed.save_pretrained(tmp_path / "changed")
    assert not (path / SIGNATURE).exists()
    with pytest.raises(PolicySignatureError, match="unsigned"):
        load_verified(path, trust)


# ----------------------------------------------------------------------------- CLI


def test_cli_keygen_sign_verify(tmp_path, bundle_dir, capsys):
    keydir = tmp_path / "keys"
    assert main(["policy", "keygen", "--out", str(keydir), "--key-id", "release"]) == EXIT_OK
    assert stat.S_IMODE((keydir / "release.pem").stat().st_mode) == 0o600
    assert main(["policy", "keygen", "--out", str(keydir), "--key-id", "release"]) == EXIT_ERROR
    assert "already exists" in capsys.readouterr().err

    trust_dir = tmp_path / "trust"
    trust_dir.mkdir()
    (trust_dir / "release.pub").write_bytes((keydir / "release.pub").read_bytes())

    assert (
        main(["policy", "verify", str(bundle_dir), "--trust-store", str(trust_dir)])
        == EXIT_INTEGRITY
    )
    assert "unsigned" in capsys.readouterr().err

    sign = [
        "policy",
        "sign",
        str(bundle_dir),
        "--key",
        str(keydir / "release.pem"),
        "--key-id",
        "release",
    ]
    assert main(sign) == EXIT_OK
    capsys.readouterr()
    assert (
        main(["policy", "verify", str(bundle_dir), "--trust-store", str(trust_dir), "--json"])
        == EXIT_OK
    )
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and "signed by release" in out["checks"]

    raw = json.loads((bundle_dir / MANIFEST).read_text())
    raw["parameters"]["lam"] = 5.0
    (bundle_dir / MANIFEST).write_bytes(Manifest.model_validate(raw).sealed().canonical_bytes())
    assert main(["policy", "verify", str(bundle_dir)]) == EXIT_OK  # integrity alone passes
    assert (
        main(["policy", "verify", str(bundle_dir), "--trust-store", str(trust_dir)])
        == EXIT_INTEGRITY
    )
    assert "different manifest" in capsys.readouterr().err
