"""``guardrail calibrate``: a policy bundle from text-only prompt sets and neutral media."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from guardrail.cli.common import EXIT_OK, csv_of, load_model, model_args, positive_int, print_json
from guardrail.errors import GuardrailError

RECENTER_ACTIVATION_CHOICES: dict[str, bool | str] = {
    "score-only": False,
    "steered": "steered",
    "always": True,
}


def cmd_calibrate(args: argparse.Namespace) -> int:
    from guardrail.calibration.calibrate import CalibrationTargets, calibrate
    from guardrail.calibration.neutral import NeutralMedia
    from guardrail.datasets import load_prompts

    # Inputs are checked before the (slow) model load.
    for source in (args.harmful, args.harmless):
        load_prompts(source)
    out = Path(args.out)
    if (out / "manifest.json").exists() and not args.overwrite:
        raise GuardrailError(
            f"{out} already holds a policy bundle; released versions are immutable, so write "
            "the recalibration as a new version (--version X.Y.Z --out .../X.Y.Z), or pass "
            "--overwrite for a bundle that was never released"
        )
    model, processor = load_model(args)
    targets = CalibrationTargets(
        benign_trigger_rate=args.trigger_rate,
        per_modality_gates=args.per_modality_gates,
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
        from guardrail.calibration.report import write_report

        write_report(bundle, args.report)
    summary = {
        "policy": bundle.ref,
        "path": str(path),
        "layer": bundle.layer,
        "parameters": bundle.parameters.model_dump(),
        "report": args.report,
    }
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {bundle!r} to {path}")
        if args.report:
            print(f"report: {args.report}")
    return EXIT_OK


def add_parser(sub: Any) -> None:
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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a bundle already at --out (never a release)",
    )
    p.add_argument("--name", default="policy")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--report", help="write the HTML calibration report here")
    p.add_argument("--modalities", help="comma-separated, default: all the model supports")
    p.add_argument(
        "--layers",
        type=csv_of(int, "layer indices"),
        help="comma-separated candidate layers (default: 20-80 %% of depth)",
    )
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-validation", type=positive_int, default=64)
    p.add_argument(
        "--trigger-rate", type=float, default=0.02, help="target benign gate trigger rate"
    )
    p.add_argument(
        "--per-modality-gates",
        action="store_true",
        help="one gate per input modality, each from its own benign sets (tau_modalities)",
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
        type=csv_of(float, "numbers"),
        default=[1.0, 2.0, 4.0],
        help="comma-separated lam values to grid",
    )
    p.add_argument(
        "--kappa-grid",
        type=csv_of(float, "numbers"),
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
