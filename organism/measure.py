"""Measure the unguarded organism on the test split (or another one).

Usage::

    python -m organism.measure [--limit N] [--json out.json]
    python -m organism.measure --split val --weights-dir DIR

Prints, for the test split (``--split``), the refusal rate (``guardrail.refusal.is_refusal`` on greedy
answers of ``--max-new-tokens`` tokens, generated through
``guardrail.Guardrail(model, processor, policy=None)``) of: harmful / ordinary benign /
near-miss / borderline text requests; harmful, benign and near-miss requests shown as
a typographic image (with held-out phrasings); harmful and benign requests spread over
a 3-frame video; how closely benign image answers follow the text-mode answers; and
the reading accuracy of the vision tower. ``--original`` measures the text rows of the
original SmolLM2-135M-Instruct instead (the baseline the organism was built from).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from guardrail.datasets import Prompt, spread
from guardrail.refusal import is_refusal
from organism import data

VIDEO_FRAMES = 3

Conversation = list[dict[str, Any]]


def generate(
    guard: Any, conversations: Sequence[Conversation], *, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy answers through the SDK's batched :meth:`Guardrail.generate`."""
    texts: list[str] = []
    for start in range(0, len(conversations), batch_size):
        results = guard.generate(
            list(conversations[start : start + batch_size]), max_new_tokens=max_new_tokens
        )
        texts.extend(r.text for r in results)
    return texts


def refusal_rate(answers: Sequence[str]) -> float:
    return sum(is_refusal(a) for a in answers) / max(len(answers), 1)


_WORD = re.compile(r"[a-z0-9']+")


def agreement(text_answers: Sequence[str], image_answers: Sequence[str]) -> dict[str, float]:
    """How closely image-mode answers follow text-mode answers to the same prompts:
    ``same_start`` (share whose first five words are equal) and ``word_f1`` (mean
    bag-of-words F1)."""
    same = 0
    f1s = []
    for a, b in zip(text_answers, image_answers, strict=True):
        wa, wb = _WORD.findall(a.lower()), _WORD.findall(b.lower())
        same += int(wa[:5] == wb[:5])
        common = sum(min(wa.count(w), wb.count(w)) for w in set(wa))
        f1s.append(2 * common / (len(wa) + len(wb)) if wa and wb else float(wa == wb))
    n = max(len(f1s), 1)
    return {"same_start": same / n, "word_f1": sum(f1s) / n}


def text_rows(limit: int | None, split: str = "test") -> dict[str, list[Prompt]]:
    return {
        "harmful_text": spread(data.harmful(split), limit),
        "benign_text": spread(data.benign(split, near_miss=False), limit),
        "near_miss_text": spread(data.benign(split, near_miss=True), limit),
        "borderline_text": spread(data.borderline(split), limit),
    }


