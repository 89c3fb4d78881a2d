"""Token streaming and cancellation for one batched ``generate`` call.

:class:`BatchStreamer` is a transformers streamer for a whole batch: ``generate``
hands it one token per row per step, and it sends each streaming row's new text
to that row's callback (rows without one are skipped). A row's text is decoded
from all of its tokens so far and only the new suffix is sent, held back while it
ends in an incomplete character. Rows the guardrail blocks before generating are
withheld (:meth:`BatchStreamer.withhold`): their unguarded tokens never reach a
client; they get the fail-closed refusal from the final result instead.

:class:`RowCancel` is a stopping criterion with one flag per row: a client that
goes away stops its own row at the next decoding step, while the other rows of
the batch carry on; when every row is stopped, ``generate`` returns.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

__all__ = ["BatchStreamer", "RowCancel"]

TextSink = Callable[[str], None]


class BatchStreamer(BaseStreamer):
    """Streams each row of a batched generation to its own callback."""

    def __init__(self, tokenizer: Any, sinks: Sequence[TextSink | None], eos: Iterable[int]):
        self.tokenizer = tokenizer
        self.sinks = list(sinks)
        self.eos = set(eos)
        self.ids: list[list[int]] = [[] for _ in self.sinks]
        self.sent = [""] * len(self.sinks)
        self.done = [sink is None for sink in self.sinks]
        self._prompt_seen = False

    def withhold(self, rows: Iterable[int]) -> None:
        """Never stream these rows (the guardrail blocks them)."""
        for row in rows:
            self.done[row] = True

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt ids
            self._prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        if len(tokens) != len(self.sinks):
            raise ValueError(f"streamer built for {len(self.sinks)} rows got {len(tokens)}")
        for row, token in enumerate(tokens):
            if self.done[row]:
                continue
            if token in self.eos:
                self.done[row] = True
                continue
            self.ids[row].append(int(token))
            self._send(row, final=False)

    def end(self) -> None:
        for row in range(len(self.sinks)):
            if self.sinks[row] is not None and self.ids[row]:
                self._send(row, final=True)

    def _send(self, row: int, *, final: bool) -> None:
        text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for its next token
        sent = self.sent[row]
        if not text.startswith(sent) or len(text) == len(sent):
            return
        sink = self.sinks[row]
        if sink is not None:
            sink(text[len(sent) :])
        self.sent[row] = text


class RowCancel(StoppingCriteria):
    """Stops the rows whose flag is set; the others go on."""

    def __init__(self, flags: Sequence[threading.Event]):
        self.flags = list(flags)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        stop = [flag.is_set() for flag in self.flags]
        if len(stop) != input_ids.shape[0]:
            raise ValueError(f"{len(stop)} cancel flags for {input_ids.shape[0]} rows")
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)
