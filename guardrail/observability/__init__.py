"""Observability: what the guardrail tells the outside world about each request.

- :mod:`.events` - intervention and refusal events, and the sinks they go to;
- :mod:`.telemetry` - OpenTelemetry spans and metrics (API only, injectable providers).

Loggers (structlog, never configured globally) are in :mod:`guardrail.logs`.
"""
