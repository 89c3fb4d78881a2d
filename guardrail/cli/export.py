"""``guardrail export-vllm``: write a model as a checkpoint directory vLLM loads.

``--model organism`` exports the organism's plain LLaVA checkpoint: its
image-position adapters are conditional on where the image tokens are, which a
plain checkpoint cannot hold, so vLLM serves the organism without them (identical
on text; see docs/guides/vllm.md for what that changes on images).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from guardrail.cli.common import EXIT_OK, load_model, model_args, print_json
from guardrail.errors import InputError


def cmd_export(args: argparse.Namespace) -> int:
    from guardrail.models.export import export_for_vllm

    out = Path(args.out)
    if out.exists() and not args.overwrite:  # checked before the model loads
        raise InputError(f"{out} exists; pass --overwrite to replace it")
    if args.model == "organism":
        from guardrail.models import organism

        model, processor = organism.load(image_adapters=False)
    else:
        model, processor = load_model(args)
    path = export_for_vllm(model, processor, out, overwrite=args.overwrite)
    files = sorted(p.name for p in path.iterdir())
    if args.json:
        print_json({"out": str(path), "files": files, "model_type": model.config.model_type})
    else:
        print(f"wrote {path} ({len(files)} files); serve it with vllm_mars_guardrail.GuardedLLM")
    return EXIT_OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export-vllm", help="write a model as a checkpoint directory that vLLM loads"
    )
    model_args(p)
    p.add_argument("out", help="directory to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    p.add_argument("--json", action="store_true", help="print the result (and errors) as JSON")
    p.set_defaults(func=cmd_export)
