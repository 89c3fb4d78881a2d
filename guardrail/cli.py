"""The ``guardrail`` command line.

Exit codes: 0 success; 1 a guardrail error (bad input, a missing or unreadable
file, model, generation); 2 usage error (bad arguments, no traceback);
3 a policy bundle failed verification (integrity or signature);
4 a policy bundle does not fit the model; 5 ``guardrail rollout report`` flagged a
canary whose intervention or refusal rate differs from stable beyond the tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from guardrail.errors import GuardrailError, PolicyCompatibilityError, PolicyIntegrityError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTEGRITY, EXIT_COMPATIBILITY = 0, 1, 2, 3, 4
EXIT_CANARY_FLAGGED = 5
RECENTER_ACTIVATION_CHOICES: dict[str, bool | str] = {
    "score-only": False,
    "steered": "steered",
    "always": True,
}


def _csv(kind: type[Any], what: str) -> Any:
    """An argparse type: a comma-separated list of ``kind`` (a usage error otherwise)."""

    def parse(text: str) -> list[Any]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        try:
            values = [kind(item) for item in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, e.g. {'1,2,4' if kind is float else '8,12'}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {what[:-1]}")
        return values

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("expected a positive integer")
    return value


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from guardrail.loading import load_model

    return load_model(
        args.model, device=getattr(args, "device", None), dtype=getattr(args, "dtype", None)
    )


# ----------------------------------------------------------------------------- calibrate


def cmd_calibrate(args: argparse.Namespace) -> int:
    from guardrail.calibrate import CalibrationTargets, calibrate
    from guardrail.neutral import NeutralMedia

    model, processor = _load(args)
    targets = CalibrationTargets(
        benign_trigger_rate=args.trigger_rate,
        kl_bound=args.kl_bound,
        max_validation=args.max_validation,
        recenter=args.recenter,
        apply_recentering_to_activation=RECENTER_ACTIVATION_CHOICES[args.recenter_activation],
        score_positions=args.score_positions,
        lam_grid=tuple(args.lam_grid),
        kappa_grid=tuple(args.kappa_grid),
    )
    media = NeutralMedia(
        seed=args.seed,
        image_size=(args.image_size, args.image_size),
        video_frames=args.video_frames,
    )
    bundle = calibrate(
        model,
        processor,
        args.harmful,
        args.harmless,
        modalities=args.modalities.split(",") if args.modalities else None,
        layers=args.layers,
        targets=targets,
        name=args.name,
        version=args.version,
        batch_size=args.batch_size,
        seed=args.seed,
        media=media,
        progress=not args.quiet,
    )
    path = bundle.save_pretrained(args.out)
    if args.report:
        from guardrail.report import write_report

        write_report(bundle, args.report)
    summary = {
        "policy": bundle.ref,
        "path": str(path),
        "layer": bundle.layer,
        "parameters": bundle.parameters.model_dump(),
        "report": args.report,
    }
    if args.json:
        _print_json(summary)
    else:
        print(f"wrote {bundle!r} to {path}")
        if args.report:
            print(f"report: {args.report}")
    return EXIT_OK


# ----------------------------------------------------------------------------- generate


def cmd_generate(args: argparse.Namespace) -> int:
    from guardrail.guardrail import Guardrail
    from guardrail.policy import PolicyBundle

    # The bundle is read and integrity-checked before the (slow) model load.
    bundle = PolicyBundle.from_pretrained(args.policy) if args.policy else None
    model, processor = _load(args)
    guard = Guardrail(model, processor, bundle, mode=args.mode)
    content: list[dict[str, Any]] = [{"type": "image", "image": path} for path in args.image]
    content += [{"type": "video", "video": path} for path in args.video]
    content.append({"type": "text", "text": args.prompt})
    result = guard.generate(
        [{"role": "user", "content": content}], max_new_tokens=args.max_new_tokens
    )
    if args.json:
        _print_json(result.model_dump(exclude={"token_ids"}))
    else:
        print(result.text)
        score = "n/a" if result.score is None else f"{result.score:.3f}"
        print(
            f"\n[policy {result.policy_name}@{result.policy_version} mode={result.mode} "
            f"score={score} intervened={result.intervened} refused={result.refused}]",
            file=sys.stderr,
        )
    return EXIT_OK


# ----------------------------------------------------------------------------- policy


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
        from guardrail.report import write_report

        write_report(bundle, args.report)
    data = _summary(bundle)
    if args.json:
        _print_json(data)
    else:
        for key, value in data.items():
            print(
                f"{key:12s} {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value}"
            )
    return EXIT_OK


def cmd_policy_verify(args: argparse.Namespace) -> int:
    from guardrail.adapters import ModelAdapter
    from guardrail.policy import PolicyBundle

    adapter = ModelAdapter(*_load(args)) if args.model else None
    bundle = PolicyBundle.from_pretrained(args.dir)
    checks = ["schema", "manifest digest", "tensor hashes", "finite values"]
    if getattr(args, "trust_store", None):
        from guardrail.signing import TrustStore, verify_bundle

        key_id = verify_bundle(bundle, TrustStore.from_dir(args.trust_store))
        checks.append(f"signed by {key_id}")
    if adapter is not None:
        bundle.check_compatible(adapter)
        checks.append(f"fits {type(adapter.model).__name__}")
    if args.json:
        _print_json({"ok": True, "policy": bundle.ref, "checks": checks})
    else:
        print(f"OK {bundle.ref}: " + ", ".join(checks))
    return EXIT_OK


def cmd_policy_diff(args: argparse.Namespace) -> int:
    from guardrail.policy import PolicyBundle

    a, b = PolicyBundle.from_pretrained(args.a), PolicyBundle.from_pretrained(args.b)
    sa, sb = _summary(a), _summary(b)
    changes: dict[str, Any] = {}
    for key in ("name", "version", "layer", "parameters", "modalities", "model"):
        if sa[key] != sb[key]:
            changes[key] = {"from": sa[key], "to": sb[key]}
    if a.manifest.model.hidden_size == b.manifest.model.hidden_size:
        changes["direction_cosine"] = float(a.u @ b.u)
    changes["gap"] = {"from": a.g, "to": b.g}
    if args.json:
        _print_json(changes)
    else:
        print(f"{a.ref} -> {b.ref}")
        for key, value in changes.items():
            print(f"  {key}: {json.dumps(value, default=str)}")
    return EXIT_OK


def cmd_policy_keygen(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from guardrail.signing import check_key_id, generate_keypair

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
        _print_json({"key_id": args.key_id, "private_key": str(private), "public_key": str(public)})
    else:
        print(f"private key: {private} (keep secret)")
        print(f"public key:  {public} (copy into the trust store directory)")
    return EXIT_OK


def cmd_policy_sign(args: argparse.Namespace) -> int:
    from pathlib import Path

    from guardrail.signing import sign_bundle

    signature = sign_bundle(args.dir, Path(args.key), args.key_id)
    if args.json:
        _print_json(signature.model_dump())
    else:
        print(
            f"signed {args.dir} with key {signature.key_id} (manifest {signature.manifest_digest[:19]}...)"
        )
    return EXIT_OK


# ----------------------------------------------------------------------------- rollout


def cmd_rollout_report(args: argparse.Namespace) -> int:
    from guardrail.rollout import report_events

    report = report_events(args.events, tolerance=args.tolerance, alpha=args.alpha)
    if args.json:
        _print_json({**report.model_dump(), "flagged": report.flagged})
    else:
        print(report.to_text())
    return EXIT_CANARY_FLAGGED if report.flagged else EXIT_OK


def cmd_rollout_check(args: argparse.Namespace) -> int:
    from guardrail.registry import PolicyRegistry
    from guardrail.rollout import Rollout

    trust = None
    if args.trust_store:
        from guardrail.signing import TrustStore

        trust = TrustStore.from_dir(args.trust_store)
    registry = PolicyRegistry(args.registry) if args.registry else None
    rollout = Rollout.from_file(args.config, registry, trust_store=trust)
    canary = rollout.config.canary
    data = {
        "stable": rollout.stable.ref,
        "canary": rollout.canary.ref if rollout.canary else None,
        "canary_share": canary.share if canary else None,
        "sticky_key": canary.sticky_key if canary else None,
        "shadow": [b.ref for b in rollout.shadows],
        "kill_switch": rollout.config.kill_switch,
        "signatures": "verified" if trust is not None else "not checked",
    }
    if args.json:
        _print_json(data)
    else:
        print(f"OK {rollout!r}" + (" (signatures verified)" if trust is not None else ""))
    return EXIT_OK


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardrail", description="MARS refusal steering for local multimodal LLMs"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model", required=True, help="checkpoint directory, or 'organism' / 'smollm2'"
        )
        p.add_argument("--device", default=None, help="torch device (default: CPU)")
        p.add_argument("--dtype", default=None, help="torch dtype name, e.g. bfloat16")

    p = sub.add_parser("calibrate", help="calibrate a policy bundle from text-only prompt sets")
    model_args(p)
    p.add_argument(
        "--harmful",
        required=True,
        help="harmful prompts: 'harmful' (shipped) or a JSONL/CSV/TXT file",
    )
    p.add_argument(
        "--harmless", required=True, help="harmless prompts: 'harmless' (shipped) or a file"
    )
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--name", default="policy")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--report", help="write the HTML calibration report here")
    p.add_argument("--modalities", help="comma-separated, default: all the model supports")
    p.add_argument(
        "--layers",
        type=_csv(int, "layer indices"),
        help="comma-separated candidate layers (default: 20-80 %% of depth)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-validation", type=_positive_int, default=64)
    p.add_argument(
        "--trigger-rate", type=float, default=0.02, help="target benign gate trigger rate"
    )
    p.add_argument(
        "--kl-bound", type=float, default=0.25, help="benign first-token KL bound (nats)"
    )
    p.add_argument("--recenter", choices=["full", "projection", "none"], default="full")
    p.add_argument(
        "--recenter-activation",
        choices=list(RECENTER_ACTIVATION_CHOICES),
        default="score-only",
        help="write the re-centred activation back: score-only (h + a u), steered "
        "(h_c + a u on the rows the gate opens), always (h_c on every row)",
    )
    p.add_argument(
        "--score-positions",
        type=int,
        default=1,
        help="score the mean of the last k prompt positions (default 1: t* alone)",
    )
    p.add_argument(
        "--lam-grid",
        type=_csv(float, "numbers"),
        default=[1.0, 2.0, 4.0],
        help="comma-separated lam values to grid",
    )
    p.add_argument(
        "--kappa-grid",
        type=_csv(float, "numbers"),
        default=[0.5, 1.0, 1.5],
        help="comma-separated kappa values to grid",
    )
    p.add_argument(
        "--image-size", type=int, default=224, help="side of the neutral calibration images"
    )
    p.add_argument(
        "--video-frames", type=int, default=4, help="frames of the neutral calibration videos"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("generate", help="generate one guarded answer")
    model_args(p)
    p.add_argument("--policy", help="policy bundle directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument(
        "--video", action="append", default=[], help="directory of frames or animated GIF"
    )
    p.add_argument("--mode", choices=["enforce", "shadow", "off"], default="enforce")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)

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

    rollout = sub.add_parser(
        "rollout", help="check rollout configs and report on canaries"
    ).add_subparsers(dest="action", required=True)
    p = rollout.add_parser(
        "report", help="per-arm rates from JSON Lines events; exit 5 when a canary is flagged"
    )
    p.add_argument("events", help="JSON Lines event log (e.g. written by JsonlSink)")
    p.add_argument(
        "--tolerance", type=float, default=0.05, help="absolute rate difference that flags a canary"
    )
    p.add_argument(
        "--alpha", type=float, default=None, help="also require a z-test p-value below this"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rollout_report)
    p = rollout.add_parser("check", help="load and verify every bundle a rollout config names")
    p.add_argument("config", help="rollout config (.json, .yaml or .yml)")
    p.add_argument("--registry", help="local registry root for references such as organism@^1")
    p.add_argument("--trust-store", help="directory of <key_id>.pub keys; require valid signatures")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rollout_check)

    from guardrail import demo, evaluate

    demo.add_parser(sub)
    evaluate.add_parser(sub)
    return parser


def exit_code(exc: BaseException) -> int:
    """The documented exit code of an error (see the module docstring)."""
    if isinstance(exc, PolicyCompatibilityError):
        return EXIT_COMPATIBILITY
    if isinstance(exc, PolicyIntegrityError):
        return EXIT_INTEGRITY
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as Unix tools do.
        _silence_stdout()
        return EXIT_OK
    except (GuardrailError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
