"""HTTP with retries, one way for every client in the package (the webhook event sink,
the remote policy registry): what counts as transient, and the backoff."""

from __future__ import annotations

import http.client
from collections.abc import Callable
from typing import Any

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)
from tenacity.stop import stop_base

__all__ = ["HTTPStatusError", "retrying", "transient"]


class HTTPStatusError(Exception):
    """An HTTP response with an error status (kept apart from the transport's errors)."""

    def __init__(self, url: str, code: int, reason: str = ""):
        super().__init__(f"HTTP {code} {reason}".strip())
        self.url, self.code, self.reason = url, code, reason


def transient(exc: BaseException) -> bool:
    """Worth retrying: connection problems, timeouts, 408, 429 and 5xx; never 404 or
    another 4xx."""
    if isinstance(exc, HTTPStatusError):
        return exc.code >= 500 or exc.code in (408, 429)
    return isinstance(exc, (OSError, http.client.HTTPException))


def retrying(
    *,
    attempts: int,
    backoff: float,
    max_backoff: float,
    retry_if: Callable[[BaseException], bool] = transient,
    stop: stop_base | None = None,
    before_sleep: Callable[[RetryCallState], None] | None = None,
    sleep: Callable[[float], Any] | None = None,
) -> Retrying:
    """A tenacity ``Retrying``: at most ``attempts`` tries (and ``stop``, if given),
    exponential backoff from ``backoff`` up to ``max_backoff`` seconds, retrying what
    ``retry_if`` accepts; the last error is re-raised."""
    options: dict[str, Any] = {}
    if before_sleep is not None:
        options["before_sleep"] = before_sleep
    if sleep is not None:
        options["sleep"] = sleep
    limit = stop_after_attempt(attempts)
    return Retrying(
        stop=limit if stop is None else limit | stop,
        wait=wait_exponential(multiplier=backoff, max=max_backoff),
        retry=retry_if_exception(retry_if),
        reraise=True,
        **options,
    )
