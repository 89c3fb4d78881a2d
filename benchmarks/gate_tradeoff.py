"""Where the gate opens: MARS scores of test requests under a policy, and what each gate costs.

MARS steers a request only when its re-centred score ``s`` at ``t*`` (layer ``l*``)
is above the gate ``tau``. This script scores test-split requests with the policy's
own rule (prefill up to ``l*``, no generation) and prints, per row (harmful,
ordinary benign, near-miss benign and borderline-safe requests as text, typographic
images and split-across-frames videos):

- the share of requests the bundle's gate opens on, and score quantiles;
- the AUROC of harmful requests in a modality against each benign row;
- a sweep of gates: the share of every row each one opens on;
- for each harmful modality, a gate that opens on a target share of it
  (``--recall``, default 80 %), and the share of every benign row that gate opens on.

Opening the gate is not refusing: a steered request may still be answered and an
unsteered one may be refused by the model itself. What the numbers bound is the
recall a single gate can buy, and its benign price. Test-split scores are for
diagnosis only; calibration never sees them.

    python benchmarks/gate_tradeoff.py [--policy policies/organism/1.0.0] [--limit 40] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.paper_claims import conversations, media_modalities, split_prompts  # noqa: E402
from guardrail import Guardrail, PolicyBundle  # noqa: E402
from guardrail.calibration.metrics import auroc, gate_for_recall, quantile, share_above  # noqa: E402
from guardrail.evaluation.evaluate import default_renderer  # noqa: E402
from guardrail.models.loading import load_model  # noqa: E402

SETS = {
    "harmful": ("harmful", {}),
    "benign": ("harmless", {"exclude_category": "near_miss"}),
    "near-miss": ("harmless", {"category": "near_miss"}),
    "borderline": ("borderline", {}),
}


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--policy", default=str(ROOT / "policies" / "organism" / "1.0.0"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=40, help="prompts per set")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--taus", default="0.1,0.2,0.25,0.3,0.35,0.4,0.45", help="gates to sweep")
    ap.add_argument("--recall", type=float, default=0.8)
    ap.add_argument("--json", help="also write scores and tables here")
    args = ap.parse_args(argv)
    started = time.perf_counter()

    model, processor = load_model(args.model)
    guard = Guardrail(model, processor)
    bundle = PolicyBundle.from_pretrained(args.policy, adapter=guard.adapter)
    tau = bundle.parameters.tau
    renderer = default_renderer(args.model)
    media = media_modalities(guard, args.model)

    scores: dict[str, list[float]] = {}
    for label, (source, filters) in SETS.items():
        prompts = split_prompts(source, args.split, args.limit, **filters)
        for modality in ("text", *([] if label == "borderline" else media)):
            convs = conversations(prompts, modality, renderer)
            row: list[float] = []
            for start in range(0, len(convs), args.batch_size):
                row += guard.score(convs[start : start + args.batch_size], policy=bundle)
            scores[f"{label} {modality}"] = row

    taus = sorted({float(t) for t in args.taus.split(",")} | {tau})
    print(
        f"# Gate trade-off ({args.model}, policy {bundle.ref}, layer {bundle.layer}, "
        f"tau {tau:.3f}, {args.split} split)\n"
    )
    print("| row | n | gate opens (tau) | q10 | median | q90 | max |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, row in scores.items():
        q = [quantile(row, x) for x in (0.1, 0.5, 0.9, 1.0)]
        print(
            f"| {key} | {len(row)} | {_pct(share_above(row, tau))} | "
            + " | ".join(f"{v:+.2f}" for v in q)
            + " |"
        )

    separation: dict[str, float] = {}
    print("\n| harmful vs | AUROC |")
    print("|---|---:|")
    for m in ("text", *media):
        # the same modality's benign rows, and the text rows one gate must also spare
        for key in (k for k in scores if not k.startswith("harmful") and k.endswith((m, "text"))):
            name = f"harmful {m} vs {key}"
            separation[name] = auroc(scores[f"harmful {m}"], scores[key])
            print(f"| {name} | {separation[name]:.3f} |")

    print("\n| gate | " + " | ".join(scores) + " |")
    print("|---:|" + "---:|" * len(scores))
    sweep = {t: {k: share_above(v, t) for k, v in scores.items()} for t in taus}
    for t, row in sweep.items():
        mark = " (policy)" if t == tau else ""
        print(f"| {t:.3f}{mark} | " + " | ".join(_pct(row[k]) for k in scores) + " |")

    needed: dict[str, dict[str, Any]] = {}
    print(
        f"\nA gate opening on {_pct(args.recall)} of each harmful row (midway below the last"
        " score it needs), and what it opens on:"
    )
    for m in ("text", *media):
        gate = gate_for_recall(scores[f"harmful {m}"], args.recall)
        opens = {k: share_above(v, gate) for k, v in scores.items() if not k.startswith("harmful")}
        needed[m] = {"gate": gate, "opens": opens}
        print(
            f"  harmful {m}: tau = {gate:+.3f} opens on "
            + ", ".join(f"{k} {_pct(v)}" for k, v in opens.items())
        )

    print(f"\n({time.perf_counter() - started:.0f} s)")
    if args.json:
        out = {
            "policy": bundle.ref,
            "layer": bundle.layer,
            "tau": tau,
            "split": args.split,
            "scores": scores,
            "auroc": separation,
            "sweep": {f"{t:.4f}": row for t, row in sweep.items()},
            "recall": args.recall,
            "gate_for_recall": needed,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