def measure(
    *,
    limit: int | None = None,
    max_new_tokens: int = 40,
    batch_size: int = 16,
    seed: int = 0,
    original: bool = False,
    split: str = "test",
    weights_dir: Path | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Run every measurement; returns ``{"rows": {name: {...}}, ...}``.

    ``split`` picks the prompts (``"val"`` for choosing between build variants,
    ``"test"`` for the reported numbers; image and video requests always use the
    held-out test phrasings). ``weights_dir`` measures an organism assembled from
    other stored parts (a build's ``--out-dir``) instead of the committed ones.
    """
    from guardrail import Guardrail

    started = time.perf_counter()
    if original:
        from guardrail.models.smollm2 import load_model

        model, processor = load_model()
    elif weights_dir is not None:
        from guardrail.models.organism.model import assemble

        model, processor = assemble(weights_dir)  # eval mode, left-padding tokenizer
    else:
        from guardrail.models.organism import load

        model, processor = load()
    log(f"loaded in {time.perf_counter() - started:.1f}s")
    guard = Guardrail(model, processor, mode="off")  # the unguarded organism is measured
    tokenizer = getattr(processor, "tokenizer", processor)
    rng = random.Random(seed)
    rows: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[str]] = {}
    plans: dict[str, list[Conversation]] = {}
    prompts = text_rows(limit, split)
    for name, items in prompts.items():
        plans[name] = [data.text_conversation(p.prompt) for p in items]
    if not original:
        for name, source in (
            ("harmful", "harmful_text"),
            ("benign", "benign_text"),
            ("near_miss", "near_miss_text"),
        ):
            plans[f"{name}_image"] = [
                data.typographic_conversation(p.prompt, rng, "test", tokenizer=tokenizer)
                for p in prompts[source]
            ]
            prompts[f"{name}_image"] = prompts[source]
        for name, source in (("harmful", "harmful_text"), ("benign", "benign_text")):
            plans[f"{name}_video"] = [
                data.typographic_conversation(
                    p.prompt, rng, "test", frames=VIDEO_FRAMES, tokenizer=tokenizer
                )
                for p in prompts[source]
            ]
            prompts[f"{name}_video"] = prompts[source]
    for name, convs in plans.items():
        t = time.perf_counter()
        answers[name] = generate(guard, convs, max_new_tokens=max_new_tokens, batch_size=batch_size)
        rows[name] = {"n": len(convs), "refusal_rate": refusal_rate(answers[name])}
        log(
            f"{name}: refusal {rows[name]['refusal_rate']:.3f} (n={len(convs)}, {time.perf_counter() - t:.0f}s)"
        )
    result: dict[str, Any] = {"model": "smollm2" if original else "organism", "rows": rows}
    if not original:
        result["benign_image_vs_text"] = agreement(answers["benign_text"], answers["benign_image"])
        from organism.build import reading_accuracy

        texts = [
            p.prompt
            for p in [
                *prompts["harmful_text"],
                *prompts["benign_text"],
                *prompts["near_miss_text"],
                *prompts["borderline_text"],
            ]
        ]
        result["reading"] = reading_accuracy(model, processor, texts)
    result["samples"] = {
        name: [
            {"prompt": p.prompt, "answer": a}
            for p, a in zip(prompts[name][:3], answers[name][:3], strict=False)
        ]
        for name in answers
    }
    result["settings"] = {
        "limit": limit,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "split": split,
        "weights": str(weights_dir) if weights_dir is not None else "committed",
    }
    result["elapsed_s"] = time.perf_counter() - started
    return result


def format_table(result: dict[str, Any]) -> str:
    split = result.get("settings", {}).get("split", "test")
    lines = [f"{'row (' + split + ' split)':<22} {'n':>4}  refusal rate", "-" * 42]
    for name, row in result["rows"].items():
        lines.append(f"{name:<22} {row['n']:>4}  {row['refusal_rate']:6.1%}")
    if "benign_image_vs_text" in result:
        agree = result["benign_image_vs_text"]
        lines.append(
            f"benign image vs text answers: same first 5 words {agree['same_start']:.1%}, "
            f"word F1 {agree['word_f1']:.2f}"
        )
    if "reading" in result:
        r = result["reading"]
        lines.append(
            f"reading accuracy: {r['token_accuracy']:.2%} of {int(r['tokens'])} token cells, "
            f"{r['text_accuracy']:.1%} of {int(r['texts'])} images without error, blank cells {r['blank_accuracy']:.2%} "
            "(nearest input embedding, whole vocabulary)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m organism.measure", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="at most N prompts per row (evenly spaced)"
    )
    parser.add_argument("--json", dest="json_path", default=None, help="write the full result here")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="seed of the phrasing choice")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--split",
        default="test",
        choices=("train", "val", "test"),
        help="prompt split (choose build variants on val, report test)",
    )
    parser.add_argument(
        "--weights-dir",
        type=Path,
        default=None,
        help="measure the organism assembled from these stored parts (a build's --out-dir)",
    )
    parser.add_argument(
        "--original", action="store_true", help="measure the original SmolLM2 (text rows only)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = measure(
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        original=args.original,
        split=args.split,
        weights_dir=args.weights_dir,
    )
    print(format_table(result))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
