"""Gate options for the organism, compared offline on per-prompt scores (issue 30 item 3).

With the shipped strength (lam 64, kappa 1) the push nearly always turns an opened
gate into a refusal, so where the gate opens decides recall and over-refusal. This
script measures that directly and cheaply: one forward pass per prompt (no
generation), activations at several layers kept on disk, then every option's
statistics, offsets and gates are computed from them in seconds.

``collect`` stores, for the calibration recipe's train and validation sets (text
prompts, neutral media, harmless prompts drawn in the ``calibration`` template
family, the safe-but-alarming set) and for ``robust_calibration.py measure``'s sets
on the validation and test splits, the residual stream entering each layer at ``t*``.

``analyze`` builds each option from the train and validation sets only (the
method's data: text-only harmful prompts, harmless prompts, neutral and drawn
harmless media; never unsafe media) and prints how often its gate opens on the
measured sets of one split, the separation (AUROC) of the score on them, and the
gate trade-off per modality. Options (``OPTIONS``):

- ``shipped``: the recipe as released (``policies/organism/1.0.0``): offsets from
  neutral media, one gate, the highest 95th percentile of the benign validation sets
  (harmless text, harmless text beside neutral images, beside neutral videos);
- ``per-modality``: the same statistics, each modality gated by its own benign sets;
  ``+drawn-gate`` adds the harmless prompts drawn as media (calibration layouts) to
  the image and video gates, ``+alarming-gate`` the alarming set's safe validation
  prompts (as text, and drawn as images);
- ``contrast``: the direction also from the alarming set's matched train pairs (its
  unsafe sides among the harmful prompts, its safe sides among the harmless ones,
  drawn beside neutral media too, as ``calibrate()`` does with them);
- ``two-layer`` / ``layer N``: the score averaged over two layers, or another layer.

The recomputed ``shipped`` statistics are checked against ``policies/organism/1.0.0``,
and ``contrast`` against ``policies/organism/1.1.0`` (its calibration).

    python benchmarks/gate_options.py collect --work DIR [--workers 2]
    python benchmarks/gate_options.py analyze --work DIR --split val
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

LAYERS = (12, 14, 16, 18, 20, 22)
WINDOWS = (2, 4, 8)  # collect --windows: scoring windows (score_positions) at layer 18
WINDOW_LAYERS = (18,)
SHIPPED = ROOT / "policies" / "organism" / "1.0.0"


class _Tail:
    """The items of a calibration set from ``start`` on (each drawn as in the whole set)."""

    def __init__(self, whole: Any, start: int):
        self.whole, self.start, self.modality = whole, start, whole.modality

    def __len__(self) -> int:
        return len(self.whole) - self.start

    def __iter__(self) -> Any:
        return (self.whole.conversation(i) for i in range(self.start, len(self.whole)))


def _calibration_sets() -> dict[str, Any]:
    """name -> _Set, exactly as ``scripts/calibrate_organism.sh`` builds them."""
    from guardrail.calibration.calibrate import _Set, _split
    from guardrail.calibration.neutral import NeutralMedia
    from guardrail.datasets import load_prompts
    from guardrail.evaluation.rendering import default_renderer

    rng = random.Random(0)
    h_train, h_val = _split(load_prompts("harmful"), 0.25, rng, 48)
    s_train, s_val = _split(load_prompts("harmless"), 0.25, rng, 48)
    from guardrail.datasets import spread

    alarming = load_prompts("alarming", label="borderline")
    a_train = [p for p in alarming if p.split == "train"]
    a_val = spread([p for p in alarming if p.split == "val"], 48)
    unsafe = load_prompts("alarming", label="harmful")  # the pairs' unsafe sides (text)
    u_train = [p for p in unsafe if p.split == "train"]
    u_val = spread([p for p in unsafe if p.split == "val"], 48)
    media = NeutralMedia(seed=0, image_size=(256, 256), video_frames=3)
    drawn = default_renderer("organism", templates="calibration")
    sets: dict[str, Any] = {}
    for split, h, s, a, u in (
        ("train", h_train, s_train, a_train, u_train),
        ("val", h_val, s_val, a_val, u_val),
    ):
        sets[f"{split}/harmful"] = _Set("harmful", h, split=split)
        sets[f"{split}/alarming-unsafe"] = _Set("alarming-unsafe", u, split=split)
        sets[f"{split}/harmless"] = _Set("harmless", s, split=split)
        sets[f"{split}/alarming"] = _Set("alarming", a, split=split)
        sets[f"{split}/alarming image+drawn"] = _Set(
            "alarming", a, modality="image", split=split, renderer=drawn
        )
        for m in ("image", "video"):
            sets[f"{split}/{m}"] = _Set(m, s, modality=m, media=media, split=split)
            if split == "train":  # calibrate(harmless=harmless + safe) draws these too
                both = _Set(m, s + a, modality=m, media=media, split=split)
                sets[f"train/alarming {m}"] = _Tail(both, len(s))
            sets[f"{split}/{m}+drawn"] = _Set(m, s, modality=m, split=split, renderer=drawn)
    return sets


def _measure_sets() -> dict[str, Any]:
    """``robust_calibration.py measure``'s sets (48 prompts each) for val and test."""
    from robust_calibration import _sets

    from guardrail.calibration.calibrate import _Set
    from guardrail.datasets import Prompt
    from guardrail.evaluation.rendering import default_renderer

    out: dict[str, Any] = {}
    for split in ("val", "test"):
        for name, (prompts, modality, family) in _sets(split, 48).items():
            items = [Prompt(prompt=p) for p in prompts]
            renderer = None if modality == "text" else default_renderer("organism", templates=family)
            out[f"measure-{split}/{name}"] = _Set(
                name, items, modality=None if modality == "text" else modality,
                split=split, renderer=renderer,
            )
    return out


