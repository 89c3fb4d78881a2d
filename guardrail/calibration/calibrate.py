"""Calibration: from text-only prompt sets to a policy bundle.

What :func:`calibrate` does, following the method:

1. Streams the *train* parts of the harmful set ``H``, the harmless set ``S`` and,
   for every modality ``m`` the model supports, ``S_m`` (the harmless prompts paired
   with seeded neutral media) through the model in batches under
   ``torch.no_grad()``. Pre-hooks on the candidate layers read the residual stream
   at each row's last prompt position ``t*``; the forward pass is cut off at the
   last candidate layer. Only float64 running sums are kept, so memory does not
   grow with the number of prompts.
2. Builds, per candidate layer, the refusal direction, gap, projections and
   modality offsets (:meth:`PolicyBundle.from_statistics`).
3. Sweeps the candidate layers on the *validation* parts with the full rule: the
   gate ``tau`` from the target benign trigger rate, then the rise of the cheap
   refusal score (log-odds of the model's refusal first-tokens) on ``H``, ``S`` and
   every ``S_m``, and the first-token KL divergence on the benign sets against the
   unguarded model. It picks the layer maximising harmful gain minus a penalty on
   benign gain among layers whose benign KL stays under the bound.
4. Grids ``lam`` and ``kappa`` at that layer with the same objective.

Every number that drove a choice is written into the bundle's calibration record.
"""

from __future__ import annotations

import math
import platform
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from pydantic import ValidationError

import guardrail
from guardrail.adapters import ModelAdapter
from guardrail.calibration.metrics import auroc, quantile
from guardrail.calibration.neutral import NeutralMedia, neutral_media
from guardrail.datasets import Prompt, PromptSource, dataset_digest, load_prompts, spread
from guardrail.errors import InputError, SteeringError
from guardrail.messages import Conversation, parse_conversation
from guardrail.policy import ModelFingerprint, PolicyBundle, SteeringParameters
from guardrail.policy.plans import build_plans
from guardrail.refusal import refusal_logodds, refusal_token_ids
from guardrail.steering import (
    RECENTER_ACTIVATION,
    RECENTER_MODES,
    Action,
    StopForward,
    first_positions,
    last_positions,
    layer_actions,
    mars_step,
    steering_hooks,
    stop_forward,
    window_mean,
)

DRAWN = "+drawn"
"""Suffix of the harmless sets drawn as media (``calibrate(drawn=...)``): ``image+drawn``."""


@dataclass(frozen=True)
class CalibrationTargets:
    """What calibration aims for; every field is recorded in the bundle."""

    benign_trigger_rate: float = 0.02
    """``tau``: the gate fires on at most this share of benign validation inputs, per set."""
    per_modality_gates: bool = False
    """One gate per input modality (``SteeringParameters.tau_modalities``): text rows are
    gated by the harmless text set's trigger rate alone, each media modality by its own
    benign sets (its neutral media, and its drawn harmless prompts with ``drawn=``).
    ``False``: one gate, the highest of every benign set's quantile."""
    kl_bound: float = 0.25
    """Layers whose mean benign first-token KL (nats) exceeds this are not eligible."""
    benign_penalty: float = 1.0
    """Weight of the largest benign refusal-score gain in the layer objective."""
    objective_tolerance: float = 0.05
    """Layers whose objective is within this of the best (log-odds) count as tied;
    ties go to the layer whose score ``s`` best separates the validation sets (AUROC).
    Models that barely refuse at all (flat objective) are thus placed where the
    textual direction is most informative."""
    layer_range: tuple[float, float] = (0.2, 0.8)
    """Candidate layers as fractions of the layer count (the last 20 % excluded)."""
    sweep_lam: float = 2.0
    sweep_kappa: float = 1.0
    lam_grid: tuple[float, ...] = (1.0, 2.0, 4.0)
    kappa_grid: tuple[float, ...] = (0.5, 1.0, 1.5)
    recenter: str = "full"
    apply_recentering_to_activation: bool | str = False
    """Written into the bundle's parameters (``False``, ``"steered"`` or ``True``; see
    :class:`~guardrail.policy.SteeringParameters`); the grid is evaluated with it."""
    max_validation: int = 64
    """At most this many validation prompts per set (H, S and each S_m), evenly spaced
    over the validation split (so every category of a grouped file is represented)."""
    score_positions: int = 1
    """Statistics and scores over the mean of the last k prompt positions (the method's
    option); 1 is ``t*`` alone. Steering acts at ``t*`` either way."""


