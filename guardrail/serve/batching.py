"""Micro-batching across users: a bounded queue and one collector task.

Requests wait in a queue of at most ``max_queue`` entries (one more is refused with
:class:`~guardrail.serve.errors.ServerBusyError`, HTTP 429). The collector takes
the oldest request and every queued request with the *same* batch key (its
generation settings), waits until ``window_s`` after the oldest arrived or until
``max_batch_size`` are there, and hands them to ``run`` in a worker thread as one
batch. Requests with other keys stay queued, in order, for the next batch, so
settings are never mixed. One batch runs at a time (the model is the bottleneck);
while it runs the queue fills and the next batch is ready at once.

A request cancelled while queued (client gone, timeout) is dropped before its
batch starts; one cancelled while running is stopped by its row's flag
(:class:`~guardrail.serve.streaming.RowCancel`).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from guardrail.serve.errors import ServerBusyError

__all__ = ["Job", "MicroBatcher"]

_ids = itertools.count()


@dataclass(eq=False)
class Job:
    """One queued request: its payload, batch key, result future and cancel flag."""

    payload: Any
    key: Hashable
    future: asyncio.Future[Any]
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    id: int = field(default_factory=lambda: next(_ids))


class MicroBatcher:
    """Collects queued jobs into batches and runs them, one batch at a time, in ``executor``.

    ``run(jobs)`` runs in the executor's thread and must settle every job's future
    (through ``loop.call_soon_threadsafe``); an exception it raises fails the jobs
    it left unsettled.
    """

    def __init__(
        self,
        run: Callable[[list[Job]], None],
        executor: Executor,
        *,
        max_batch_size: int = 8,
        window_s: float = 0.005,
        max_queue: int = 64,
        on_batch: Callable[[list[Job], float], None] | None = None,
    ):
        if max_batch_size < 1 or max_queue < 1 or window_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and window_s >= 0")
        self.run = run
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._pending: deque[Job] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._batch_seconds = 0.0  # moving average, for Retry-After
        self.running: list[Job] = []

    @property
    def depth(self) -> int:
        """Requests waiting (not running)."""
        return len(self._pending)

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._collect(), name="guardrail-batcher"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self._pending:
            job.cancel.set()
            if not job.future.done():
                job.future.cancel()
        self._pending.clear()

    def submit(self, payload: Any, key: Hashable) -> Job:
        """Queue a request; raises :class:`ServerBusyError` when the queue is full."""
        if self._wake is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if len(self._pending) >= self.max_queue:
            raise ServerBusyError(
                f"the request queue is full ({self.max_queue} waiting); retry after "
                f"{self.retry_after()} s",
                retry_after=self.retry_after(),
            )
        job = Job(payload, key, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._wake.set()
        return job

    def discard(self, job: Job) -> None:
        """Cancel a job: dropped if still queued, its row stopped if running."""
        job.cancel.set()
        try:
            self._pending.remove(job)
        except ValueError:
            pass
        if not job.future.done():
            job.future.cancel()

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained by one batch's worth."""
        batches = max(1, math.ceil(len(self._pending) / self.max_batch_size))
        return max(1, math.ceil(self._batch_seconds * batches))

    async def _collect(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                while self._pending and self._pending[0].cancel.is_set():
                    self._pending.popleft()
                if not self._pending:
                    break
                first = self._pending[0]
                same = [j for j in self._pending if j.key == first.key and not j.cancel.is_set()]
                wait = first.enqueued + self.window_s - time.monotonic()
                if len(same) < self.max_batch_size and wait > 0:
                    try:
                        await asyncio.wait_for(self._wake.wait(), wait)
                        self._wake.clear()
                    except TimeoutError:
                        pass
                    continue
                batch = same[: self.max_batch_size]
                for job in batch:
                    self._pending.remove(job)
                    job.started = time.monotonic()
                self.running = batch
                began = time.perf_counter()
                try:
                    await loop.run_in_executor(self.executor, self.run, batch)
                except Exception as exc:  # run() failed outside its own handling
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(exc)
                finally:
                    self.running = []
                seconds = time.perf_counter() - began
                self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
                if self.on_batch is not None:
                    self.on_batch(batch, seconds)
