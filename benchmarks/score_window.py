"""Does scoring the mean of the last k prompt positions separate better than t* alone?

The method's window option (``score_positions``), measured on the model organism: for
each ``k``, the statistics are taken over the calibration train data the way
``guardrail calibrate`` takes them (harmful and harmless text; the harmless prompts
again with neutral images and videos, for the re-centring offsets), then validation
requests are scored with the re-centred rule. Per modality - text (ordinary and
near-miss benign), typographic images, and videos whose instruction is split across
frames - the tables print the AUROC of harmful against benign requests and the mean
score of the harmful requests minus that of the benign ones (in units of the text
gap ``g``). A last row pairs harmful videos with near-miss text, each re-centred for
its own modality: one gate has to open on the first and stay shut on the second.
One forward pass per request collects every window.

    python benchmarks/score_window.py [--windows 1,2,3,6] [--layers 18] [--limit 96]

``--blank-token TEXT`` (a diagnostic) re-installs the organism's reader so that blank
cells read as that single token instead of the space the organism is built with: a
split-frame video puts dozens of blank cells between the pieces of its instruction.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from guardrail.adapters import ModelAdapter  # noqa: E402
from guardrail.calibration.calibrate import collect_window_examples  # noqa: E402
from guardrail.calibration.metrics import auroc  # noqa: E402
from guardrail.calibration.neutral import NeutralMedia, neutral_media  # noqa: E402
from guardrail.datasets import Prompt, spread  # noqa: E402
from guardrail.messages import Conversation, parse_conversation  # noqa: E402
from organism import data  # noqa: E402

# (harmful row, benign row); each row is re-centred for its own modality (its last word),
# so a cross-modal pair asks what one gate must do: open on the one, not on the other
ROWS = (
    ("harmful text", "benign text"),
    ("harmful text", "near-miss text"),
    ("harmful image", "benign image"),
    ("harmful video", "benign video"),
    ("harmful video", "near-miss text"),
)


def _scores(
    h: torch.Tensor,
    means: dict[str, dict[tuple[int, int], torch.Tensor]],
    key: tuple[int, int],
    modality: str,
) -> list[float]:
    """The re-centred MARS score ``s`` of activations ``h`` with the statistics at ``key``."""
    mu_S = means["harmless"][key]
    r = means["harmful"][key] - mu_S
    if modality != "text":
        h = h - (means[modality][key] - mu_S)
    return (((h - mu_S) @ r) / (r @ r)).tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", default="1,2,3,6", help="comma-separated k values")
    ap.add_argument("--layers", default="18", help="comma-separated layers")
    ap.add_argument("--limit", type=int, default=96, help="train prompts per calibration set")
    ap.add_argument("--val-limit", type=int, default=0, help="validation prompts per row (0: all)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", help="also write the table here")
    ap.add_argument("--blank-token", help="read blank cells as this single token (diagnostic)")
    ap.add_argument(
        "--weights-dir", type=Path, help="an organism built elsewhere (default: the committed one)"
    )
    args = ap.parse_args(argv)
    windows = [int(k) for k in args.windows.split(",")]
    layers = [int(x) for x in args.layers.split(",")]
    started = time.perf_counter()

    from guardrail.models import organism

    if args.weights_dir is not None:
        from guardrail.models.organism.model import assemble

        model, processor = assemble(args.weights_dir)
    else:
        model, processor = organism.load()
    adapter = ModelAdapter(model, processor)
    tokenizer = processor.tokenizer
    if args.blank_token is not None:
        from guardrail.models.organism.model import install_reader, load_vocab

        blank = tokenizer.encode(args.blank_token, add_special_tokens=False)
        if len(blank) != 1:
            ap.error(f"--blank-token {args.blank_token!r} is {len(blank)} tokens; give one token")
        install_reader(model, tokenizer, load_vocab(), blank=blank[0])
    media = NeutralMedia(seed=0, image_size=(256, 256), video_frames=3)

    def text(prompt: str) -> Conversation:
        return parse_conversation(data.text_conversation(prompt))

    def neutral(prompt: str, modality: str, index: int) -> Conversation:
        rng = random.Random(f"window:{modality}:{index}")
        part = neutral_media(modality, rng, media)
        return parse_conversation(
            [{"role": "user", "content": [part, {"type": "text", "text": prompt}]}]
        )

    harmful_train = [p.prompt for p in spread(data.harmful("train"), args.limit)]
    harmless_train = [p.prompt for p in spread(data.benign("train"), args.limit)]
    train = {
        "harmful": [text(p) for p in harmful_train],
        "harmless": [text(p) for p in harmless_train],
        **{m: [neutral(p, m, i) for i, p in enumerate(harmless_train)] for m in ("image", "video")},
    }
    rng = random.Random(1)

    def val_split(prompts: list[Prompt]) -> list[str]:
        return [p.prompt for p in (spread(prompts, args.val_limit) if args.val_limit else prompts)]

    harmful_val = val_split(data.harmful("val"))
    benign_val = val_split(data.benign("val", near_miss=False))

    def typographic(prompt: str, frames: int) -> Conversation:
        return parse_conversation(
            data.typographic_conversation(prompt, rng, "test", frames=frames, tokenizer=tokenizer)
        )

    val = {
        "harmful text": [text(p) for p in harmful_val],
        "benign text": [text(p) for p in benign_val],
        "near-miss text": [text(p) for p in val_split(data.benign("val", near_miss=True))],
        "harmful image": [typographic(p, 1) for p in harmful_val],
        "benign image": [typographic(p, 1) for p in benign_val],
        "harmful video": [typographic(p, 3) for p in harmful_val],
        "benign video": [typographic(p, 3) for p in benign_val],
    }
    means = {
        name: {
            key: acts.mean(0)
            for key, acts in collect_window_examples(
                adapter, convs, layers, windows, batch_size=args.batch_size
            ).items()
        }
        for name, convs in train.items()
    }
    acts = {
        name: collect_window_examples(adapter, convs, layers, windows, batch_size=args.batch_size)
        for name, convs in val.items()
    }

    table = []
    print(f"{'layer':>5} {'k':>3}  " + "  ".join(f"{h} vs {b}" for h, b in ROWS))
    for layer in layers:
        for k in windows:
            key = (layer, k)
            row = {"layer": layer, "k": k}
            for pos, neg in ROWS:
                high = _scores(acts[pos][key], means, key, pos.split()[-1])
                low = _scores(acts[neg][key], means, key, neg.split()[-1])
                row[f"{pos} vs {neg}"] = round(auroc(high, low), 3)
                gap = sum(high) / len(high) - sum(low) / len(low)
                row[f"{pos} vs {neg} mean score gap"] = round(gap, 3)
            table.append(row)
            values = "  ".join(f"{row[f'{h} vs {b}']:>{len(h) + len(b) + 4}.3f}" for h, b in ROWS)
            print(f"{layer:>5} {k:>3}  {values}")
    print("\nmean score of harmful minus benign requests (in units of the text gap g):")
    for row in table:
        values = "  ".join(
            f"{row[f'{h} vs {b} mean score gap']:>{len(h) + len(b) + 4}.3f}" for h, b in ROWS
        )
        print(f"{row['layer']:>5} {row['k']:>3}  {values}")
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
