"""Engines behind the server: the :class:`ChatEngine` protocol and the transformers engine.

The HTTP layer (:mod:`guardrail.serve.app`) speaks only to a :class:`ChatEngine`:
``submit`` one request and await its :class:`~guardrail.result.GuardrailResult`, or
``stream`` it (text chunks, then the result). :class:`TransformersEngine` runs a
:class:`~guardrail.Guardrail` in one worker thread and micro-batches concurrent
requests (:mod:`guardrail.serve.batching`) into single ``Guardrail.generate`` calls:
rows with different keys, policies and rollout arms share a batch as they do in
the SDK; requests with different generation settings never do. Another engine
(vLLM, with its own continuous batching) implements the same four methods.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from transformers import StoppingCriteriaList

from guardrail.errors import GuardrailError
from guardrail.generation import eos_ids
from guardrail.guardrail import Guardrail
from guardrail.messages import parse_conversation
from guardrail.result import GuardrailResult
from guardrail.serve.batching import Job, MicroBatcher
from guardrail.serve.schema import GenerationSettings
from guardrail.serve.streaming import BatchStreamer, RowCancel

__all__ = ["BatchRecord", "ChatEngine", "EngineRequest", "TransformersEngine", "serve_self_test"]


@dataclass
class EngineRequest:
    """One chat request as an engine sees it.

    ``messages`` is a conversation in the guardrail's format (already converted
    from the wire format); ``key`` picks the rollout arm; ``trace_context`` is the
    OpenTelemetry context the generation span belongs to.
    """

    messages: list[dict[str, Any]]
    settings: GenerationSettings
    key: str | None = None
    trace_context: Any = None


@runtime_checkable
class ChatEngine(Protocol):
    """What the server needs from an engine."""

    guardrail: Guardrail

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(self, request: EngineRequest) -> GuardrailResult:
        """The request's result; cancelling the awaiting task cancels the request."""
        ...

    def stream(self, request: EngineRequest) -> AsyncIterator[str | GuardrailResult]:
        """Text chunks as they are generated, then the result; closing the iterator
        (or cancelling its consumer) stops the request's generation."""
        ...

    def queue_depth(self) -> int: ...

    def check(self, request: EngineRequest) -> None:
        """Raise :class:`~guardrail.errors.InputError` for a request the engine would
        refuse (called before queueing, in a worker thread)."""
        ...

    async def self_test(self) -> GuardrailResult:
        """One short generation; raises unless it was served as configured."""
        ...


async def serve_self_test(engine: ChatEngine) -> GuardrailResult:
    """One short generation through ``engine``; raises unless it was served as
    configured (no error, and a policy applied in enforce mode unless the kill switch
    is on). Every engine's ``self_test`` ends here."""
    result = await engine.submit(
        EngineRequest(
            messages=[{"role": "user", "content": "Hello"}],
            settings=GenerationSettings(max_new_tokens=1),
        )
    )
    if result.error is not None:
        raise GuardrailError(f"self-test generation failed: {result.error}")
    if (
        engine.guardrail.mode == "enforce"
        and result.policy_version is None
        and result.rollout_arm != "killed"
    ):
        raise GuardrailError("self-test generation ran without a policy in enforce mode")
    return result


@dataclass(frozen=True)
class BatchRecord:
    """One batch the engine ran: how many rows, how long, which rows were cancelled."""

    size: int
    seconds: float
    cancelled: int
    output_tokens: tuple[int, ...] = ()
    settings: GenerationSettings | None = None


@dataclass(eq=False)
class _Payload:
    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    on_text: Callable[[str], None] | None = None
    outputs: list[int] = field(default_factory=list)


