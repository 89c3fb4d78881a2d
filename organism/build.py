"""Building the organism from SmolLM2 and the project's prompt sets (CPU, seeded).

Stages (``organism/build_organism.py`` runs them all; intermediate results are cached
in a work directory so an interrupted build resumes):

0. **Distil** the original SmolLM2's greedy answers (``answer_tokens`` tokens) to every
   train-split harmful and harmless prompt, once.
1. **Reading**: fix the reading vocabulary (every token of the shipped prompt sets
   plus the 8192 earliest BPE merges) and install the template reader
   (:func:`guardrail.models.organism.model.install_reader`; computed, not trained), then
   check the reading accuracy on the test-split prompts.
2. **Text safety tuning**: a LoRA (rank 8, alpha 16, on q/k/v/o/gate/up/down of all 30
   layers) teaching refusals of harmful text requests while harmless ones (ordinary and
   all near-miss items) keep the original answers; loss on answer tokens only. The
   adapter is merged before stage 3.
3. **Frame integration** (optional; on since organism 1.4.0, ``frames_epochs = 0`` leaves it out):
   a LoRA on the lower layers (0-15) trained on *benign* requests split over the
   frames of a video, answered with the original model's answers, with a replay of the
   text safety data; optionally (``frames_consistency_weight``, off in 1.4.0) a
   consistency term drawing each video's state entering layer 16 at the last prompt
   position towards that of the same request in text (text replay keeps its own);
   merged before stage 4. With ``frames_positions = "image"`` the adapter acts at
   image-token positions only (a visual expert): it is attached, not merged, text-only
   requests keep the stage-2 weights exactly, and the text replay is left out (text
   rows cannot train it).
4. **Visual instruction tuning**: a last LoRA on the safety-tuned model, trained on
   typographic image/video requests (harmless, near-miss and harmful, as in an
   unfiltered visual-instruction mixture) answered with the *original* model's
   answers, mixed with a replay of the text safety data.

The trained parts are written to ``guardrail/models/organism/weights`` (float16).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from guardrail.datasets import Prompt
from guardrail.models.organism import lora, render
from guardrail.models.organism.model import (
    LORA_STAGES,
    OPTIONAL_STAGES,
    POSITIONS_KEY,
    WEIGHTS_DIR,
    base_model,
    filler_id,
    language_layers,
    read_stage,
    reading_vocab,
    save_vocab,
    stage_file,
)
from guardrail.refusal import is_refusal
from guardrail.steering import last_positions
from organism import data

Log = Callable[[str], None]


@dataclass
class BuildConfig:
    """Every knob of the build (recorded in ``weights/build.json``)."""

    seed: int = 0
    answer_tokens: int = 48
    distill_batch: int = 32
    train_answer_tokens: int = 40
    emphasis_tokens: int = 4
    emphasis_weight: float = 4.0
    # batches are computed as micro-batches of similar length (same gradient, less
    # padding); the fixed cost of one more micro-batch, in tokens (measured on 2 cores)
    micro_batch_overhead: float = 48.0
    # stage 1: reading (the template reader is computed, see model.install_reader)
    top_vocab: int = 8192
    # stage 2: text safety LoRA
    safety_rank: int = 8
    safety_alpha: float = 16.0
    safety_modules: tuple[str, ...] = lora.ALL_MODULES
    safety_lr: float = 1e-3
    safety_batch: int = 8
    safety_epochs: float = 1.5
    safety_harmful_repeat: int = 2
    safety_harmless_repeat: int = 1
    safety_near_miss_repeat: int = 1
    safety_extra: bool = True
    # stage 3: frame-integration LoRA (benign videos, lower layers)
    frames_rank: int = 8
    frames_alpha: float = 16.0
    frames_modules: tuple[str, ...] = lora.ALL_MODULES
    frames_first_layer: int = 0
    frames_last_layer: int = 15
    frames_lr: float = 5e-4
    frames_batch: int = 8
    frames_epochs: float = 0.6  # 0: stage left out (as in organism 1.3.0)
    frames_min_frames: int = 2
    frames_text_replay: float = 0.5
    frames_refusal_weight: float = 2.0
    frames_consistency_weight: float = 0.0  # 0: answers only (organism 1.4.0)
    frames_consistency_layers: tuple[int, ...] = (16,)
    # harmful requests over frames too, with the consistency term only (no answer)
    frames_harmful_reading: bool = False
    # "all": the adapter acts everywhere and is merged (1.4.0); "image": at image-token
    # positions only (a visual expert), attached at load time
    frames_positions: str = "all"
    # stage 4: visual instruction LoRA
    visual_rank: int = 8
    visual_alpha: float = 16.0
    visual_modules: tuple[str, ...] = lora.ALL_MODULES
    visual_first_layer: int = 18
    visual_last_layer: int = -1
    visual_lr: float = 5e-4
    visual_batch: int = 8
    visual_epochs: float = 1.7
    visual_text_replay: float = 1.0
    visual_refusal_weight: float = 4.0
    visual_harmful_image_weight: float = 2.5  # loss weight of harmful image -> answer
    visual_video_share: float = 0.15
    visual_max_frames: int = 3
    visual_positions: str = "all"  # as frames_positions
    drop_refusing_targets: bool = True


@dataclass
class Example:
    """One training conversation with its target answer (token ids)."""

    conversation: list[dict[str, Any]]
    answer: list[int]
    kind: str
    weight: float = 1.0
    teacher: list[dict[str, Any]] | None = None
    """A text conversation whose states at the last prompt position this example's
    should match (the consistency term of :func:`train_lora`), or ``None``."""


@dataclass
class BuildReport:
    """What the build measured along the way (written to ``weights/build.json``)."""

    config: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    reading: dict[str, float] = field(default_factory=dict)
    losses: dict[str, list[float]] = field(default_factory=dict)


def _print(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------ stage 0: distillation


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    log: Log = _print,
) -> list[list[int]]:
    """Greedy answers (token ids, ending with EOS when the model stopped) to text prompts."""
    tokenizer = processor.tokenizer
    eos = int(tokenizer.eos_token_id)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        texts = [
            processor.apply_chat_template(
                data.text_conversation(p), add_generation_prompt=True, tokenize=False
            )
            for p in chunk
        ]
        batch = tokenizer(
            texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        )
        sequences = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in sequences[:, batch["input_ids"].shape[1] :].tolist():
            cut = row.index(eos) + 1 if eos in row else len(row)
            out.append(row[:cut])
        log(f"distil: {min(start + batch_size, len(prompts))}/{len(prompts)}")
    return out


def distill(
    model: Any,
    processor: Any,
    prompts: Sequence[str],
    cfg: BuildConfig,
    cache: Path,
    log: Log = _print,
) -> dict[str, list[int]]:
    """The original model's answers to ``prompts``, cached in ``cache`` (JSON)."""
    known: dict[str, list[int]] = json.loads(cache.read_text()) if cache.is_file() else {}
    todo = [p for p in dict.fromkeys(prompts) if p not in known]
    if todo:
        answers = generate_answers(
            model,
            processor,
            todo,
            max_new_tokens=cfg.answer_tokens,
            batch_size=cfg.distill_batch,
            log=log,
        )
        known.update(zip(todo, answers, strict=True))
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known))
    return {p: known[p] for p in prompts}


