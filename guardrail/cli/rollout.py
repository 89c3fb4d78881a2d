"""``guardrail rollout``: check rollout configs and report on canaries."""

from __future__ import annotations

import argparse
from typing import Any

from guardrail.cli.common import EXIT_CANARY_FLAGGED, EXIT_OK, print_json


def cmd_rollout_report(args: argparse.Namespace) -> int:
    from guardrail.evaluation.rollout_report import report_events

    report = report_events(args.events, tolerance=args.tolerance, alpha=args.alpha)
    if args.json:
        print_json({**report.model_dump(), "flagged": report.flagged})
    else:
        print(report.to_text())
    return EXIT_CANARY_FLAGGED if report.flagged else EXIT_OK


def cmd_rollout_check(args: argparse.Namespace) -> int:
    from guardrail.policy.registry import PolicyRegistry
    from guardrail.policy.rollout import Rollout

    trust = None
    if args.trust_store:
        from guardrail.policy.signing import TrustStore

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
        print_json(data)
    else:
        print(f"OK {rollout!r}" + (" (signatures verified)" if trust is not None else ""))
    return EXIT_OK


def add_parser(sub: Any) -> None:
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
