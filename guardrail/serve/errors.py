"""Errors as the OpenAI API reports them: an HTTP status and ``{"error": {...}}``.

Every :class:`~guardrail.errors.GuardrailError` maps to one status (:func:`http_status`):
a caller's mistake is a 4xx naming the fix, a bundle that failed verification is a
422, a server that cannot take the request now is a 429 or 503, and anything else is
a 500 whose message does not leak internals.
"""

from __future__ import annotations

from typing import Any

from guardrail.errors import (
    BundleNotFoundError,
    GuardrailError,
    InputError,
    InsecureRegistryError,
    PolicyCompatibilityError,
    PolicyDowngradeError,
    PolicyIntegrityError,
    PolicyNotFoundError,
    PolicyReferenceError,
    RegistryUnavailableError,
)

__all__ = [
    "AuthenticationError",
    "ModelNotFoundError",
    "NotReadyError",
    "PermissionDeniedError",
    "RequestTimeoutError",
    "ServerBusyError",
    "error_body",
    "http_status",
]


class ServerBusyError(GuardrailError):
    """The request queue is full; retry after ``retry_after`` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeoutError(GuardrailError):
    """The request did not finish within the server's request timeout (HTTP 504)."""


class NotReadyError(GuardrailError):
    """The server has not passed its start-up self-test (HTTP 503)."""


class ModelNotFoundError(InputError):
    """The request names a model this server does not serve (HTTP 404)."""


class AuthenticationError(GuardrailError):
    """No or a malformed bearer token on an admin request (HTTP 401)."""


class PermissionDeniedError(GuardrailError):
    """A bearer token that is not the admin token (HTTP 403)."""


# Most specific first: the first class an error is an instance of decides.
_STATUS: tuple[tuple[type[BaseException], int, str], ...] = (
    (ServerBusyError, 429, "rate_limit_error"),
    (RequestTimeoutError, 504, "timeout_error"),
    (NotReadyError, 503, "service_unavailable"),
    (AuthenticationError, 401, "authentication_error"),
    (PermissionDeniedError, 403, "permission_error"),
    (ModelNotFoundError, 404, "not_found_error"),
    (PolicyReferenceError, 400, "invalid_request_error"),
    (PolicyNotFoundError, 404, "not_found_error"),
    (BundleNotFoundError, 404, "not_found_error"),
    (PolicyDowngradeError, 409, "conflict_error"),
    (InsecureRegistryError, 422, "policy_error"),
    (PolicyIntegrityError, 422, "policy_error"),  # signatures too (a subclass)
    (PolicyCompatibilityError, 422, "policy_error"),
    (RegistryUnavailableError, 503, "service_unavailable"),
    (InputError, 400, "invalid_request_error"),
)


def http_status(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and OpenAI error ``type`` of an error; 500 for anything unknown."""
    for kind, status, name in _STATUS:
        if isinstance(exc, kind):
            return status, name
    return 500, "server_error"


def error_body(
    message: str, kind: str, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def describe(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """Status and body for an error. Guardrail errors keep their message (they name the
    problem and the fix, never caller values); other exceptions become a generic 500."""
    status, kind = http_status(exc)
    if isinstance(exc, GuardrailError):
        message = str(exc)
    else:
        message = "internal server error; the server log has the details"
    return status, error_body(message, kind, code=type(exc).__name__)
