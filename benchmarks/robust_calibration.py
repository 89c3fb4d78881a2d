"""Robust calibration on the model organism: options, their ablation, and the
held-out template family (issue 30).

Options, each calibrated from text prompts and neutral content only, at the shipped
policy's layer with the shipped recipe (scripts/calibrate_organism.sh: gate trigger
rate 0.05 per benign set, 48 validation prompts per set, lam 8-64, kappa 1-3, the
re-centred activation written back for steered rows):

- ``baseline``: ``policies/organism/1.0.0`` as shipped (offsets from neutral media).
- ``drawn``: harmless prompts drawn in the ``calibration`` template family
  (guardrail.evaluation.templates) beside the neutral media: each modality's offset
  is the mean of the two, and the drawn validation prompts are a benign set of the gate.
- ``alarming``: the ``alarming`` set's safe train and validation prompts join the
  harmless prompts (harmless data and the gate's trigger-rate objective).
- ``drawn+alarming``: both.
- ``contrast``: the direction from matched pairs as well: the alarming set's unsafe
  train sides join the harmful prompts and its safe train sides the harmless ones
  (text only; pairs that differ in intent, not in alarming words). The validation sets
  and the gate are the shipped recipe's (benchmarks/gate_options.py measured the
  alarming validation prompts in the gate: they shut it on most harmful prompts).

``measure`` generates unguarded and guarded answers (16 tokens, greedy, the claims
benchmark's judge) for harmful prompts drawn in two template families and for benign
sets, and prints refusal rates with 95 % Wilson intervals. On ``--split val`` the
families are ``project`` and ``calibration`` (choosing an option never sees the
held-out layouts); on ``--split test`` they are ``project`` and ``heldout``.

    python benchmarks/robust_calibration.py calibrate --work DIR
    python benchmarks/robust_calibration.py measure --work DIR --split val --out F.json
    python benchmarks/robust_calibration.py measure --work DIR --split test \\
        --policies baseline,drawn --out F.json

Both phases run ``--workers`` processes of ``--threads`` torch threads each. Cost on
this 2-core machine (two options side by side, one thread each): the activation
collection and the unguarded validation pass of one option took 27 minutes before
its layer step; the recipe's grid then evaluates 16 (lam, kappa) points on six
validation sets (``--grid shipped`` keeps the shipped lam and kappa: one point).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHIPPED = ROOT / "policies" / "organism" / "1.0.0"
OPTIONS = ("baseline", "drawn", "alarming", "drawn+alarming", "contrast")
VERSIONS = {  # never released
    "drawn": "0.0.1", "alarming": "0.0.2", "drawn+alarming": "0.0.3", "contrast": "0.0.4",
}
FAMILIES = {"val": ("project", "calibration"), "test": ("project", "heldout")}


# ----------------------------------------------------------------------------- calibrate


def _calibrate(option: str, work: str, threads: int, grid: str) -> str:
    import torch

    from guardrail import PolicyBundle, calibrate
    from guardrail.calibration.calibrate import CalibrationTargets
    from guardrail.calibration.neutral import NeutralMedia
    from guardrail.datasets import load_prompts
    from guardrail.evaluation.rendering import default_renderer
    from guardrail.models.loading import load_model

    torch.set_num_threads(threads)
    shipped = PolicyBundle.from_pretrained(SHIPPED)
    p = shipped.parameters
    model, processor = load_model("organism")
    harmful: Any = "harmful"
    harmless: Any = "harmless"
    if option == "contrast":
        pairs = load_prompts("alarming", split="train")
        harmful = load_prompts("harmful") + [x for x in pairs if x.label == "harmful"]
        harmless = load_prompts("harmless") + [x for x in pairs if x.label == "borderline"]
    if "alarming" in option:
        safe = load_prompts("alarming", split=["train", "val"], label="borderline")
        harmless = load_prompts("harmless") + safe
    drawn = default_renderer("organism", templates="calibration") if "drawn" in option else None
    bundle = calibrate(
        model,
        processor,
        harmful,
        harmless,
        layers=[shipped.layer],
        targets=CalibrationTargets(
            benign_trigger_rate=0.05,
            max_validation=48,
            lam_grid=(p.lam,) if grid == "shipped" else (8.0, 16.0, 32.0, 64.0),
            kappa_grid=(p.kappa,) if grid == "shipped" else (1.0, 1.5, 2.0, 3.0),
            recenter=p.recenter,
            apply_recentering_to_activation=p.apply_recentering_to_activation,
        ),
        name="organism",
        version=VERSIONS[option],
        media=NeutralMedia(seed=0, image_size=(256, 256), video_frames=3),
        drawn=drawn,
        batch_size=8,
        seed=0,
        progress=False,
    )
    out = Path(work) / option
    bundle.save_pretrained(out)
    return f"{option}: {bundle!r}"


def cmd_calibrate(args: argparse.Namespace) -> None:
    options = [o for o in args.options.split(",") if o != "baseline"]
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_calibrate, o, args.work, args.threads, args.grid) for o in options]
        for future in as_completed(futures):
            print(future.result(), f"({time.perf_counter() - STARTED:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- measure

_STATE: dict[str, Any] = {}


@functools.cache
def _sets(split: str, limit: int) -> dict[str, tuple[list[str], str, str]]:
    """name -> (prompts, modality, template family)."""
    from guardrail.datasets import load_prompts, spread

    def take(source: str, **filters: Any) -> list[str]:
        return [p.prompt for p in spread(load_prompts(source, split=split, **filters), limit)]

    harmful = take("harmful")
    benign = take("harmless", exclude_category="near_miss")
    safe = take("alarming", label="borderline")
    sets: dict[str, tuple[list[str], str, str]] = {"harmful text": (harmful, "text", "project")}
    for family in FAMILIES[split]:
        for modality in ("image", "video"):
            sets[f"harmful {modality} ({family})"] = (harmful, modality, family)
    for modality in ("text", "image", "video"):
        sets[f"benign {modality}"] = (benign, modality, "project")
    for modality in ("text", "image"):
        sets[f"alarming {modality}"] = (safe, modality, "project")
    return sets


def _init(work: str, threads: int) -> None:
    import torch

    from guardrail import Guardrail
    from guardrail.models.loading import load_model

    torch.set_num_threads(threads)
    model, processor = load_model("organism")
    _STATE["guard"] = Guardrail(model, processor)
    _STATE["work"] = work


def _job(policy: str, name: str, split: str, limit: int) -> tuple[str, str, list[bool], list[bool]]:
    from guardrail import PolicyBundle
    from guardrail.evaluation.defaults import BATCH_SIZE, MAX_NEW_TOKENS
    from guardrail.evaluation.evaluate import RefusalJudge
    from guardrail.evaluation.rendering import default_renderer

    guard = _STATE["guard"]
    prompts, modality, family = _sets(split, limit)[name]
    bundle = None
    if policy != "unguarded":
        path = SHIPPED if policy == "baseline" else Path(_STATE["work"]) / policy
        if policy not in OPTIONS:  # a bundle directory, e.g. policies/organism/1.1.0
            path = Path(policy)
        bundle = PolicyBundle.from_pretrained(path, adapter=guard.adapter)
    renderer = default_renderer("organism", templates=family)
    convs = []
    for p in prompts:
        if modality == "text":
            content: Any = p
        else:
            content = renderer.image(p) if modality == "image" else renderer.video(p)
        convs.append([{"role": "user", "content": content}])
    judge = RefusalJudge()
    refused, opened = [], []
    for start in range(0, len(convs), BATCH_SIZE):
        chunk = convs[start : start + BATCH_SIZE]
        if bundle is None:
            results = guard.generate(chunk, mode="off", max_new_tokens=MAX_NEW_TOKENS)
        else:
            results = guard.generate(chunk, policy=bundle, max_new_tokens=MAX_NEW_TOKENS)
        for prompt, result in zip(prompts[start : start + BATCH_SIZE], results, strict=True):
            refused.append(bool(judge(prompt, result)))
            opened.append(bool(result.intervened))
    return policy, name, refused, opened


def cmd_measure(args: argparse.Namespace) -> None:
    from guardrail.calibration.metrics import wilson_interval

    policies = ["unguarded", *args.policies.split(",")]
    names = list(_sets(args.split, args.limit))
    jobs = [(p, n) for p in policies for n in names]
    # media jobs first: they are the long ones, and the pool then ends evenly
    jobs.sort(key=lambda j: "text" in j[1])
    done: dict[tuple[str, str], tuple[list[bool], list[bool]]] = {}
    with ProcessPoolExecutor(
        args.workers, mp_context=get_context("spawn"), initializer=_init,
        initargs=(args.work, args.threads),
    ) as pool:
        futures = [pool.submit(_job, p, n, args.split, args.limit) for p, n in jobs]
        for future in as_completed(futures):
            policy, name, refused, opened = future.result()
            done[(policy, name)] = (refused, opened)
            if len(done) % 10 == 0 or len(done) == len(jobs):
                print(f"  {len(done)}/{len(jobs)} jobs ({time.perf_counter() - STARTED:.0f} s)",
                      file=sys.stderr, flush=True)
    table: dict[str, dict[str, Any]] = {}
    for policy in policies:
        table[policy] = {}
        for name in names:
            refused, opened = done[(policy, name)]
            k, n = sum(refused), len(refused)
            low, high = wilson_interval(k, n)
            table[policy][name] = {"refused": k / n, "n": n, "low": low, "high": high,
                                   "gate_opened": sum(opened) / n}
    lines = [f"Refusal on the {args.split} split ({args.limit} prompts per set at most; "
             "95 % Wilson intervals; gate-opening rate in brackets)", "",
             "| set | " + " | ".join(policies) + " |", "|---|" + "---:|" * len(policies)]
    for name in names:
        cells = []
        for policy in policies:
            r = table[policy][name]
            gate = "" if policy == "unguarded" else f" [{r['gate_opened'] * 100:.0f}]"
            cells.append(f"{r['refused'] * 100:.0f}% ({r['low'] * 100:.0f}-{r['high'] * 100:.0f}){gate}")
        lines.append(f"| {name} (n={table['unguarded'][name]['n']}) | " + " | ".join(cells) + " |")
    lines.append(f"\n({time.perf_counter() - STARTED:.0f} s on this machine, "
                 f"{args.workers} workers x {args.threads} threads)")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"split": args.split, "limit": args.limit,
                                              "table": table, "markdown": lines}, indent=2))


STARTED = time.perf_counter()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    cal = sub.add_parser("calibrate")
    cal.add_argument("--options", default=",".join(OPTIONS))
    cal.add_argument("--grid", choices=("recipe", "shipped"), default="recipe",
                     help="the recipe's lam/kappa grid, or the shipped policy's lam and kappa only")
    mea = sub.add_parser("measure")
    mea.add_argument("--split", choices=sorted(FAMILIES), default="val")
    mea.add_argument("--policies", default=",".join(OPTIONS),
                     help="options calibrated under --work, or bundle directories")
    mea.add_argument("--limit", type=int, default=48, help="prompts per set, evenly spread")
    mea.add_argument("--out")
    for p in (cal, mea):
        p.add_argument("--work", required=True, help="directory of the options' bundles")
        p.add_argument("--workers", type=int, default=2)
        p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    asked = getattr(args, "options", getattr(args, "policies", "")).split(",")
    unknown = {a for a in asked if a not in OPTIONS and not (args.phase == "measure" and Path(a).is_dir())}
    if unknown:
        parser.error(f"unknown options {sorted(unknown)}; use {', '.join(OPTIONS)} (measure: "
                     "or a bundle directory)")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    (cmd_calibrate if args.phase == "calibrate" else cmd_measure)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
