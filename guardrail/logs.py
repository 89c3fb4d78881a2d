"""The library's structlog logger, with request context bound per call.

``guardrail`` never configures structlog: what the application configured (or
structlog's defaults) decides where these records go and how they look. Pass your
own bound logger to :class:`~guardrail.observability.events.StructlogSink` to route events
elsewhere.
"""

from __future__ import annotations

from typing import Any

import structlog

LOGGER_NAME = "guardrail"

__all__ = ["LOGGER_NAME", "get_logger", "request_logger"]


def get_logger(**context: Any) -> Any:
    """``structlog.get_logger("guardrail")`` with ``context`` bound (None values left out)."""
    logger = structlog.get_logger(LOGGER_NAME)
    bound = {k: v for k, v in context.items() if v is not None}
    return logger.bind(**bound) if bound else logger


def request_logger(
    request_id: str | None = None,
    *,
    policy_name: str | None = None,
    policy_version: str | None = None,
    mode: str | None = None,
    **context: Any,
) -> Any:
    """The library logger bound to one request's context."""
    return get_logger(
        request_id=request_id,
        policy_name=policy_name,
        policy_version=policy_version,
        mode=mode,
        **context,
    )