def all_sets() -> dict[str, Any]:
    return {**_calibration_sets(), **_measure_sets()}


def _collect(names: list[str], threads: int, windows: bool = False) -> dict[str, Any]:
    import torch

    from guardrail.adapters import ModelAdapter
    from guardrail.calibration.calibrate import collect_examples, collect_window_examples
    from guardrail.models.loading import load_model

    torch.set_num_threads(threads)
    model, processor = load_model("organism")
    adapter = ModelAdapter(model, processor)
    sets = all_sets()
    out = {}
    for name in names:
        started = time.perf_counter()
        if windows:  # keys (layer, k): the mean of the last k prompt positions
            acts = collect_window_examples(
                adapter, sets[name], list(WINDOW_LAYERS), WINDOWS, batch_size=8
            )
        else:
            acts = collect_examples(adapter, sets[name], list(LAYERS), batch_size=8)
        out[name] = {key: a.float() for key, a in acts.items()}
        print(f"  {name}: {len(sets[name])} in {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)
    return out


def cmd_collect(args: argparse.Namespace) -> None:
    import torch

    sets = all_sets()
    path = Path(args.work) / ("activations-windows.pt" if args.windows else "activations.pt")
    acts: dict[str, Any] = {}
    if path.exists():  # add the sets not collected yet
        acts = torch.load(path)["acts"]
        sets = {n: s for n, s in sets.items() if n not in acts}
    cost = {n: len(s) * (6 if s.modality == "video" else 2.5 if s.modality else 1)
            for n, s in sets.items()}
    shares: list[list[str]] = [[] for _ in range(args.workers)]
    load = [0.0] * args.workers
    for name in sorted(cost, key=cost.get, reverse=True):  # type: ignore[arg-type]
        i = load.index(min(load))
        shares[i].append(name)
        load[i] += cost[name]
    shares = [share for share in shares if share]
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        for part in pool.map(
            _collect, shares, [args.threads] * len(shares), [args.windows] * len(shares)
        ):
            acts.update(part)
    torch.save({"layers": LAYERS, "acts": acts}, path)
    print(f"{path}: {len(acts)} sets ({time.perf_counter() - STARTED:.0f} s)")


# ----------------------------------------------------------------------------- analyze


def _score(acts: Any, u: Any, p_s: float, g: float, delta: Any) -> list[float]:
    return (((acts.double() - delta) @ u - p_s) / g).tolist()


def _stats(
    acts: dict[str, Any],
    layer: int,
    harmful: list[str],
    harmless: list[str],
    offsets: dict[str, list[str]],
) -> tuple[Any, float, float, dict[str, Any]]:
    """u, p_S, g and per-modality offsets at ``layer`` (the method's definitions)."""

    def mean(names: list[str]) -> Any:
        import torch

        return torch.cat([acts[n][layer].double() for n in names]).mean(0)

    mu_h = mean(harmful)
    mu_s = mean(harmless)
    r = mu_h - mu_s
    u = r / r.norm()
    p_s = float(mu_s @ u)
    g = float(mu_h @ u) - p_s
    deltas = {}
    for m, names in offsets.items():  # the modality's mean over its pooled sets
        deltas[m] = mean(names) - mu_s
    return u, p_s, g, deltas


def _modality(name: str) -> str:
    low = name.lower()
    if "video" in low:
        return "video"
    if "image" in low:
        return "image"
    return "text"


OPTIONS: dict[str, dict[str, Any]] = {
    "shipped": {},
    "per-modality": {"per_modality": True},
    "per-modality +drawn-gate": {"per_modality": True, "drawn_gate": True},
    "per-modality +alarming-gate": {"per_modality": True, "drawn_gate": True, "alarming": True},
    "contrast": {"contrast": True},
    "contrast per-modality": {"contrast": True, "per_modality": True},
    "contrast +drawn-gate": {"contrast": True, "drawn_gate": True},
    "contrast per-modality +drawn-gate": {"contrast": True, "per_modality": True,
                                          "drawn_gate": True},
    "contrast per-modality +alarming-gate": {"contrast": True, "per_modality": True,
                                             "drawn_gate": True, "alarming": True},
    "two-layer 18+16 per-modality +drawn-gate": {"per_modality": True, "drawn_gate": True,
                                                "layers": (18, 16)},
    "layer 16 per-modality +drawn-gate": {"per_modality": True, "drawn_gate": True,
                                         "layers": (16,)},
    "layer 20 per-modality +drawn-gate": {"per_modality": True, "drawn_gate": True,
                                         "layers": (20,)},
}
"""``contrast``: the direction from the harmful prompts and the alarming set's unsafe
train sides against the harmless prompts and its safe sides (matched pairs that differ
in intent, not in alarming words); ``*-gate``: which benign validation sets each
modality's gate holds its trigger rate on."""


class Option:
    """One option's statistics, scores and gates, from the collected activations."""

    def __init__(self, acts: dict[str, Any], opt: dict[str, Any], rate: float = 0.05):
        from guardrail.calibration.metrics import quantile

        self.acts = acts
        self.layers = opt.get("layers", (18,))
        harmful = ["train/harmful"] + (["train/alarming-unsafe"] if opt.get("contrast") else [])
        harmless = ["train/harmless"] + (
            ["train/alarming"] if opt.get("contrast") or opt.get("alarming_mean") else []
        )
        # with the safe prompts among the harmless ones, calibrate() draws them beside
        # neutral media too: each offset is then the mean over both, minus mu_S
        offsets = {
            m: [f"train/{m}"] + ([f"train/alarming {m}"] if opt.get("contrast") else [])
            for m in ("image", "video")
        }
        self.stats = {layer: _stats(acts, layer, harmful, harmless, offsets) for layer in self.layers}
        gate_sets = {
            "text": ["val/harmless"] + (["val/alarming"] if opt.get("alarming") else []),
            "image": ["val/image"] + (["val/image+drawn"] if opt.get("drawn_gate") else [])
            + (["val/alarming image+drawn"] if opt.get("alarming") else []),
            "video": ["val/video"] + (["val/video+drawn"] if opt.get("drawn_gate") else []),
        }
        q = {m: max(quantile(self.scores(n), 1 - rate) for n in names)
             for m, names in gate_sets.items()}
        if not opt.get("per_modality"):
            q = dict.fromkeys(q, max(q.values()))
        self.tau = q

    def scores(self, name: str) -> list[float]:
        import torch

        m = _modality(name.split("/", 1)[1])
        per_layer = []
        for layer in self.layers:
            u, p_s, g, deltas = self.stats[layer]
            delta = deltas.get(m, torch.zeros_like(u))
            per_layer.append(_score(self.acts[name][layer], u, p_s, g, delta))
        return [sum(v) / len(v) for v in zip(*per_layer, strict=True)]

    def opened(self, name: str, tau: float | None = None) -> float:
        from guardrail.calibration.metrics import share_above

        gate = self.tau[_modality(name.split("/", 1)[1])] if tau is None else tau
        return share_above(self.scores(name), gate)


def cmd_analyze(args: argparse.Namespace) -> None:
    import torch

    from guardrail import PolicyBundle
    from guardrail.calibration.metrics import auroc, quantile

    acts = torch.load(Path(args.work) / "activations.pt")["acts"]
    windowed = Path(args.work) / "activations-windows.pt"
    options = dict(OPTIONS)
    if windowed.exists():  # keys (layer, k) beside the t* ones
        for name, keyed in torch.load(windowed)["acts"].items():
            acts.setdefault(name, {}).update(keyed)
        for k in WINDOWS:
            for layer in WINDOW_LAYERS:
                options[f"window {k} (layer {layer})"] = {"layers": ((layer, k),)}
                options[f"contrast window {k} (layer {layer})"] = {
                    "contrast": True, "layers": ((layer, k),)}
    shipped = PolicyBundle.from_pretrained(SHIPPED)
    check = Option(acts, {})
    u, p_s, g, _ = check.stats[18]  # the recomputed statistics are the shipped bundle's
    assert float(u @ shipped.u.double()) > 0.99999, "recomputed direction differs from 1.0.0"
    assert abs(g - shipped.g) < 1e-3 * shipped.g, (g, shipped.g)
    calibrated = ROOT / "policies" / "organism" / "1.1.0"
    if calibrated.exists():  # contrast, as calibrate() built it
        built = PolicyBundle.from_pretrained(calibrated)
        o = Option(acts, OPTIONS["contrast"])
        u, p_s, g, deltas = o.stats[18]
        assert float(u @ built.u.double()) > 0.99999, "contrast direction differs from 1.1.0"
        assert abs(o.tau["text"] - built.parameters.tau) < 1e-3, (o.tau, built.parameters.tau)
        for m in ("image", "video"):
            assert torch.allclose(deltas[m].float(), built.delta(m), atol=1e-3), m
    split = args.split
    measured = [n for n in acts if n.startswith(f"measure-{split}/") and 18 in acts[n]]
    names = sorted((n.split("/", 1)[1] for n in measured), key=lambda n: (_modality(n), n))
    print(f"Gate-opening rate (%) on the {split} split, 48 prompts per set; each option's "
          "statistics and gates from the calibration train/val sets only\n")
    print("| option | tau text/image/video | " + " | ".join(names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for label, opt in options.items():
        o = Option(acts, opt)
        t = o.tau
        print(f"| {label} | {t['text']:.3f}/{t['image']:.3f}/{t['video']:.3f} | "
              + " | ".join(f"{o.opened(f'measure-{split}/{n}') * 100:.0f}" for n in names) + " |")

    fam = "calibration" if split == "val" else "heldout"
    print(f"\nSeparation (AUROC of the score) on the {split} split")
    pairs = [("text", "harmful text", "benign text"), ("text", "harmful text", "alarming text"),
             ("image", "harmful image (project)", "benign image"),
             ("image", "harmful image (project)", "alarming image"),
             ("image", f"harmful image ({fam})", "benign image"),
             ("video", "harmful video (project)", "benign video"),
             ("video", f"harmful video ({fam})", "benign video")]
    print("| option | " + " | ".join(f"{a} vs {b}" for _, a, b in pairs) + " |")
    print("|---|" + "---:|" * len(pairs))
    for label, opt in options.items():
        o = Option(acts, opt)
        cells = [auroc(o.scores(f"measure-{split}/{a}"), o.scores(f"measure-{split}/{b}"))
                 for _, a, b in pairs]
        print(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")

    print(f"\nTrade-off on the {split} split: each modality's gate at a quantile of its "
          "drawn harmless validation set (calibration layouts), option 'shipped' statistics")
    o = Option(acts, {})
    print("| modality | benign rate the gate allows | tau | " + " | ".join(
        n for n in names if _modality(n) != "text") + " |")
    print("|---|---:|---:|" + "---:|" * sum(_modality(n) != "text" for n in names))
    for m in ("image", "video"):
        for rate in (0.0, 0.02, 0.05, 0.1, 0.2, 0.3):
            tau = quantile(o.scores(f"val/{m}+drawn"), 1 - rate)
            cells = [f"{o.opened(f'measure-{split}/{n}', tau) * 100:.0f}" if _modality(n) == m
                     else "" for n in names if _modality(n) != "text"]
            print(f"| {m} | {rate * 100:.0f} % | {tau:.3f} | " + " | ".join(cells) + " |")


STARTED = time.perf_counter()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    col = sub.add_parser("collect")
    col.add_argument("--workers", type=int, default=2)
    col.add_argument("--threads", type=int, default=1)
    col.add_argument("--windows", action="store_true",
                     help=f"collect scoring windows {WINDOWS} at layers {WINDOW_LAYERS}")
    ana = sub.add_parser("analyze")
    ana.add_argument("--split", choices=("val", "test"), default="val")
    for p in (col, ana):
        p.add_argument("--work", required=True)
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    (cmd_collect if args.phase == "collect" else cmd_analyze)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
