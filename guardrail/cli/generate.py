"""``guardrail generate``: one guarded answer."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from guardrail.cli.common import EXIT_OK, load_model, model_args, positive_int, print_json


def cmd_generate(args: argparse.Namespace) -> int:
    from guardrail.guardrail import Guardrail
    from guardrail.policy import PolicyBundle

    # The bundle is read and integrity-checked before the (slow) model load.
    bundle = PolicyBundle.from_pretrained(args.policy) if args.policy else None
    model, processor = load_model(args)
    guard = Guardrail(model, processor, bundle, mode=args.mode)
    content: list[dict[str, Any]] = [{"type": "image", "image": path} for path in args.image]
    content += [{"type": "video", "video": path} for path in args.video]
    content.append({"type": "text", "text": args.prompt})
    result = guard.generate(
        [{"role": "user", "content": content}], max_new_tokens=args.max_new_tokens
    )
    if args.json:
        print_json(result.model_dump(exclude={"token_ids"}))
    else:
        print(result.text)
        score = "n/a" if result.score is None else f"{result.score:.3f}"
        print(
            f"\n[policy {result.policy_name}@{result.policy_version} mode={result.mode} "
            f"score={score} intervened={result.intervened} refused={result.refused}]",
            file=sys.stderr,
        )
    return EXIT_OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate one guarded answer")
    model_args(p)
    p.add_argument("--policy", help="policy bundle directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument(
        "--video", action="append", default=[], help="directory of frames or animated GIF"
    )
    p.add_argument("--mode", choices=["enforce", "shadow", "off"], default="enforce")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)
