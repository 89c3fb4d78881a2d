#!/usr/bin/env python
"""Build the model organism (guardrail/models/organism/weights) from SmolLM2 and the prompt sets.

    python organism/build_organism.py                      # full build, then measure
    python organism/build_organism.py --no-measure --threads 1
    python organism/build_organism.py --stages visual      # redo stage 3 only
    python organism/build_organism.py --set visual_epochs=1.5

Everything is seeded and runs on CPU. The original model's answers are cached in the
work directory (default: <cache_root>/organism-build), so a rerun skips distillation.
See organism/README.md for what each stage does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script from anywhere: the repository root holds the `organism` package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _parse_value(field: dataclasses.Field[Any], text: str) -> Any:
    kind = type(field.default) if field.default is not dataclasses.MISSING else str
    if kind is bool:
        return text.lower() in ("1", "true", "yes")
    if kind is tuple:
        default = field.default if isinstance(field.default, tuple) else ()
        item = type(default[0]) if default else str
        return tuple(item(x) for x in text.split(",") if x)
    return kind(text)


def main(argv: list[str] | None = None) -> int:
    import torch

    from guardrail.models.organism.model import LORA_STAGES, WEIGHTS_DIR
    from organism import build as organism_build

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir", type=Path, default=WEIGHTS_DIR, help="where the trained parts go"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="cache of distilled answers")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads"
    )
    parser.add_argument(
        "--stages", default=",".join(LORA_STAGES), help="LoRA stages to train (others are loaded)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a BuildConfig field",
    )
    parser.add_argument(
        "--no-measure", action="store_true", help="skip the measurement after the build"
    )
    parser.add_argument("--limit", type=int, default=None, help="measure at most N prompts per row")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = organism_build.BuildConfig()
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            parser.error(f"unknown BuildConfig field {key!r}; choose from {', '.join(fields)}")
        setattr(cfg, key, _parse_value(fields[key], value))
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = set(stages) - set(LORA_STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(LORA_STAGES)}")
    work_dir = args.work_dir or organism_build.default_work_dir()
    started = time.perf_counter()
    report = organism_build.build(cfg, out_dir=args.out_dir, work_dir=work_dir, stages=stages)
    print(json.dumps({"timings_s": report.timings_s, "reading": report.reading}, indent=2))
    print(f"build finished in {time.perf_counter() - started:.0f}s; weights in {args.out_dir}")
    sizes = {p.name: p.stat().st_size for p in sorted(args.out_dir.glob("*.safetensors"))}
    print(f"stored parts: {sizes} (total {sum(sizes.values()) / 1e6:.2f} MB)")
    if not args.no_measure and args.out_dir.resolve() == WEIGHTS_DIR.resolve():
        from organism import measure

        result = measure.measure(limit=args.limit)
        print(measure.format_table(result))
        (args.out_dir / "measured.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
