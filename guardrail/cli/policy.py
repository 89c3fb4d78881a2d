"""``guardrail policy``: show, verify, diff, keygen and sign bundles."""

from __future__ import annotations

import argparse
import json
from typing import Any

from guardrail.cli.common import EXIT_OK, load_model, print_json
from guardrail.errors import GuardrailError


def _summary(bundle: Any) -> dict[str, Any]:
    m = bundle.manifest
    return {
        "name": m.name,
        "version": m.version,
        "description": m.description,
        "created": m.created,
        "model": m.model.model_dump(exclude={"weight_probe"}),
        "layer": m.layer,
        "parameters": m.parameters.model_dump(),
        "modalities": m.modalities,
        "gap": bundle.g,
        "files": m.files,
        "calibration": {
            k: m.calibration.get(k)
            for k in ("project_version", "seed", "chosen", "candidate_layers", "datasets")
            if k in m.calibration
        },
    }


def cmd_policy_show(args: argparse.Namespace) -> int:
    from guardrail.policy import PolicyBundle

    bundle = PolicyBundle.from_pretrained(args.dir)
    if args.report:
        from guardrail.calibration.report import write_report

        write_report(bundle, args.report)
    data = _summary(bundle)
    if args.json:
        print_json(data)
    else:
        for key, value in data.items():
            print(
                f"{key:12s} {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value}"
            )
    return EXIT_OK


def cmd_policy_verify(args: argparse.Namespace) -> int:
    from guardrail.adapters import ModelAdapter
    from guardrail.policy import PolicyBundle

    bundle = PolicyBundle.from_pretrained(args.dir)  # checked before the model loads
    adapter = ModelAdapter(*load_model(args)) if args.model else None
    checks = ["schema", "manifest digest", "tensor hashes", "finite values"]
    if getattr(args, "trust_store", None):
        from guardrail.policy.signing import TrustStore, verify_bundle

        key_id = verify_bundle(bundle, TrustStore.from_dir(args.trust_store))
        checks.append(f"signed by {key_id}")
    if adapter is not None:
        bundle.check_compatible(adapter)
        checks.append(f"fits {type(adapter.model).__name__}")
    if args.json:
        print_json({"ok": True, "policy": bundle.ref, "checks": checks})
    else:
        print(f"OK {bundle.ref}: " + ", ".join(checks))
    return EXIT_OK


def cmd_policy_diff(args: argparse.Namespace) -> int:
    from guardrail.policy import PolicyBundle

    a, b = PolicyBundle.from_pretrained(args.a), PolicyBundle.from_pretrained(args.b)
    sa, sb = _summary(a), _summary(b)
    changes: dict[str, Any] = {}
    for key in ("name", "version", "created", "layer", "parameters", "modalities", "model"):
        if sa[key] != sb[key]:
            changes[key] = {"from": sa[key], "to": sb[key]}
    for bundle in (a, b):
        if bundle.manifest.derived_from is not None:
            changes[f"{bundle.ref} derived from"] = bundle.manifest.derived_from
    if a.manifest.model.hidden_size == b.manifest.model.hidden_size:
        changes["direction_cosine"] = float(a.u @ b.u)
    changes["gap"] = {"from": a.g, "to": b.g}
    if args.json:
        print_json(changes)
    else:
        print(f"{a.ref} -> {b.ref}")
        for key, value in changes.items():
            print(f"  {key}: {json.dumps(value, default=str)}")
    return EXIT_OK