@dataclass
class _Set:
    """One prompt set of calibration: its prompts and optional neutral modality.

    Conversations are built on demand (neutral media included), each from its own
    seeded generator, so the set never holds all its media in memory and every
    item is reproducible on its own. With a ``renderer`` the prompt itself is drawn
    in the modality (``renderer.image(prompt)`` / ``renderer.video(prompt)``: the
    media and the text beside them) instead of accompanying neutral media.
    """

    name: str
    prompts: list[Prompt]
    modality: str | None = None
    media: NeutralMedia = field(default_factory=NeutralMedia)
    split: str = "train"
    renderer: Any = None

    def __len__(self) -> int:
        return len(self.prompts)

    def conversation(self, index: int) -> Conversation:
        prompt = self.prompts[index].prompt
        if self.modality is None:
            content: Any = prompt
        elif self.renderer is not None:
            draw = self.renderer.image if self.modality == "image" else self.renderer.video
            content = draw(prompt)
        else:
            rng = random.Random(f"{self.media.seed}:{self.split}:{self.modality}:{index}")
            content = [
                neutral_media(self.modality, rng, self.media),
                {"type": "text", "text": prompt},
            ]
        return parse_conversation([{"role": "user", "content": content}])

    def __iter__(self) -> Iterator[Conversation]:
        return (self.conversation(i) for i in range(len(self.prompts)))


# --------------------------------------------------------------------------- collection


def collect_windows(
    adapter: ModelAdapter,
    inputs: dict[str, Any],
    layers: Sequence[int],
    windows: Sequence[int] = (1,),
) -> dict[tuple[int, int], torch.Tensor]:
    """Residual stream entering each of ``layers``, averaged over the last ``k`` prompt
    positions for each ``k`` in ``windows`` (``k = 1``: ``t*``), in one forward pass:
    ``{(layer, k): [B, d] float64}``.

    The forward pass stops as soon as the last requested layer has been entered.
    """
    positions = last_positions(inputs["attention_mask"])
    starts = first_positions(inputs["attention_mask"])
    rows = torch.arange(positions.shape[0], device=positions.device)
    captured: dict[tuple[int, int], torch.Tensor] = {}

    def tap(index: int) -> Action:
        def act(hidden: torch.Tensor | None) -> None:
            if hidden is None:
                raise SteeringError(f"layer {index} was called without hidden states")
            for k in windows:
                captured[index, k] = window_mean(
                    hidden, rows, positions, k, starts, dtype=torch.float64
                )
            return None

        return act

    last = max(layers)
    actions: dict[int, list[Action]] = {index: [tap(index)] for index in sorted(set(layers))}
    actions[last].append(stop_forward)
    try:
        with torch.no_grad(), layer_actions(adapter.layers, actions):
            adapter.model(**inputs, use_cache=False)
    except StopForward:
        pass
    return captured


def collect_last_position(
    adapter: ModelAdapter,
    inputs: dict[str, Any],
    layers: Sequence[int],
    score_positions: int = 1,
) -> dict[int, torch.Tensor]:
    """Residual stream entering each of ``layers`` at ``t*`` (``[B, d]`` float64 each),
    or its mean over the last ``score_positions`` prompt positions."""
    captured = collect_windows(adapter, inputs, layers, (score_positions,))
    return {layer: captured[layer, score_positions] for layer in layers}


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def accumulate_means(
    adapter: ModelAdapter,
    conversations: Iterable[Conversation],
    layers: Sequence[int],
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
    score_positions: int = 1,
) -> dict[int, torch.Tensor]:
    """Streaming float64 means of the ``t*`` activations over ``conversations`` (each
    the mean of its last ``score_positions`` positions).

    ``conversations`` may be any iterable (a generator is consumed lazily): only
    one batch and the per-layer running sums are held at a time.
    """
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for batch in _batches(conversations, batch_size):
        captured = collect_last_position(
            adapter, adapter.build_inputs(batch), layers, score_positions
        )
        for layer, acts in captured.items():
            total = acts.sum(0).cpu()
            sums[layer] = sums[layer] + total if layer in sums else total
        count += len(batch)
        if progress:
            progress(len(batch))
    if count == 0:
        raise InputError("no prompts to calibrate on")
    return {layer: total / count for layer, total in sums.items()}


