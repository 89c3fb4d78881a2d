"""Organism build: one training step padded against micro-batched, side by side.

For each LoRA stage of the organism build, the same random batches of that stage's
training data go through forward and backward twice, alternately: padded to the
longest row (one pass) and as micro-batches of similar length
(``organism.build.accumulate_batch``, the way the build computes them).
Prints seconds per step for both, their ratio and the share of real tokens.

    python benchmarks/build_batches.py [--stages safety,frames,visual] [--batches 12]

Needs the distilled answers of a build (``organism/build_organism.py`` caches them in
``<cache_root>/organism-build``; computed here on first use, about 6 minutes).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from guardrail.models.organism import lora  # noqa: E402
from guardrail.models.organism.model import (  # noqa: E402
    LORA_STAGES,
    base_model,
    language_layers,
    reading_vocab,
)
from organism import build  # noqa: E402


def _step(model: Any, items: list[dict[str, Any]], pad: int, overhead: float) -> float:
    started = time.perf_counter()
    build.accumulate_batch(model, items, pad, emphasis=(4, 4.0), group_overhead=overhead)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default=",".join(LORA_STAGES))
    ap.add_argument("--batches", type=int, default=12, help="batches per stage")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}",
        flush=True,
    )
    cfg = build.BuildConfig()
    tokenizer = build._tokenizer()
    model, processor = base_model(reading_vocab(tokenizer, cfg.top_vocab))
    answers = build.train_answers(model, processor, cfg, build.default_work_dir())
    layers = language_layers(model)
    pad = int(processor.tokenizer.pad_token_id)
    padded_all = 10**9  # one micro-batch: the whole batch padded to its longest row
    results: dict[str, dict[str, float]] = {}
    for stage in [s for s in args.stages.split(",") if s]:
        examples = build.STAGE_DATA[stage](tokenizer, answers, cfg, lambda _: None)
        opts = build._stage_options(cfg, stage)
        encoded = [build._encode(processor, ex, cfg.train_answer_tokens) for ex in examples]
        for p in model.parameters():
            p.requires_grad_(False)
        adapters = lora.attach(
            layers,
            opts["modules"],
            rank=opts["rank"],
            alpha=opts["alpha"],
            seed=0,
            first_layer=opts.get("first_layer", 0),
            last_layer=opts.get("last_layer", -1),
        )
        rng = random.Random(0)
        padded = grouped = real = computed = 0.0
        model.train()
        try:
            for _ in range(args.batches):
                items = [encoded[i] for i in rng.sample(range(len(encoded)), opts["batch_size"])]
                lengths = [len(it["ids"]) for it in items]
                real += sum(lengths)
                computed += max(lengths) * len(lengths)
                padded += _step(model, items, pad, padded_all)
                grouped += _step(model, items, pad, cfg.micro_batch_overhead)
                for a in adapters.values():
                    a.A.grad = a.B.grad = None
        finally:
            model.eval()
            lora.detach(layers, adapters)
        row = {
            "padded_s_per_step": padded / args.batches,
            "micro_batched_s_per_step": grouped / args.batches,
            "speedup": padded / grouped,
            "real_token_share": real / computed,
        }
        results[stage] = row
        print(
            f"{stage:8s} padded {row['padded_s_per_step']:.2f} s/step, micro-batched "
            f"{row['micro_batched_s_per_step']:.2f} s/step: x{row['speedup']:.2f} "
            f"(real tokens {100 * row['real_token_share']:.0f} % of padded)",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
