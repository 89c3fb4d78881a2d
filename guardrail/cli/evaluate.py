"""``guardrail eval``: safety, over-refusal and utility, unguarded against guarded."""

from __future__ import annotations

from typing import Any

from guardrail.cli.common import positive_int, print_json
from guardrail.evaluation.defaults import BATCH_SIZE, MAX_NEW_TOKENS, default_threads
from guardrail.evaluation.evaluate import default_renderer, evaluate, load_eval_items
from guardrail.evaluation.formats import FORMATS
from guardrail.evaluation.rendering import INSTRUCTIONS
from guardrail.evaluation.templates import FAMILIES


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
        help="shipped sets (harmful, harmless, borderline, alarming; test split) or files: labelled "
        "JSONL/CSV/JSON in the project's format, or public benchmark files with --format",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="how to read the --dataset files: a public benchmark as distributed "
        "(advbench, harmbench, jbb, xstest, safebench; see guardrail.evaluation.formats "
        "for their labels) or jsonl, the project's own format (the default)",
    )
    p.add_argument("--modalities", default="text", help="comma-separated: text,image,video")
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="at most this many items per dataset, spread evenly across its categories",
    )
    p.add_argument(
        "--instructions",
        choices=INSTRUCTIONS,
        default=None,
        help="the text that accompanies images and videos: the organism's held-out "
        "phrasings (test), its build phrasings (train) or one fixed instruction (fixed); "
        "default test for the organism, fixed otherwise",
    )
    p.add_argument(
        "--templates",
        default="project",
        help="how requests are laid out in images and videos: a template family "
        f"({', '.join(FAMILIES)}; heldout is the robustness test) or one template's name "
        "(see guardrail.evaluation.templates); default project",
    )
    p.add_argument(
        "--frames", type=positive_int, default=None, help="frames per video (default 3 / 4)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=MAX_NEW_TOKENS,
        help=f"tokens per answer (default {MAX_NEW_TOKENS}, as the claims benchmark)",
    )
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE)
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default: half the CPUs this process may use, "
        f"here {default_threads()})",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", help="write the full report (summary, settings, records) as JSON")
    p.add_argument("--html", help="write the report as a self-contained HTML page")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--plot", help="write a PNG bar chart here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_cli)


def run_cli(args: Any) -> int:
    import torch

    from guardrail.guardrail import Guardrail
    from guardrail.models.loading import load_model
    from guardrail.policy import PolicyBundle

    # Inputs are checked before the (slow) model load.
    bundle = PolicyBundle.from_pretrained(args.policy)
    items = load_eval_items(args.dataset, limit=args.limit, format=args.format)
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    renderer = (
        default_renderer(
            args.model, instructions=args.instructions, frames=args.frames, templates=args.templates
        )
        if set(modalities) - {"text"}
        else None
    )
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    guard = Guardrail(model, processor, bundle)
    report = evaluate(
        guard,
        items,
        modalities=modalities,
        renderer=renderer,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=not args.quiet,
        settings={
            "datasets": list(args.dataset),
            "format": args.format or "jsonl",
            "limit_per_dataset": args.limit,
            "renderer": repr(renderer) if renderer is not None else None,
            "templates": args.templates,
            "threads": threads,
        },
    )
    if args.json:
        print_json(report.summary())
    else:
        print(report.table())
        print()
        print(report.table(by_category=True))
    if args.out:
        report.to_json(args.out)
    if args.html:
        report.to_html(args.html)
    if args.plot:
        report.plot(args.plot)
    return 0