def collect_window_examples(
    adapter: ModelAdapter,
    conversations: Iterable[Conversation],
    layers: Sequence[int],
    windows: Sequence[int] = (1,),
    *,
    batch_size: int = 8,
) -> dict[tuple[int, int], torch.Tensor]:
    """Per-example activations for every ``(layer, k)`` (``[n, d]`` float64 each: the
    mean of the last ``k`` positions), one forward pass per batch, for small sets."""
    parts: dict[tuple[int, int], list[torch.Tensor]] = {}
    for batch in _batches(conversations, batch_size):
        captured = collect_windows(adapter, adapter.build_inputs(batch), layers, windows)
        for key, acts in captured.items():
            parts.setdefault(key, []).append(acts.cpu())
    return {key: torch.cat(chunks) for key, chunks in parts.items()}


def collect_examples(
    adapter: ModelAdapter,
    conversations: Iterable[Conversation],
    layers: Sequence[int],
    *,
    batch_size: int = 8,
    score_positions: int = 1,
) -> dict[int, torch.Tensor]:
    """Per-example ``t*`` activations (``[n, d]`` float64 per layer; each the mean of its
    last ``score_positions`` positions), for small sets."""
    acts = collect_window_examples(
        adapter, conversations, layers, (score_positions,), batch_size=batch_size
    )
    return {layer: acts[layer, score_positions] for layer in layers}


# --------------------------------------------------------------------------- first-token evaluation


@dataclass
class _FirstToken:
    """Unguarded or guarded first-token statistics of one validation set."""

    logodds: torch.Tensor
    logp: torch.Tensor


def first_token(
    adapter: ModelAdapter,
    conversations: Iterable[Conversation],
    token_ids: Sequence[int],
    *,
    policy: PolicyBundle | None = None,
    batch_size: int = 8,
) -> _FirstToken:
    """Log-probabilities of the first generated token (optionally under MARS)."""
    odds, logps = [], []
    for batch in _batches(conversations, batch_size):
        inputs = adapter.build_inputs(batch)
        plans = (
            build_plans([policy] * len(batch), batch, inputs["attention_mask"], apply=True)
            if policy is not None
            else []
        )
        with torch.no_grad(), steering_hooks(adapter.layers, plans):
            logits = adapter.model(**inputs, use_cache=False).logits[:, -1, :]
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        logps.append(logp)
        odds.append(refusal_logodds(logits, token_ids).cpu())
    return _FirstToken(logodds=torch.cat(odds), logp=torch.cat(logps))


def _kl(base: _FirstToken, steered: _FirstToken) -> float:
    p = base.logp.exp()
    return float((p * (base.logp - steered.logp)).sum(-1).mean())


# --------------------------------------------------------------------------- calibrate


def _split(
    prompts: list[Prompt], fraction: float, rng: random.Random, limit: int
) -> tuple[list[Prompt], list[Prompt]]:
    if any(p.split == "val" for p in prompts):
        train = [p for p in prompts if p.split == "train"]
        val = [p for p in prompts if p.split == "val"]
    else:
        shuffled = [p for p in prompts if p.split != "test"] or list(prompts)
        rng.shuffle(shuffled)
        cut = max(1, round(len(shuffled) * fraction))
        val, train = shuffled[:cut], shuffled[cut:]
    if not train or not val:
        raise InputError(
            "calibration needs both training and validation prompts; give more prompts or "
            "a 'split' field with 'train' and 'val' values"
        )
    # evenly spaced, not the first ``limit``: shipped files are grouped by category
    return train, spread(val, limit)


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar: Any = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr)
            except ImportError:  # pragma: no cover - tqdm ships with transformers
                self.bar = None

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def candidate_layers(num_layers: int, layer_range: tuple[float, float]) -> list[int]:
    """Layers ``l`` with ``lo * L <= l < hi * L``: by default the first 20 % and the
    last 20 % are left out (of 30 layers, 6 to 23; layer 24 is the first of the last
    six). ``hi = 1`` keeps the last layer."""
    lo = math.ceil(layer_range[0] * num_layers)
    layers = list(range(lo, min(num_layers, math.ceil(layer_range[1] * num_layers))))
    if not layers:
        raise InputError(f"layer range {layer_range} selects no layer of {num_layers}")
    return layers