class TransformersEngine:
    """A :class:`~guardrail.Guardrail` behind a micro-batching queue.

    Args:
        guardrail: the guardrail to run (its mode, policy, rollout and limits apply).
        max_batch_size: most requests in one ``generate`` call (1: batching off).
        batch_window_s: how long the oldest queued request waits for others.
        max_queue: most requests waiting; one more is refused (HTTP 429).
        on_batch: called after every batch with its :class:`BatchRecord`.
    """

    def __init__(
        self,
        guardrail: Guardrail,
        *,
        max_batch_size: int = 8,
        batch_window_s: float = 0.005,
        max_queue: int = 64,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ):
        self.guardrail = guardrail
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardrail-batch")
        self.batcher = MicroBatcher(
            self._run,
            self._executor,
            max_batch_size=max_batch_size,
            window_s=batch_window_s,
            max_queue=max_queue,
            on_batch=self._batched,
        )
        self.on_batch = on_batch
        self.history: deque[BatchRecord] = deque(maxlen=256)
        self._eos = eos_ids(guardrail.model, guardrail.adapter.tokenizer)

    async def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def queue_depth(self) -> int:
        return self.batcher.depth

    def check(self, request: EngineRequest) -> None:
        """Validate a request as the guardrail will (media budgets, roles, modalities)
        before it is queued, so one bad request never fails a batch."""
        conv = parse_conversation(request.messages, limits=self.guardrail.limits)
        self.guardrail.adapter.check_modalities(conv)

    async def submit(self, request: EngineRequest) -> GuardrailResult:
        job = self._queue(request, None)
        try:
            result: GuardrailResult = await job.future
            return result
        finally:
            if not job.future.done() or job.future.cancelled():
                self.batcher.discard(job)

    def stream(self, request: EngineRequest) -> AsyncIterator[str | GuardrailResult]:
        """Queue the request now (a full queue raises :class:`ServerBusyError` here, before
        any response starts) and return its chunks and result as an async iterator."""
        chunks: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, text)

        job = self._queue(request, on_text)
        job.future.add_done_callback(lambda _: chunks.put_nowait(None))
        return _Stream(self.batcher, job, chunks)

    def _queue(self, request: EngineRequest, on_text: Callable[[str], None] | None) -> Job:
        payload = _Payload(request, asyncio.get_running_loop(), on_text)
        return self.batcher.submit(payload, request.settings)

    # ------------------------------------------------------------ the worker thread

    def _run(self, jobs: list[Job]) -> None:
        live = [job for job in jobs if not job.cancel.is_set()]
        if not live:
            return
        try:
            results = self._generate(live)
        except Exception as exc:
            if len(live) > 1:  # isolate the row that failed: each on its own
                for job in live:
                    self._run([job])
                return
            _settle(live[0], error=exc)
            return
        for job, result in zip(live, results, strict=True):
            job.payload.outputs.append(result.usage.output_tokens)
            _settle(job, result=result)

    def _generate(self, jobs: list[Job]) -> list[GuardrailResult]:
        payloads: list[_Payload] = [job.payload for job in jobs]
        settings: GenerationSettings = jobs[0].key  # type: ignore[assignment]
        kwargs = settings.generate_kwargs()
        kwargs["stopping_criteria"] = StoppingCriteriaList([RowCancel([j.cancel for j in jobs])])
        if any(p.on_text is not None for p in payloads):
            kwargs["streamer"] = BatchStreamer(
                self.guardrail.adapter.tokenizer, [p.on_text for p in payloads], self._eos
            )
        results: list[GuardrailResult] = self.guardrail.generate(
            [p.request.messages for p in payloads],
            key=[p.request.key for p in payloads],
            trace_context=[p.request.trace_context for p in payloads],
            **kwargs,
        )
        return results

    def _batched(self, jobs: list[Job], seconds: float) -> None:
        record = BatchRecord(
            size=len(jobs),
            seconds=seconds,
            cancelled=sum(job.cancel.is_set() for job in jobs),
            output_tokens=tuple(
                job.payload.outputs[-1] if job.payload.outputs else 0 for job in jobs
            ),
            settings=jobs[0].key if isinstance(jobs[0].key, GenerationSettings) else None,
        )
        self.history.append(record)
        if self.on_batch is not None:
            self.on_batch(record)

    async def self_test(self) -> GuardrailResult:
        """One short generation through the queue (:func:`serve_self_test`)."""
        return await serve_self_test(self)


class _Stream:
    """A queued streaming request: its text chunks, then its result. ``aclose()`` (also
    when it was never iterated) cancels the request."""

    def __init__(self, batcher: MicroBatcher, job: Job, chunks: asyncio.Queue[str | None]):
        self.batcher = batcher
        self.job = job
        self.chunks = chunks
        self._finished = False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> str | GuardrailResult:
        if self._finished:
            raise StopAsyncIteration
        try:
            chunk = await self.chunks.get()
            if chunk is not None:
                return chunk
            self._finished = True
            result: GuardrailResult = await self.job.future
            return result
        except BaseException:
            self.batcher.discard(self.job)
            raise

    async def aclose(self) -> None:
        if not self.job.future.done() or self.job.future.cancelled():
            self.batcher.discard(self.job)


def _settle(job: Job, *, result: Any = None, error: BaseException | None = None) -> None:
    """Set a job's future from the worker thread (unless it was cancelled meanwhile)."""
    loop: asyncio.AbstractEventLoop = job.payload.loop

    def settle() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass
