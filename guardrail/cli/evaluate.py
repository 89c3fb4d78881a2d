"""``guardrail eval``: safety, over-refusal and utility, unguarded against guarded."""

from __future__ import annotations

from typing import Any

from guardrail.cli.common import print_json
from guardrail.evaluation.evaluate import (
    default_renderer,
    evaluate,
    load_eval_items,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval", help="measure safety, over-refusal and utility, unguarded vs guarded"
    )
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint directory, or 'organism' / 'smollm2' / 'tiny-<arch>'",
    )
    p.add_argument("--policy", required=True, help="policy bundle directory")
    p.add_argument(
        "--dataset",
        nargs="+",
        default=["harmful", "harmless", "borderline"],
        help="shipped sets (harmful, harmless, borderline; test split) or labelled JSONL/CSV files",
    )
    p.add_argument("--modalities", default="text", help="comma-separated: text,image,video")
    p.add_argument("--limit", type=int, default=None, help="at most this many items per dataset")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", help="write the full report (summary and records) here as JSON")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--plot", help="write a PNG bar chart here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_cli)


def run_cli(args: Any) -> int:
    from guardrail.guardrail import Guardrail
    from guardrail.models.loading import load_model
    from guardrail.policy import PolicyBundle

    # Inputs are checked before the (slow) model load.
    bundle = PolicyBundle.from_pretrained(args.policy)
    items = load_eval_items(args.dataset, limit=args.limit)
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    guard = Guardrail(model, processor, bundle)
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    renderer = default_renderer(args.model) if set(modalities) - {"text"} else None
    report = evaluate(
        guard,
        items,
        modalities=modalities,
        renderer=renderer,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    if args.json:
        print_json(report.summary())
    else:
        print(report.table())
    if args.out:
        report.to_json(args.out)
    if args.plot:
        report.plot(args.plot)
    return 0
