"""What the guardrail passes to ``model.generate`` and how it reads the shape back.

The defaults (greedy, the guardrail's ``max_new_tokens``, the pad token), the
arguments it refuses (assisted and prompt-lookup decoding skip the one-pass prefill
that ``t*`` lives in), a stopping criterion for cancellation, how many copies of
each conversation a decoding strategy runs (beams, return sequences), and the
:class:`FirstTokenProbe` that reads the refusal first-token log-odds off the logits
generation computes anyway.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from typing import Any

import torch

from guardrail.errors import InputError
from guardrail.refusal import refusal_logodds

__all__ = [
    "UNSUPPORTED",
    "FirstTokenProbe",
    "close_when_idle",
    "eos_ids",
    "expansion",
    "generate_kwargs",
]

UNSUPPORTED = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")
"""``generate`` arguments that do not prefill the whole prompt in one pass."""


def generate_kwargs(
    kwargs: Mapping[str, Any],
    *,
    max_new_tokens: int,
    tokenizer: Any,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """The caller's ``generate`` kwargs with the guardrail's defaults and checks."""
    out = dict(kwargs)
    out.setdefault("max_new_tokens", max_new_tokens)
    out.setdefault("do_sample", False)
    if "pad_token_id" not in out and getattr(tokenizer, "pad_token_id", None) is not None:
        out["pad_token_id"] = tokenizer.pad_token_id
    if out.get("return_dict_in_generate"):
        raise InputError("return_dict_in_generate is managed by the guardrail; leave it unset")
    for name in UNSUPPORTED:
        if out.get(name) is not None:
            raise InputError(
                f"{name} is not supported: assisted and prompt-lookup decoding do not "
                "prefill the whole prompt in one pass, so t* cannot be steered; remove it"
            )
    if cancel is not None:
        from transformers import StoppingCriteria, StoppingCriteriaList

        event = cancel

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> Any:
                return torch.full(
                    (input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device
                )

        criteria = StoppingCriteriaList(out.pop("stopping_criteria", None) or [])
        criteria.append(_Cancel())
        out["stopping_criteria"] = criteria
    return out


class FirstTokenProbe:
    """The refusal first-token log-odds of every conversation, from the generation pass.

    :meth:`attach` adds a logits processor to a ``generate`` call's kwargs. At the
    first generated position of each run (a run that fails over to an unsteered one
    is read again) it reads the scores generation already computed and keeps
    :func:`~guardrail.refusal.refusal_logodds` of one copy per conversation (beams
    and return sequences are copies of it there): one log-softmax and one gather per
    row, no extra forward pass. It never changes the scores. The scores are the
    model's logits (what calibration's first-token log-odds read), after only the
    processors of the model's own generation config (repetition penalty, minimum
    length; none by default) and before the caller's logits processors and sampling
    warpers (temperature, top-k, top-p); beam search hands processors
    log-probabilities, which give the same log-odds. A value that is not finite
    (every refusal token masked) and a run that never reaches a first token give
    ``None``.
    """

    def __init__(self, token_ids: Sequence[int], expand: int = 1):
        self.token_ids = list(token_ids)
        self.expand = max(1, expand)
        self.values: list[float | None] | None = None

    def attach(self, kwargs: dict[str, Any]) -> None:
        """Put the probe first in ``kwargs["logits_processor"]``, before the caller's."""
        from transformers import LogitsProcessor, LogitsProcessorList

        probe = self

        class _Probe(LogitsProcessor):
            last: int | None = None

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                length = int(input_ids.shape[-1])
                if self.last is None or length != self.last + 1:  # the first step of a run
                    probe.read(scores)
                self.last = length
                return scores

        caller = list(kwargs.pop("logits_processor", None) or [])
        kwargs["logits_processor"] = LogitsProcessorList([_Probe(), *caller])

    def read(self, scores: torch.Tensor) -> None:
        """Keep the log-odds of rows ``0, expand, 2 * expand, ...`` of ``[B * expand, V]``."""
        ids = [t for t in self.token_ids if t < scores.shape[-1]]
        rows = scores[:: self.expand]
        if not ids:
            self.values = [None] * rows.shape[0]
            return
        with torch.no_grad():
            values = refusal_logodds(rows, ids)
        self.values = [v if math.isfinite(v) else None for v in values.tolist()]

    def value(self, row: int) -> float | None:
        if self.values is None or row >= len(self.values):
            return None
        return self.values[row]


def expansion(model: Any, kwargs: Mapping[str, Any]) -> tuple[int, int]:
    """How many copies of each conversation ``generate`` runs, and how many sequences it
    returns per conversation: ``(max(num_beams, num_return_sequences),
    num_return_sequences)``, from the call's kwargs over its ``generation_config`` over
    the model's (the order transformers applies them in)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def setting(name: str) -> int:
        value = kwargs.get(name)
        if value is None and config is not None:
            value = getattr(config, name, None)
        if value is None:
            return 1
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {type(value).__name__}")
        return value

    beams, sequences = setting("num_beams"), setting("num_return_sequences")
    return max(beams, sequences), sequences


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every end-of-sequence token id of the model's generation config and tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def close_when_idle(iterator: Generator[Any, None, None], wait_s: float = 60.0) -> None:
    """Close a generator that another thread may still be advancing (a cancelled
    ``astream`` leaves its last ``next`` running in a worker thread)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            iterator.close()
            return
        except ValueError:  # "generator already executing": that next() ends soon
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
