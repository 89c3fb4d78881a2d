"""Applying the rule inside a model: per-request plans and the layer dispatcher.

:class:`LayerPlan` is the steering work of one request at one decoder layer (which
rows, their ``t*``, their policy's tensors); :func:`steering_hooks` runs plans during
a forward pass. A plan acts once, in the prefill pass, at each row's last prompt
position ``t*``, and is inert in every decode step.

Hooks are never registered per request. Each decoder layer gets one permanent
forward pre-hook, the dispatcher, installed once under a lock (the Guardrail does it
for every layer when it is built, before any request runs). What the dispatcher does
is read from a context variable that each request sets for its own thread or asyncio
task: the steering plans, the early stop and the activation taps of *that* request.
A forward pass of any other request, or of code that is not a request at all, finds
nothing to do, and registering or removing hooks while other threads run forward
passes (which can corrupt a module's hook dictionary) never happens.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from guardrail.errors import SteeringError
from guardrail.steering.rule import mars_step, window_mean


@dataclass
class LayerPlan:
    """The steering work planned for one decoder layer in one request.

    ``rows`` are the batch rows this plan steers (all rows for a single policy;
    a subset when a batch mixes policies); every per-row tensor is indexed like
    ``rows``. ``positions`` are the ``t*`` of those rows in the prefill sequence;
    the score reads the mean of the ``score_positions`` positions ending at ``t*``
    (``starts`` is each row's first attended position, to check they exist).
    After the prefill pass ``score`` and ``strength`` hold the per-row results
    (on the model's device; reading them is the caller's one host sync);
    ``would_strength`` is the strength the rule computed, also when ``apply`` is
    off (shadow scoring), where ``strength`` is zero.

    ``batch_size`` is the number of conversations of the request and ``expand`` how
    many copies of each the generation strategy runs (beams, return sequences):
    ``generate`` repeats each row ``expand`` times in place, so row ``r``'s copies are
    rows ``r * expand ... r * expand + expand - 1`` of the prefill. Every copy is
    steered alike. A prefill batch of any other size fails closed
    (:class:`~guardrail.errors.SteeringError`), so no row is ever left unguarded.
    """

    layer: int
    rows: Tensor
    positions: Tensor
    expected_length: int
    u: Tensor
    p_S: Tensor
    g: Tensor
    delta: Tensor
    tau: Tensor
    lam: Tensor
    kappa: Tensor
    eta: Tensor
    recenter_mode: str = "full"
    apply_recentering_to_activation: bool | str = False
    score_positions: int = 1
    starts: Tensor | None = None
    apply: bool = True
    fired: bool = False
    score: Tensor | None = None
    strength: Tensor | None = None
    would_strength: Tensor | None = None
    captured: Tensor | None = field(default=None, repr=False)
    capture: bool = False
    batch_size: int | None = None
    expand: int = 1

    def run(self, hidden: Tensor) -> Tensor | None:
        """Apply the plan to the prefill hidden states ``[B, T, d]``.

        Returns the new hidden states, or ``None`` when nothing is written
        (shadow mode).
        """
        if hidden.dim() != 3 or hidden.shape[1] != self.expected_length:
            raise SteeringError(
                f"layer {self.layer}: the first forward pass had hidden states of shape "
                f"{tuple(hidden.shape)}, expected [batch, {self.expected_length}, d] for the "
                "prefill of the prompt; generation that does not prefill the whole prompt "
                "at once (chunked prefill, assisted decoding) is not supported"
            )
        k = self.expand
        if self.batch_size is not None and hidden.shape[0] != self.batch_size * k:
            raise SteeringError(
                f"layer {self.layer}: the prefill batch has {hidden.shape[0]} rows, expected "
                f"{self.batch_size} conversations x {k} copies (beams / return sequences); "
                "the request was not steered. Pass num_beams and num_return_sequences as "
                "generate() arguments (or in generation_config=) so the guardrail can plan "
                "for them"
            )
        rows = self.rows.to(hidden.device) * k  # the first copy of each row
        pos = self.positions.to(hidden.device)
        h = hidden[rows, pos]
        if k > 1:
            copies = (rows.unsqueeze(1) + torch.arange(k, device=rows.device)).reshape(-1)
            copy_pos = pos.repeat_interleave(k)
            same = torch.allclose(
                hidden[copies, copy_pos].float(),
                h.repeat_interleave(k, 0).float(),
                rtol=1e-3,
                atol=1e-5,
            )
            if not same:
                raise SteeringError(
                    f"layer {self.layer}: the {k} copies of a conversation in the prefill batch "
                    "differ, so rows cannot be matched to conversations; the request was not "
                    "steered"
                )
        h_score = None
        if self.score_positions > 1:
            h_score = window_mean(hidden, rows, pos, self.score_positions, self.starts)
        step = mars_step(
            h,
            u=self.u,
            p_S=self.p_S,
            g=self.g,
            delta=self.delta,
            tau=self.tau,
            lam=self.lam,
            kappa=self.kappa,
            eta=self.eta,
            recenter_mode=self.recenter_mode,
            apply_recentering_to_activation=self.apply_recentering_to_activation,
            h_score=h_score,
        )
        if not (bool(torch.isfinite(step.strength).all()) and bool(torch.isfinite(step.h).all())):
            raise SteeringError(
                f"layer {self.layer}: the steering step is not finite (strength "
                f"{step.strength.tolist()}); the policy's parameters or statistics are out of "
                "range for this model. Recalibrate it or lower lam / kappa"
            )
        self.score, self.strength, self.would_strength = step.score, step.strength, step.strength
        if self.capture:
            self.captured = h.detach().clone()
        if not self.apply:
            self.strength = torch.zeros_like(step.strength)
            return None
        out = hidden.clone()
        if k == 1:
            out[rows, pos] = step.h
        else:
            out[copies, copy_pos] = step.h.repeat_interleave(k, 0)
        return out


# --------------------------------------------------------------------------- dispatch

Action = Callable[[Tensor | None], Tensor | None]
"""What a request does when its forward pass enters a layer: return new hidden
states, ``None`` to leave them, or raise :class:`StopForward`."""

_SCOPE: contextvars.ContextVar[dict[int, tuple[Action, ...]] | None] = contextvars.ContextVar(
    "guardrail_layer_actions", default=None
)
_INSTALL_LOCK = threading.Lock()
_DISPATCH_ATTR = "_guardrail_dispatch_handle"


class StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised by a request's own stop action to end its forward pass early."""


def _dispatch(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    scope = _SCOPE.get()
    if scope is None:
        return None
    actions = scope.get(id(module))
    if not actions:
        return None
    hidden = args[0] if args else kwargs.get("hidden_states")
    changed = False
    for action in actions:
        new = action(hidden)
        if new is not None:
            hidden, changed = new, True
    if not changed:
        return None
    if args:
        return ((hidden, *args[1:]), kwargs)
    return (args, {**kwargs, "hidden_states": hidden})


def install_dispatch(layers: Sequence[torch.nn.Module] | torch.nn.ModuleList) -> None:
    """Install the dispatcher pre-hook on every layer that lacks one (idempotent).

    Thread-safe; call it before serving concurrent requests (the Guardrail does), so
    that no hook is ever registered while another thread runs the model.
    """
    if all(getattr(layer, _DISPATCH_ATTR, None) is not None for layer in layers):
        return
    with _INSTALL_LOCK:
        for layer in layers:
            if getattr(layer, _DISPATCH_ATTR, None) is None:
                handle = layer.register_forward_pre_hook(_dispatch, with_kwargs=True)
                object.__setattr__(layer, _DISPATCH_ATTR, handle)


@contextmanager
def layer_actions(
    layers: Sequence[torch.nn.Module] | torch.nn.ModuleList,
    actions: Mapping[int, Sequence[Action]],
) -> Iterator[None]:
    """Run ``actions[i]`` (in order) whenever *this* context's forward pass enters
    ``layers[i]``. Other threads and tasks are unaffected; nothing is left behind on
    exit. Nested scopes replace the outer one for their duration."""
    install_dispatch([layers[i] for i in actions])
    token = _SCOPE.set({id(layers[i]): tuple(acts) for i, acts in actions.items() if acts})
    try:
        yield
    finally:
        _SCOPE.reset(token)


def stop_forward(hidden: Tensor | None) -> Tensor | None:
    """An action that ends the forward pass (:class:`StopForward`)."""
    raise StopForward


def _plan_action(plan: LayerPlan) -> Action:
    def act(hidden: Tensor | None) -> Tensor | None:
        if plan.fired:
            return None
        plan.fired = True
        if hidden is None:
            raise SteeringError(
                f"layer {plan.layer}: decoder layer was called without hidden states "
                "as first argument or 'hidden_states' keyword"
            )
        return plan.run(hidden)

    return act


@contextmanager
def steering_hooks(
    layers: Sequence[torch.nn.Module] | torch.nn.ModuleList,
    plans: Sequence[LayerPlan],
    *,
    stop_at: int | None = None,
) -> Iterator[tuple[LayerPlan, ...]]:
    """Apply each plan on ``layers[plan.layer]`` for the duration, in this context only.

    Each plan acts once, on the first forward pass after entry (the prefill), and is
    inert afterwards. With ``stop_at`` the forward pass raises :class:`StopForward`
    when it enters ``layers[stop_at]`` (after the plans of that layer ran).
    """
    active = tuple(plans)
    actions: dict[int, list[Action]] = {}
    for plan in active:
        actions.setdefault(plan.layer, []).append(_plan_action(plan))
    if stop_at is not None:
        actions.setdefault(stop_at, []).append(stop_forward)
    with layer_actions(layers, actions):
        yield active


def run_until(
    model: Any,
    layers: Sequence[torch.nn.Module] | torch.nn.ModuleList,
    last_layer: int,
    inputs: Mapping[str, Any],
    plans: Sequence[LayerPlan] = (),
) -> None:
    """Run one forward pass with ``plans`` and stop it once ``layers[last_layer]`` has
    been entered (the prefill up to a policy's layer, for scoring without generating)."""
    try:
        with torch.no_grad(), steering_hooks(layers, plans, stop_at=last_layer):
            model(**inputs, use_cache=False)
    except StopForward:
        pass