def calibrate(
    model: Any,
    processor: Any,
    harmful: PromptSource,
    harmless: PromptSource,
    *,
    modalities: Iterable[str] | None = None,
    layers: Sequence[int] | None = None,
    validation_fraction: float = 0.25,
    targets: CalibrationTargets | None = None,
    name: str = "policy",
    version: str = "1.0.0",
    description: str = "",
    batch_size: int = 8,
    seed: int = 0,
    media: NeutralMedia | None = None,
    drawn: Any = None,
    progress: bool = True,
) -> PolicyBundle:
    """Calibrate a MARS policy bundle for ``model`` from text-only prompt sets.

    Args:
        harmful: shipped names, files (JSONL, JSON, CSV, TXT) or lists of
            strings / :class:`~guardrail.datasets.Prompt`. Items with ``split="val"``
            are the validation set; without such items ``validation_fraction`` of
            the non-test items are drawn at random (``seed``). ``split="test"`` items
            are never used.
        harmless: the harmless prompts, in the same forms as ``harmful``.
        modalities: non-text modalities to calibrate re-centring for (default:
            every modality the model supports).
        layers: candidate layers (default: ``targets.layer_range`` of the layer count).
        drawn: optional renderer of text prompts as media (``image(prompt)`` and
            ``video(prompt)`` return content parts, e.g.
            ``guardrail.evaluation.rendering.default_renderer(model_name,
            templates="calibration")``). The harmless prompts drawn by it are a second
            harmless set per modality beside the neutral media: the modality's offset
            is the mean of the two sets' offsets (an offset averaged over templates),
            and the drawn validation prompts are one more benign set the gate's
            trigger rate holds on. Only harmless text is drawn: no unsafe media.
    """
    started = time.perf_counter()
    targets = targets or CalibrationTargets()
    k = targets.score_positions
    asked: dict[str, Any] = {
        "score_positions": k,
        "recenter": targets.recenter,
        "apply_recentering_to_activation": targets.apply_recentering_to_activation,
    }
    try:  # the bundle's own bounds, checked before any activation is collected
        SteeringParameters(**asked)
    except ValidationError as err:
        name = str(err.errors()[0]["loc"][0])
        fix = {
            "recenter": f"use one of {RECENTER_MODES}",
            "apply_recentering_to_activation": f"use one of {RECENTER_ACTIVATION}",
        }.get(name, err.errors()[0]["msg"])
        raise InputError(f"{name}={asked.get(name)!r} is not valid: {fix}") from err
    media = media or NeutralMedia(seed=seed)
    adapter = ModelAdapter(model, processor)
    mods = sorted(adapter.modalities if modalities is None else set(modalities))
    unsupported = set(mods) - adapter.modalities
    if unsupported:
        raise InputError(
            f"{type(model).__name__} does not support {sorted(unsupported)}; calibrate for "
            f"{sorted(adapter.modalities) or 'text only'}"
        )
    cands = (
        sorted(set(layers))
        if layers is not None
        else candidate_layers(adapter.num_layers, targets.layer_range)
    )
    if cands[0] < 0 or cands[-1] >= adapter.num_layers:
        raise InputError(f"candidate layers {cands} out of range for {adapter.num_layers} layers")
    rng = random.Random(seed)
    H_all = load_prompts(harmful)
    S_all = load_prompts(harmless)
    H_train, H_val = _split(H_all, validation_fraction, rng, targets.max_validation)
    S_train, S_val = _split(S_all, validation_fraction, rng, targets.max_validation)
    train_sets = [_Set("harmful", H_train), _Set("harmless", S_train)] + [
        _Set(m, S_train, modality=m, media=media) for m in mods
    ]
    val_sets = [_Set("harmful", H_val, split="val"), _Set("harmless", S_val, split="val")] + [
        _Set(m, S_val, modality=m, media=media, split="val") for m in mods
    ]
    if drawn is not None:
        train_sets += [_Set(f"{m}{DRAWN}", S_train, modality=m, renderer=drawn) for m in mods]
        val_sets += [
            _Set(f"{m}{DRAWN}", S_val, modality=m, split="val", renderer=drawn) for m in mods
        ]

    # 1. streaming means on the train sets
    total = sum(len(s) for s in train_sets)
    bar = _Progress(total, "collecting activations", progress)
    means: dict[str, dict[int, torch.Tensor]] = {}
    try:
        for s in train_sets:
            means[s.name] = accumulate_means(
                adapter, s, cands, batch_size=batch_size, progress=bar, score_positions=k
            )
    finally:
        bar.close()
    if drawn is not None:  # the offset averaged over the neutral and the drawn set
        for m in mods:
            extra = means.pop(f"{m}{DRAWN}")
            means[m] = {layer: (means[m][layer] + extra[layer]) / 2 for layer in cands}
    t_collect = time.perf_counter() - started

    # 2. per-example validation activations, unguarded first-token statistics
    bar = _Progress(2 * sum(len(s.prompts) for s in val_sets), "validation baseline", progress)
    val_acts = {}
    for s in val_sets:
        val_acts[s.name] = collect_examples(
            adapter, s, cands, batch_size=batch_size, score_positions=k
        )
        bar(len(s.prompts))
    token_ids = refusal_token_ids(adapter.tokenizer)
    base = {}
    for s in val_sets:
        base[s.name] = first_token(adapter, s, token_ids, batch_size=batch_size)
        bar(len(s.prompts))
    bar.close()
    fingerprint = ModelFingerprint.of(adapter)
    benign = [s.name for s in val_sets if s.name != "harmful"]

    def bundle_at(layer: int, **params: Any) -> PolicyBundle:
        return PolicyBundle.from_statistics(
            name=name,
            version=version,
            layer=layer,
            mu_H=means["harmful"][layer],
            mu_S=means["harmless"][layer],
            mu_modalities={m: means[m][layer] for m in mods},
            model=fingerprint,
            parameters=SteeringParameters(
                recenter=targets.recenter,
                apply_recentering_to_activation=targets.apply_recentering_to_activation,
                score_positions=k,
                **params,
            ),
            description=description,
        )

    def val_scores(bundle: PolicyBundle, set_name: str, recentered: bool = True) -> list[float]:
        acts = val_acts[set_name][bundle.layer]
        delta = torch.zeros_like(acts)
        mode = bundle.parameters.recenter if recentered else "none"
        modality = set_name.removesuffix(DRAWN)
        offset = bundle.delta(modality) if modality in mods else None
        if offset is not None and mode != "none":
            delta = offset.double().expand_as(acts)
        step = mars_step(
            acts,
            u=bundle.u.double(),
            p_S=torch.tensor(bundle.p_S),
            g=torch.tensor(bundle.g),
            delta=delta,
            tau=math.inf,
            lam=0.0,
            kappa=0.0,
            recenter_mode=mode,
        )
        return step.score.tolist()

    def gates(bundle: PolicyBundle) -> dict[str, Any]:
        """``tau`` (and ``tau_modalities``): the benign sets' trigger-rate quantiles."""
        q = {b: quantile(val_scores(bundle, b), 1 - targets.benign_trigger_rate) for b in benign}
        if not targets.per_modality_gates:
            return {"tau": max(q.values())}

        def modality(set_name: str) -> str:
            m = set_name.removesuffix(DRAWN)
            return m if m in mods else "text"

        return {
            "tau": max(v for b, v in q.items() if modality(b) == "text"),
            "tau_modalities": {m: max(v for b, v in q.items() if modality(b) == m) for m in mods},
        }

    def evaluate(bundle: PolicyBundle) -> dict[str, Any]:
        row: dict[str, Any] = {
            "layer": bundle.layer,
            **bundle.parameters.model_dump(include={"tau", "tau_modalities", "lam", "kappa"}),
        }
        for s in val_sets:
            steered = first_token(adapter, s, token_ids, policy=bundle, batch_size=batch_size)
            row[f"gain_{s.name}"] = float((steered.logodds - base[s.name].logodds).mean())
            if s.name != "harmful":
                row[f"kl_{s.name}"] = _kl(base[s.name], steered)
        row["benign_gain"] = max(row[f"gain_{b}"] for b in benign)
        row["benign_kl"] = max(row[f"kl_{b}"] for b in benign)
        row["feasible"] = row["benign_kl"] <= targets.kl_bound
        row["objective"] = row["gain_harmful"] - targets.benign_penalty * max(
            0.0, row["benign_gain"]
        )
        return row

    # 3. layer sweep
    sweep = []
    bar = _Progress(len(cands), "layer sweep", progress)
    for layer in cands:
        probe = bundle_at(layer)
        bundle = probe.with_parameters(
            **gates(probe), lam=targets.sweep_lam, kappa=targets.sweep_kappa
        )
        row = evaluate(bundle)
        row["auroc_val"] = auroc(val_scores(bundle, "harmful"), val_scores(bundle, "harmless"))
        row["gap"] = bundle.g
        sweep.append(row)
        bar(1)
    bar.close()
    chosen = _best_layer(sweep, targets.objective_tolerance)
    layer = int(chosen["layer"])

    # 4. lam / kappa grid at the chosen layer
    probe = bundle_at(layer)
    gate = gates(probe)
    points = [(lam, kappa) for lam in targets.lam_grid for kappa in targets.kappa_grid]
    bar = _Progress(len(points), "strength grid", progress)
    grid = []
    for lam, kappa in points:
        grid.append(evaluate(probe.with_parameters(**gate, lam=lam, kappa=kappa)))
        bar(1)
    bar.close()
    best = _best_grid(grid)
    final = probe.with_parameters(**gate, lam=best["lam"], kappa=best["kappa"])

    drawn_sets = [f"{m}{DRAWN}" for m in mods] if drawn is not None else []
    scores = {f"{s}": val_scores(final, s) for s in ("harmful", "harmless", *mods, *drawn_sets)}
    scores.update({f"{m}_raw": val_scores(final, m, recentered=False) for m in mods})
    record = {
        "project_version": guardrail.__version__,
        "torch_version": torch.__version__,
        "transformers_version": _transformers_version(),
        "python": platform.python_version(),
        "seed": seed,
        "media": {**asdict(media), "kinds": ["solid", "noise", "shapes"]},
        "drawn": repr(drawn) if drawn is not None else None,
        "targets": asdict(targets),
        "datasets": {
            s.name + "_" + split: {"size": len(s.prompts), "digest": dataset_digest(s.prompts)}
            for split, sets in (("train", train_sets), ("val", val_sets))
            for s in sets
            if s.modality is None
        },
        "modalities": mods,
        "candidate_layers": cands,
        "refusal_token_ids": token_ids,
        "sweep": sweep,
        "chosen_layer": layer,
        "grid": grid,
        "chosen": {"layer": layer, **gate, "lam": best["lam"], "kappa": best["kappa"]},
        "validation_scores": scores,
        "timings_s": {
            "collect": round(t_collect, 3),
            "total": round(time.perf_counter() - started, 3),
        },
    }
    return PolicyBundle(final.manifest.model_copy(update={"calibration": record}), final.tensors)


def _eligible(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows within the benign-KL bound, or the least-KL row if none is."""
    feasible = [r for r in rows if r["feasible"]]
    return feasible or sorted(rows, key=lambda r: r["benign_kl"])[:1]


def _best_layer(rows: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    pool = _eligible(rows)
    top = max(r["objective"] for r in pool)
    tied = [r for r in pool if r["objective"] >= top - tolerance]
    return max(tied, key=lambda r: (r["auroc_val"], r["objective"]))


def _best_grid(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Best objective; among equal objectives the gentler (smaller lam * kappa) setting."""
    return max(_eligible(rows), key=lambda r: (round(r["objective"], 6), -r["lam"] * r["kappa"]))


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)