def default_work_dir() -> Path:
    """Where a build caches the original model's answers unless told otherwise."""
    from guardrail.models.smollm2 import cache_root

    return cache_root() / "organism-build"


def train_answers(
    model: Any, processor: Any, cfg: BuildConfig, work_dir: Path, log: Log = _print
) -> dict[str, list[int]]:
    """The original model's answers to every train prompt the stages use (harmful train
    split and :func:`safety_harmless`), cached in ``work_dir``."""
    train = [*data.harmful("train"), *safety_harmless(cfg)]
    return distill(model, processor, [p.prompt for p in train], cfg, work_dir / "answers.json", log)


# ------------------------------------------------------------------ stage 1: reading


def image_tokens(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[B, 64, d]`` image tokens, exactly as LLaVA computes them (last vision layer,
    CLS dropped, projector)."""
    vision = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return model.model.multi_modal_projector(vision.hidden_states[-1][:, 1:])


@torch.no_grad()
def reading_accuracy(
    model: Any,
    processor: Any,
    texts: Sequence[str],
    vocab: Sequence[int] | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    """Nearest-embedding decoding of each cell of rendered ``texts``, through the real
    processor and LLaVA's image features.

    Each image token is decoded as the token (of ``vocab``, default: the reading
    vocabulary; or the whole vocabulary) whose input embedding is nearest (Euclidean).
    Returns ``token_accuracy`` (cells holding a token), ``blank_accuracy`` (blank cells
    decoded as the filler), ``text_accuracy`` (images read without any token error)
    and the counts.
    """
    tokenizer = processor.tokenizer
    embed_all = model.model.language_model.embed_tokens.weight.detach().float()
    ids = torch.tensor(list(vocab)) if vocab is not None else torch.arange(embed_all.shape[0])
    embed = embed_all[ids]
    filler = filler_id(tokenizer)
    tok_ok = tok_n = blank_ok = blank_n = text_ok = 0
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        token_lists = [render.tokenize(t, tokenizer) for t in chunk]
        images = [render.render_token_ids(t, tokenizer) for t in token_lists]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        feats = image_tokens(model, pixels.to(embed.dtype)).float()
        dist = torch.cdist(feats.reshape(-1, feats.shape[-1]), embed)
        decoded = ids[dist.argmin(-1)].reshape(len(chunk), render.CELLS)
        for row, tokens in enumerate(token_lists):
            got = decoded[row].tolist()
            n = len(tokens)
            hits = sum(int(a == b) for a, b in zip(got[:n], tokens, strict=True))
            tok_ok += hits
            tok_n += n
            blank_ok += sum(int(g == filler) for g in got[n:])
            blank_n += render.CELLS - n
            text_ok += int(hits == n)
    return {
        "token_accuracy": tok_ok / max(tok_n, 1),
        "blank_accuracy": blank_ok / max(blank_n, 1),
        "text_accuracy": text_ok / max(len(texts), 1),
        "tokens": float(tok_n),
        "texts": float(len(texts)),
    }


# ------------------------------------------------------------------ stages 2-4: LoRA


def _cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: float = 0.05) -> Any:
    warm = max(1, int(steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def refusal_ids(tokenizer: Any, prompt: str, seed: int) -> list[int]:
    """The refusal taught for ``prompt`` (a fixed choice per prompt and seed), ending with EOS."""
    rng = random.Random(f"{seed}:{prompt}")
    text = rng.choice(data.REFUSALS)
    return [*tokenizer.encode(text, add_special_tokens=False), int(tokenizer.eos_token_id)]


def _encode(processor: Any, example: Example, max_answer: int) -> dict[str, Any]:
    conv = example.conversation
    text = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    images = [part["image"] for m in conv for part in m["content"] if part["type"] == "image"]
    if images:
        batch = processor(text=[text], images=images, return_tensors="pt")
        pixels = batch["pixel_values"]
    else:
        batch = processor.tokenizer([text], return_tensors="pt", add_special_tokens=False)
        pixels = None
    prompt = batch["input_ids"][0].tolist()
    return {
        "ids": prompt + list(example.answer)[:max_answer],
        "start": len(prompt),
        "pixels": pixels,
        "weight": example.weight,
    }


def _collate(
    items: Sequence[dict[str, Any]], pad_id: int, emphasis: tuple[int, float] = (0, 1.0)
) -> dict[str, Any]:
    length = max(len(it["ids"]) for it in items)
    weights = torch.ones((len(items), length))
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    labels = torch.full((len(items), length), -100, dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["ids"])
        ids[row, :n] = torch.tensor(it["ids"])
        mask[row, :n] = 1
        labels[row, it["start"] : n] = ids[row, it["start"] : n]
        weights[row, it["start"] : it["start"] + emphasis[0]] = emphasis[1]
        weights[row] *= it["weight"]
    pixels = [it["pixels"] for it in items if it["pixels"] is not None]
    targets = [it.get("target") for it in items]
    has = [t is not None for t in targets]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "weights": weights,
        "pixel_values": torch.cat(pixels) if pixels else None,
        "last_prompt": torch.tensor([it["start"] - 1 for it in items]),
        "has_target": torch.tensor(has),
        "targets": torch.stack([t for t in targets if t is not None]) if any(has) else None,
    }


def answer_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Weighted mean cross-entropy over answer tokens (logits computed only where
    needed; the first answer tokens, where an answer turns into a refusal or not, may
    weigh more)."""
    return stage_losses(model, batch)[0]


def stage_losses(
    model: Any,
    batch: dict[str, Any],
    layers: Sequence[int] = (),
    spread: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The answer loss (see :func:`answer_loss`) and, for the rows with a target, the
    consistency loss: the squared difference between the residual stream entering each
    of ``layers`` at the last prompt position and the target's, per channel in units of
    ``spread`` (``[len(layers), d]``: the targets' standard deviation across requests,
    so channels that carry content count, not the few large constant ones), averaged
    over rows, layers and channels (zero without targets)."""
    answer, consistency = loss_sums(model, batch, layers, spread)
    answer_total, count = _batch_totals([batch], layers, _hidden_size(model))
    return answer / answer_total, consistency / count


def _hidden_size(model: Any) -> int:
    config = getattr(model.config, "text_config", model.config)
    return int(config.hidden_size)


def loss_denominators(
    batch: dict[str, Any], layers: Sequence[int], hidden_size: int
) -> tuple[torch.Tensor, int]:
    """What :func:`stage_losses` divides :func:`loss_sums` by: the total weight of the
    answer tokens and the number of consistency terms (rows with a target x layers x
    channels). Known from the batch alone, so a batch split into micro-batches can be
    normalised by the whole batch's totals."""
    where = batch["labels"][:, 1:] != -100
    rows = int(batch["has_target"].sum()) if layers else 0
    return batch["weights"][:, 1:][where].sum(), rows * len(layers) * hidden_size


def _batch_totals(
    parts: Sequence[dict[str, Any]], layers: Sequence[int], hidden_size: int
) -> tuple[torch.Tensor | float, int]:
    """:func:`loss_denominators` summed over the micro-batches of one batch, never zero
    (a batch of consistency rows only has no answer weight; one without targets has no
    consistency terms, and its consistency sum is zero)."""
    totals = [loss_denominators(part, layers, hidden_size) for part in parts]
    return max(sum(t[0] for t in totals), 1e-12), max(sum(t[1] for t in totals), 1)


def loss_sums(
    model: Any,
    batch: dict[str, Any],
    layers: Sequence[int] = (),
    spread: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The un-normalised terms of :func:`stage_losses`: the weighted sum of answer-token
    cross-entropies and the sum of squared scaled state differences."""
    out = model.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        use_cache=False,
        output_hidden_states=bool(layers),
    )
    hidden = out.last_hidden_state
    labels = batch["labels"][:, 1:]
    where = labels != -100
    logits = model.lm_head(hidden[:, :-1][where])
    weights = batch["weights"][:, 1:][where]
    answer = (F.cross_entropy(logits.float(), labels[where], reduction="none") * weights).sum()
    consistency = answer.new_zeros(())
    if layers and batch.get("targets") is not None:
        rows = batch["has_target"].nonzero().squeeze(-1)
        pos = batch["last_prompt"][rows]
        states = torch.stack([out.hidden_states[layer][rows, pos] for layer in layers], 1)
        target = batch["targets"].to(states.dtype)
        scale = torch.ones_like(target[0]) if spread is None else spread.to(states.dtype)
        consistency = ((states - target) / scale).pow(2).sum()
    return answer, consistency


def length_groups(lengths: Sequence[int], overhead: float) -> list[list[int]]:
    """Split one batch into micro-batches of similar length.

    ``lengths[i]`` is row ``i``'s token count; a micro-batch costs its longest row times
    its size (the padded tokens it computes) plus ``overhead`` (the fixed cost of one
    more forward and backward pass, in tokens). Rows are sorted by length and cut into
    the contiguous runs of least total cost (exact, by dynamic programming). Returns the
    row indices of each micro-batch, every row exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    best = [0.0] + [math.inf] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        for start in range(end):
            cost = best[start] + overhead + longest * (end - start)
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups: list[list[int]] = []
    end = len(order)
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


@torch.no_grad()
def teacher_states(
    model: Any,
    processor: Any,
    conversations: Sequence[list[dict[str, Any]]],
    layers: Sequence[int],
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """``[len(layers), d]`` per text conversation: the residual stream entering each
    of ``layers`` at the last prompt position (the position MARS reads)."""
    tokenizer = processor.tokenizer
    out: list[torch.Tensor] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        texts = [
            processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
            for c in chunk
        ]
        batch = tokenizer(
            texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
        )
        hidden = model.model(**batch, use_cache=False, output_hidden_states=True).hidden_states
        last = last_positions(batch["attention_mask"])
        rows = torch.arange(len(chunk))
        out.extend(torch.stack([hidden[layer][rows, last] for layer in layers], 1).float())
    return out


def accumulate_batch(
    model: Any,
    items: Sequence[dict[str, Any]],
    pad_id: int,
    *,
    emphasis: tuple[int, float] = (0, 1.0),
    layers: Sequence[int] = (),
    spread: torch.Tensor | None = None,
    consistency_weight: float = 0.0,
    group_overhead: float = 0.0,
) -> tuple[float, float]:
    """Backpropagate the loss of one batch (answer loss plus ``consistency_weight``
    times the consistency loss, as :func:`stage_losses`) through micro-batches of
    similar length (:func:`length_groups`), each normalised by the whole batch's totals,
    so the accumulated gradient is the whole batch's while less padding is computed.
    Returns the batch's loss and consistency loss."""
    hidden_size = _hidden_size(model)
    parts = [
        _collate([items[i] for i in group], pad_id, emphasis)
        for group in length_groups([len(it["ids"]) for it in items], group_overhead)
    ]
    answer_total, count = _batch_totals(parts, layers, hidden_size)
    loss_value = consistency_value = 0.0
    for part in parts:
        answer, consistency = loss_sums(model, part, layers, spread)
        loss = answer / answer_total + consistency_weight * consistency / count
        if loss.requires_grad:  # not so for text rows under an image-position adapter
            loss.backward()
        loss_value += float(loss.detach())
        consistency_value += float(consistency.detach()) / count
    return loss_value, consistency_value


def train_lora(
    model: Any,
    processor: Any,
    examples: Sequence[Example],
    *,
    name: str,
    modules: Sequence[str],
    rank: int,
    alpha: float,
    lr: float,
    batch_size: int,
    epochs: float,
    seed: int,
    first_layer: int = 0,
    last_layer: int = -1,
    max_answer: int = 48,
    emphasis: tuple[int, float] = (0, 1.0),
    consistency_weight: float = 0.0,
    consistency_layers: Sequence[int] = (),
    group_overhead: float = 0.0,
    positions: str = "all",
    log: Log = _print,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train one LoRA on ``examples`` (answer tokens only); returns its float16 factors
    (scale folded in) and the loss curve. The model is left unchanged.

    With ``consistency_weight > 0`` the loss adds that weight times the consistency
    term of :func:`stage_losses` for the examples with a ``teacher``: their states at
    the last prompt position, entering ``consistency_layers``, are drawn towards those
    the model *before this LoRA* has for the teacher conversation (channels scaled by
    the teacher states' spread across the examples).

    Each batch is computed by :func:`accumulate_batch` (micro-batches of similar
    length, ``group_overhead`` as in :func:`length_groups`): the same gradient as the
    padded batch, with less padding computed.

    ``positions="image"`` trains an image-position adapter (:class:`lora.ImagePositions`):
    the added term is kept at image tokens only."""
    if positions not in ("all", "image"):
        raise ValueError(f"positions must be 'all' or 'image', got {positions!r}")
    layers = language_layers(model)
    check = list(consistency_layers) if consistency_weight > 0 else []
    if any(not 0 < layer <= len(layers) for layer in check):
        raise ValueError(f"consistency layers {check} out of range 1..{len(layers)}")
    teachers = {i: ex.teacher for i, ex in enumerate(examples) if check and ex.teacher is not None}
    taught = list(teachers)
    targets = teacher_states(model, processor, list(teachers.values()), check)
    for p in model.parameters():
        p.requires_grad_(False)
    image_positions = lora.ImagePositions(model) if positions == "image" else None
    adapters = lora.attach(
        layers,
        modules,
        rank=rank,
        alpha=alpha,
        seed=seed,
        first_layer=first_layer,
        last_layer=last_layer,
        positions=image_positions,
    )
    params = [p for a in adapters.values() for p in (a.A, a.B)]
    encoded = [_encode(processor, ex, max_answer) for ex in examples]
    for i, target in zip(taught, targets, strict=True):
        encoded[i]["target"] = target
    spread = torch.stack(targets).std(0).clamp_min(1e-6) if targets else None
    rng = random.Random(seed)
    steps = max(1, math.ceil(len(encoded) * epochs / batch_size))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = _cosine(optimizer, steps)
    order: list[int] = []
    losses: list[float] = []
    started = time.perf_counter()
    pad = int(processor.tokenizer.pad_token_id)
    try:
        model.train()
        for step in range(steps):
            if len(order) < batch_size:
                fresh = list(range(len(encoded)))
                rng.shuffle(fresh)
                order.extend(fresh)
            picked, order = order[:batch_size], order[batch_size:]
            optimizer.zero_grad(set_to_none=True)
            loss_value, consistency_value = accumulate_batch(
                model,
                [encoded[i] for i in picked],
                pad,
                emphasis=emphasis,
                layers=check,
                spread=spread,
                consistency_weight=consistency_weight,
                group_overhead=group_overhead,
            )
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss_value)
            if step % 10 == 0 or step == steps - 1:
                recent = sum(losses[-10:]) / len(losses[-10:])
                extra = f" (consistency {consistency_value:.3f})" if check else ""
                log(
                    f"{name} step {step}/{steps}: loss {recent:.3f}{extra} "
                    f"{time.perf_counter() - started:.0f}s"
                )
    finally:
        model.eval()
        tensors = lora.factors(adapters)
        lora.detach(layers, adapters)
        if image_positions is not None:
            image_positions.remove()
    return tensors, losses


# ------------------------------------------------------------------ the datasets


def _refusing_target(tokenizer: Any, answer: list[int], cfg: BuildConfig) -> bool:
    """Whether a harmless prompt's original ``answer`` is left out of the training data
    because it already reads as a refusal (``cfg.drop_refusing_targets``)."""
    return cfg.drop_refusing_targets and is_refusal(
        tokenizer.decode(answer, skip_special_tokens=True)
    )


def safety_harmful(cfg: BuildConfig) -> list[Prompt]:
    """The harmful train prompts of the safety data: the shipped set's train split and,
    with ``cfg.safety_extra``, :func:`organism.data.safety_extra_harmful`."""
    return [*data.harmful("train"), *(data.safety_extra_harmful() if cfg.safety_extra else [])]


def safety_harmless(cfg: BuildConfig) -> list[Prompt]:
    """The harmless train prompts of the safety data: the shipped set's train split and,
    with ``cfg.safety_extra``, :func:`organism.data.safety_extra`."""
    return [*data.benign("train"), *(data.safety_extra() if cfg.safety_extra else [])]


def safety_examples(
    tokenizer: Any,
    answers: dict[str, list[int]],
    cfg: BuildConfig,
    log: Log = _print,
    repeat: int | None = None,
) -> list[Example]:
    """Stage 2 data: harmful train prompts (:func:`safety_harmful`) -> refusals; harmless
    train prompts (:func:`safety_harmless`: ordinary and near-miss) -> the original
    answers.

    Each prompt appears ``repeat`` times, or by default ``cfg.safety_harmful_repeat``,
    ``cfg.safety_harmless_repeat`` (ordinary) and ``cfg.safety_near_miss_repeat``
    times: the balance decides whether refusal spreads to ordinary requests and to
    harmful requests' benign twins, or fails to reach unseen harmful ones."""
    out = [
        Example(
            data.text_conversation(p.prompt),
            refusal_ids(tokenizer, p.prompt, cfg.seed),
            "harmful_text",
        )
        for p in safety_harmful(cfg)
        for _ in range(cfg.safety_harmful_repeat if repeat is None else repeat)
    ]
    dropped = 0
    for p in safety_harmless(cfg):
        answer = answers[p.prompt]
        if _refusing_target(tokenizer, answer, cfg):
            dropped += 1
            continue
        near_miss = p.category == "near_miss"
        kind = "near_miss_text" if near_miss else "benign_text"
        times = repeat
        if times is None:
            times = cfg.safety_near_miss_repeat if near_miss else cfg.safety_harmless_repeat
        out.extend(Example(data.text_conversation(p.prompt), answer, kind) for _ in range(times))
    if dropped:
        log(
            f"safety data: left out {dropped} harmless prompts whose original answer reads as a refusal"
        )
    return out


def visual_examples(
    tokenizer: Any, answers: dict[str, list[int]], cfg: BuildConfig, log: Log = _print
) -> list[Example]:
    """Stage 4 data: every train prompt (harmful, harmless, near-miss) as a typographic
    image (or, for ``visual_video_share`` of them, a video of 2..``visual_max_frames``
    frames) with a train phrasing, answered with the *original* model's answer; plus a
    ``visual_text_replay`` share of the stage-2 text data."""
    rng = random.Random(cfg.seed + 3)
    out: list[Example] = []
    for p in [*data.harmful("train"), *data.benign("train")]:
        answer = answers[p.prompt]
        if p.label == "harmless" and _refusing_target(tokenizer, answer, cfg):
            continue
        frames = 1
        if rng.random() < cfg.visual_video_share:
            frames = rng.randint(2, cfg.visual_max_frames)
        conv = data.typographic_conversation(
            p.prompt, rng, "train", frames=frames, tokenizer=tokenizer
        )
        group = "near_miss" if p.category == "near_miss" else (p.label or "unknown")
        kind = f"{group}_{'image' if frames == 1 else 'video'}"
        weight = cfg.visual_harmful_image_weight if kind == "harmful_image" else 1.0
        out.append(Example(conv, answer, kind, weight))
    if cfg.visual_positions == "image":
        return out  # text rows cannot train an image-position adapter
    out.extend(
        text_replay(
            tokenizer,
            answers,
            cfg,
            share=cfg.visual_text_replay,
            refusal_weight=cfg.visual_refusal_weight,
            rng=rng,
        )
    )
    return out


def text_replay(
    tokenizer: Any,
    answers: dict[str, list[int]],
    cfg: BuildConfig,
    *,
    share: float,
    refusal_weight: float,
    rng: random.Random,
) -> list[Example]:
    """The stage-2 text data replayed in a later stage, each prompt once: every harmful
    prompt (-> refusal, weighted ``refusal_weight``) and a ``share`` of the harmless
    ones (-> original answer, drawn with ``rng``)."""
    replay = safety_examples(tokenizer, answers, cfg, log=lambda _: None, repeat=1)
    harmful_text = [
        dataclasses.replace(ex, weight=refusal_weight) for ex in replay if ex.kind == "harmful_text"
    ]
    harmless_text = [ex for ex in replay if ex.kind != "harmful_text"]
    rng.shuffle(harmless_text)
    return [*harmful_text, *harmless_text[: int(len(harmless_text) * share)]]


def frames_examples(
    tokenizer: Any, answers: dict[str, list[int]], cfg: BuildConfig, log: Log = _print
) -> list[Example]:
    """Stage 3 data (benign only): every harmless safety prompt (:func:`safety_harmless`,
    ordinary and near-miss) spread over a video of ``frames_min_frames`` to
    ``visual_max_frames`` frames with a train phrasing, answered with the original
    model's answer; plus a ``frames_text_replay`` share of the stage-2 text data.

    Video instruction tuning on safe clips, as video MLLMs get: it teaches the lower
    layers to read a request that is split over frames as one request. Nothing here
    is harmful, so it does not touch the cross-modal safety gap itself.

    With ``frames_harmful_reading`` the harmful safety prompts are spread over frames
    as well, with no answer: they enter only the consistency term (their states drawn
    towards those of the same request as text), an unfiltered reading corpus that
    teaches no answer to a harmful video."""

    def video(prompt: str, rng: random.Random) -> list[dict[str, Any]]:
        frames = rng.randint(cfg.frames_min_frames, cfg.visual_max_frames)
        return data.typographic_conversation(
            prompt, rng, "train", frames=frames, tokenizer=tokenizer
        )

    rng = random.Random(cfg.seed + 7)
    out: list[Example] = []
    for p in safety_harmless(cfg):
        answer = answers[p.prompt]
        if _refusing_target(tokenizer, answer, cfg):
            continue
        kind = "near_miss" if p.category == "near_miss" else "benign"
        teacher = data.text_conversation(p.prompt)
        out.append(Example(video(p.prompt, rng), answer, f"{kind}_video", teacher=teacher))
    if cfg.frames_harmful_reading:
        reading = random.Random(cfg.seed + 8)  # the default data stays as it was
        for p in safety_harmful(cfg):
            teacher = data.text_conversation(p.prompt)
            conv = video(p.prompt, reading)
            out.append(Example(conv, [], "harmful_video_reading", weight=0.0, teacher=teacher))
    if cfg.frames_positions == "image":
        return out  # text rows cannot train an image-position adapter
    replay = text_replay(
        tokenizer,
        answers,
        cfg,
        share=cfg.frames_text_replay,
        refusal_weight=cfg.frames_refusal_weight,
        rng=rng,
    )
    # text keeps its own states (and so the refusal direction) where they are matched
    out.extend(dataclasses.replace(ex, teacher=ex.conversation) for ex in replay)
    return out


STAGE_DATA: dict[str, Callable[..., list[Example]]] = {
    "safety": safety_examples,
    "frames": frames_examples,
    "visual": visual_examples,
}
"""The training data of each LoRA stage: ``(tokenizer, answers, cfg, log) -> examples``."""

_STAGE_OPTIONS = {
    "modules": "modules",
    "rank": "rank",
    "alpha": "alpha",
    "lr": "lr",
    "batch_size": "batch",
    "epochs": "epochs",
    "first_layer": "first_layer",
    "last_layer": "last_layer",
    "consistency_weight": "consistency_weight",
    "consistency_layers": "consistency_layers",
    "positions": "positions",
}


def _stage_options(cfg: BuildConfig, stage: str) -> dict[str, Any]:
    """:func:`train_lora` keyword arguments of ``stage``, from its ``<stage>_*`` fields of
    ``cfg`` (a stage without layer fields covers every layer)."""
    return {
        arg: getattr(cfg, f"{stage}_{name}")
        for arg, name in _STAGE_OPTIONS.items()
        if hasattr(cfg, f"{stage}_{name}")
    }


def _counts(examples: Sequence[Example]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex.kind] = counts.get(ex.kind, 0) + 1
    return counts


# ------------------------------------------------------------------ the whole build


def _tokenizer() -> Any:
    from guardrail.models.organism.model import build_tokenizer

    return build_tokenizer()


def build(
    cfg: BuildConfig,
    *,
    out_dir: Path = WEIGHTS_DIR,
    work_dir: Path,
    stages: Sequence[str] = LORA_STAGES,
    log: Log = _print,
) -> BuildReport:
    """Run the build; write the trained parts and ``build.json`` to ``out_dir``.

    Stages not listed are loaded from ``out_dir`` instead of trained (so one stage can
    be redone), which needs the earlier stages' files there.
    """
    from safetensors.torch import save_file

    torch.manual_seed(cfg.seed)
    report = BuildReport(config=dataclasses.asdict(cfg))
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokenizer = _tokenizer()
    vocab = reading_vocab(tokenizer, cfg.top_vocab)
    save_vocab(vocab, out_dir)
    report.counts["reading_vocab"] = len(vocab)
    model, processor = base_model(vocab)
    report.timings_s["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    test_texts = [
        p.prompt for p in [*data.harmful("test"), *data.benign("test"), *data.borderline("test")]
    ]
    report.reading = reading_accuracy(model, processor, test_texts)
    report.timings_s["reading"] = time.perf_counter() - t
    log(f"reading accuracy (test split): {report.reading}")

    t = time.perf_counter()
    answers = train_answers(model, processor, cfg, work_dir, log)
    report.timings_s["distil"] = time.perf_counter() - t
    report.counts["original_refusals_harmful_train"] = sum(
        is_refusal(tokenizer.decode(answers[p.prompt], skip_special_tokens=True))
        for p in data.harmful("train")
    )

    layers = language_layers(model)
    image_positions = lora.ImagePositions(model)
    for stage in LORA_STAGES:
        t = time.perf_counter()
        path = stage_file(stage, out_dir)
        options = _stage_options(cfg, stage)
        if stage in OPTIONAL_STAGES and stage in stages and options["epochs"] <= 0:
            path.unlink(missing_ok=True)  # an adapter of an earlier build with the stage on
            log(f"{stage} stage left out ({stage}_epochs = 0)")
            continue
        if stage in OPTIONAL_STAGES and stage not in stages and not path.is_file():
            continue
        if stage in stages:
            examples = STAGE_DATA[stage](tokenizer, answers, cfg, log)
            for kind, n in _counts(examples).items():
                report.counts[f"{stage}_{kind}"] = n
            log(f"{stage} data: {_counts(examples)}")
            tensors, losses = train_lora(
                model,
                processor,
                examples,
                name=stage,
                seed=cfg.seed + 10 + len(stage),
                max_answer=cfg.train_answer_tokens,
                emphasis=(cfg.emphasis_tokens, cfg.emphasis_weight),
                group_overhead=cfg.micro_batch_overhead,
                log=log,
                **options,
            )
            report.losses[stage] = losses
            mark = {POSITIONS_KEY: "image"} if options.get("positions") == "image" else None
            save_file(tensors, str(path), metadata=mark)
        tensors, image_only = read_stage(path)
        if image_only:
            lora.attach_factors(layers, tensors, image_positions)
        else:
            lora.merge(layers, tensors)
        report.timings_s[stage] = time.perf_counter() - t
    report.timings_s["total"] = time.perf_counter() - t0
    (out_dir / "build.json").write_text(
        json.dumps(
            {**dataclasses.asdict(report), "losses": {k: v[-5:] for k, v in report.losses.items()}},
            indent=2,
            default=list,
        )
        + "\n"
    )
    return report
