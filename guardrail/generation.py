"""What the guardrail passes to ``model.generate`` and how it reads the shape back.

The defaults (greedy, the guardrail's ``max_new_tokens``, the pad token), the
arguments it refuses (assisted and prompt-lookup decoding skip the one-pass prefill
that ``t*`` lives in), a stopping criterion for cancellation, and how many copies of
each conversation a decoding strategy runs (beams, return sequences).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Mapping
from typing import Any

import torch

from guardrail.errors import InputError

__all__ = ["UNSUPPORTED", "close_when_idle", "eos_ids", "expansion", "generate_kwargs"]

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
