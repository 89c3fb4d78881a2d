"""Guardrail events as LangChain custom events of the chat model's run.

Each :class:`~guardrail.observability.events.InterventionEvent` / :class:`~guardrail.observability.events.RefusalEvent`
of a call is dispatched with ``dispatch_custom_event`` / ``adispatch_custom_event``
under its name (``guardrail.intervention``, ``guardrail.refusal``) with the event's
fields as data, attributed to the chat model's run, so callback handlers'
``on_custom_event`` and ``astream_events(version="v2")`` see them.

LangChain hands ``_generate`` a run manager but calls ``_stream`` without one
(``stream``, ``astream``, ``astream_events``, ``invoke`` with ``streaming=True``). To
attribute those events to the right run, the chat model's ``invoke`` / ``stream``
(and async twins) fix the run id in the config before LangChain starts the run and
expose it, with the config, through a context variable (a :class:`Route`) that is set
only while LangChain's code for that call runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

from langchain_core.callbacks import (
    AsyncCallbackManager,
    CallbackManager,
    adispatch_custom_event,
    dispatch_custom_event,
)
from langchain_core.runnables import RunnableConfig, ensure_config
from langchain_core.utils.uuid import uuid7

from guardrail.observability.events import GuardrailEvent

__all__ = ["Route", "adispatch_events", "dispatch_events", "iterate_routed", "aiterate_routed"]

T = TypeVar("T")


@dataclass(frozen=True)
class Route:
    """Where the events of one chat model call go: its config and run id."""

    owner: Any  # the chat model making the call
    config: RunnableConfig
    run_id: UUID

    @classmethod
    def start(cls, owner: Any, config: RunnableConfig | None) -> Route:
        config = ensure_config(config)
        run_id = config.get("run_id") or uuid7()
        return cls(owner, RunnableConfig(**{**config, "run_id": run_id}), run_id)

    def event_config(
        self, manager_cls: type[CallbackManager] | type[AsyncCallbackManager]
    ) -> RunnableConfig:
        """A config whose callback manager has the chat model's run as parent."""
        owner = self.owner
        manager = manager_cls.configure(
            self.config.get("callbacks"),
            owner.callbacks,
            owner.verbose,
            self.config.get("tags"),
            owner.tags,
            self.config.get("metadata"),
            owner.metadata,
        )
        manager.parent_run_id = self.run_id
        return RunnableConfig(callbacks=manager)


_ROUTE: ContextVar[Route | None] = ContextVar("langchain_mars_guardrail_route", default=None)


def current_route(owner: Any) -> Route | None:
    route = _ROUTE.get()
    return route if route is not None and route.owner is owner else None


def run_routed(route: Route, fn: Any, *args: Any, **kwargs: Any) -> Any:
    token = _ROUTE.set(route)
    try:
        return fn(*args, **kwargs)
    finally:
        _ROUTE.reset(token)


async def arun_routed(route: Route, fn: Any, *args: Any, **kwargs: Any) -> Any:
    token = _ROUTE.set(route)
    try:
        return await fn(*args, **kwargs)
    finally:
        _ROUTE.reset(token)


def iterate_routed(route: Route, iterator: Iterator[T]) -> Iterator[T]:
    """Iterate ``iterator`` with ``route`` set during each step (and only then)."""
    try:
        while True:
            token = _ROUTE.set(route)
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                _ROUTE.reset(token)
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


async def aiterate_routed(route: Route, iterator: AsyncIterator[T]) -> AsyncIterator[T]:
    """Async twin of :func:`iterate_routed`."""
    try:
        while True:
            token = _ROUTE.set(route)
            try:
                item = await anext(iterator)
            except StopAsyncIteration:
                return
            finally:
                _ROUTE.reset(token)
            yield item
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


def _config(owner: Any, run_manager: Any, manager_cls: Any) -> RunnableConfig | None:
    if run_manager is not None:
        manager = manager_cls(
            handlers=run_manager.handlers,
            inheritable_handlers=run_manager.inheritable_handlers,
            parent_run_id=run_manager.run_id,
            tags=run_manager.tags,
            inheritable_tags=run_manager.inheritable_tags,
            metadata=run_manager.metadata,
            inheritable_metadata=run_manager.inheritable_metadata,
        )
        return RunnableConfig(callbacks=manager)
    route = current_route(owner)
    return route.event_config(manager_cls) if route is not None else None


def dispatch_events(owner: Any, events: list[GuardrailEvent], run_manager: Any = None) -> None:
    """Dispatch ``events`` as custom events of ``owner``'s current run.

    Without a run manager or a route, the events go to the enclosing run of the
    caller's context; with no run at all they are not dispatched (the guardrail's
    own sinks have them).
    """
    config = _config(owner, run_manager, CallbackManager)
    for event in events:
        try:
            dispatch_custom_event(event.name, event.model_dump(mode="json"), config=config)
        except RuntimeError:  # no run to attach the event to
            return


async def adispatch_events(
    owner: Any, events: list[GuardrailEvent], run_manager: Any = None
) -> None:
    """Async twin of :func:`dispatch_events`."""
    config = _config(owner, run_manager, AsyncCallbackManager)
    for event in events:
        try:
            await adispatch_custom_event(event.name, event.model_dump(mode="json"), config=config)
        except RuntimeError:
            return