def _setting(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` of ``--set``: a number, true/false/none, or a word."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError("expected NAME=VALUE, e.g. tau=0.45")
    value: Any = raw.strip()
    lowered = value.lower()
    if lowered in ("true", "false"):
        value = lowered == "true"
    elif lowered in ("none", "null"):
        value = None
    else:
        try:
            value = float(value)
        except ValueError:
            pass
    return name.strip(), value


def cmd_policy_derive(args: argparse.Namespace) -> int:
    from guardrail.policy import PolicyBundle

    source = PolicyBundle.from_pretrained(args.src)
    changes: dict[str, Any] = {}
    gates: dict[str, Any] = {str(m): v for m, v in source.parameters.tau_modalities.items()}
    for name, value in args.set:
        modality = name.partition("tau.")[2] if name.startswith("tau.") else None
        if modality is None:
            changes[name] = value
            continue
        # tau.image=0.6 sets the image gate; tau.image=none removes it (back to tau)
        if value is None:
            gates.pop(modality, None)
        else:
            gates[modality] = value
        changes["tau_modalities"] = gates
    derived = source.derive(args.version, description=args.description, **changes)
    path = derived.save_pretrained(args.out)
    record = derived.manifest.derived_from or {}
    if args.json:
        print_json({"policy": derived.ref, "path": str(path), "derived_from": record})
    else:
        changed = ", ".join(
            f"{k} {old!r} -> {new!r}" for k, (old, new) in record["changes"].items()
        )
        print(f"wrote {derived.ref} to {path} (from {source.ref}: {changed})")
    return EXIT_OK


def cmd_policy_keygen(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from guardrail.policy.signing import check_key_id, generate_keypair

    check_key_id(args.key_id)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / f"{args.key_id}.pem", out / f"{args.key_id}.pub"
    for path in (private, public):
        if path.exists():
            raise GuardrailError(
                f"{path} already exists; choose another --key-id or --out (keys are never overwritten)"
            )
    private_pem, public_pem = generate_keypair()
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public.write_bytes(public_pem)
    if args.json:
        print_json({"key_id": args.key_id, "private_key": str(private), "public_key": str(public)})
    else:
        print(f"private key: {private} (keep secret)")
        print(f"public key:  {public} (copy into the trust store directory)")
    return EXIT_OK


def cmd_policy_sign(args: argparse.Namespace) -> int:
    from pathlib import Path

    from guardrail.policy.signing import sign_bundle

    signature = sign_bundle(args.dir, Path(args.key), args.key_id)
    if args.json:
        print_json(signature.model_dump())
    else:
        print(
            f"signed {args.dir} with key {signature.key_id} (manifest {signature.manifest_digest[:19]}...)"
        )
    return EXIT_OK


def add_parser(sub: Any) -> None:
    policy = sub.add_parser("policy", help="inspect and verify policy bundles").add_subparsers(
        dest="action", required=True
    )
    p = policy.add_parser("show", help="print a bundle's manifest summary")
    p.add_argument("dir")
    p.add_argument("--report", help="also write the HTML calibration report")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_policy_show)
    p = policy.add_parser("verify", help="verify hashes, schema and values (and fit to --model)")
    p.add_argument("dir")
    p.add_argument("--model", help="also check the bundle fits this model")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument(
        "--trust-store", help="directory of <key_id>.pub keys; require a valid signature"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_policy_verify)
    p = policy.add_parser("diff", help="compare two bundles")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_policy_diff)
    p = policy.add_parser(
        "derive", help="a new version with changed parameters (same statistics, recorded)"
    )
    p.add_argument("src", help="the source bundle directory")
    p.add_argument(
        "--set",
        action="append",
        type=_setting,
        required=True,
        metavar="NAME=VALUE",
        help="a steering parameter to change, e.g. tau=0.45, or a modality's own gate, "
        "e.g. tau.image=0.6 (tau.image=none removes it) (repeatable)",
    )
    p.add_argument("--version", required=True, help="the new version, e.g. 1.1.0")
    p.add_argument("--out", required=True, help="directory to write the new bundle to")
    p.add_argument("--description", default=None, help="the new bundle's description")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_policy_derive)
    p = policy.add_parser("keygen", help="create an Ed25519 key pair for signing bundles")
    p.add_argument(
        "--out", required=True, help="directory for <key-id>.pem (private) and <key-id>.pub"
    )
    p.add_argument(
        "--key-id", required=True, help="the key's name in trust stores, e.g. release-2025"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_policy_keygen)
    p = policy.add_parser("sign", help="sign a bundle (writes signature.json beside its manifest)")
    p.add_argument("dir")
    p.add_argument("--key", required=True, help="Ed25519 private key PEM file")
    p.add_argument("--key-id", required=True, help="id of the key, as named in the trust store")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_policy_sign)
