"""The admin API: rollout changes over HTTP, behind a bearer token.

Off unless the server has an admin token (``GUARDRAIL_ADMIN_TOKEN`` or
``--admin-token-file``); then:

* ``GET /admin/rollout`` - the rollout config and the bundles each arm serves;
* ``PUT /admin/rollout`` - a new rollout (the JSON or YAML of ``Guardrail.set_rollout``);
* ``POST /admin/rollout/promote``, ``/rollback``, ``/canary-share`` (``{"share": 0.2}``),
  ``/kill-switch`` (``{"on": true}``);
* ``GET /admin/policies`` - every bundle the server serves (and the registry's names);
* ``GET /admin/events`` - the latest rollout changes.

A request without ``Authorization: Bearer ...`` gets 401, one with another token 403;
tokens are compared in constant time (:func:`hmac.compare_digest`) and never logged.
Every change passes the guardrail's verification gate (``Guardrail.set_rollout``:
integrity, signature under the trust store, fit to the model) before it serves a
request; a change that fails leaves the previous rollout serving. Each change,
applied or refused, is a :class:`RolloutChangeEvent` sent to the guardrail's event
sinks, the structlog access logger and the ``/admin/events`` list.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from guardrail.errors import GuardrailError, InputError
from guardrail.guardrail import Guardrail
from guardrail.observability.events import GuardrailEvent
from guardrail.policy import PolicyBundle
from guardrail.policy.rollout import Rollout
from guardrail.serve.errors import AuthenticationError, PermissionDeniedError

__all__ = ["ADMIN_TOKEN_ENV", "RolloutChangeEvent", "admin_router", "load_admin_token"]

ADMIN_TOKEN_ENV = "GUARDRAIL_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16
MAX_BODY_BYTES = 64 * 1024


class RolloutChangeEvent(GuardrailEvent):
    """A rollout change through the admin API, applied or refused."""

    kind: Literal["rollout_change"] = "rollout_change"
    refused: bool = False
    action: str
    outcome: Literal["applied", "rejected"]
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    client: str | None = Field(None, description="the admin client's address")


def load_admin_token(token_file: str | os.PathLike[str] | None = None) -> str | None:
    """The admin token from ``token_file`` or ``$GUARDRAIL_ADMIN_TOKEN``; None: admin off.

    Raises :class:`InputError` for an unreadable file or a token too short to be a
    secret (the message never contains the token).
    """
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InputError(
                f"cannot read the admin token file ({exc.strerror}); check --admin-token-file"
            ) from None
        where = "the admin token file"
    else:
        token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
        if not token:
            return None
        where = f"${ADMIN_TOKEN_ENV}"
    if len(token) < MIN_TOKEN_CHARS:
        raise InputError(
            f"{where} holds fewer than {MIN_TOKEN_CHARS} characters; use a random secret, e.g. "
            "the output of `python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return token


def token_check(token: str) -> Callable[[Request], None]:
    """A FastAPI dependency enforcing ``Authorization: Bearer <token>``."""
    expected = token.encode()

    def check(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise AuthenticationError(
                "the admin API needs an 'Authorization: Bearer <token>' header"
            )
        if not hmac.compare_digest(given.strip().encode(), expected):
            raise PermissionDeniedError("the bearer token is not this server's admin token")

    return check


def bundle_info(bundle: PolicyBundle) -> dict[str, Any]:
    from guardrail.policy.signing import read_signature

    signature = read_signature(bundle)
    return {
        "ref": bundle.ref,
        "name": bundle.name,
        "version": bundle.version,
        "layer": bundle.layer,
        "digest": bundle.manifest.digest,
        "signed_by": signature.key_id if signature is not None else None,
        "derived_from": bundle.manifest.derived_from,
    }


def rollout_state(guard: Guardrail) -> dict[str, Any]:
    rollout = guard.rollout
    state: dict[str, Any] = {
        "mode": guard.mode,
        "policy": guard.policy.ref if guard.policy is not None else None,
        "rollout": None,
    }
    if rollout is not None:
        state["rollout"] = rollout.config.model_dump(mode="json")
        state["serving"] = {
            "stable": rollout.stable.ref,
            "canary": rollout.canary.ref if rollout.canary is not None else None,
            "shadow": [b.ref for b in rollout.shadows],
            "kill_switch": rollout.config.kill_switch,
        }
    return state


class Admin:
    """The admin routes' state: the guardrail, one lock for changes, recent events."""

    def __init__(self, guard: Guardrail, log: Any):
        self.guard = guard
        self.log = log
        self.lock = asyncio.Lock()
        self.events: deque[RolloutChangeEvent] = deque(maxlen=100)

    def record(self, action: str, request: Request, before: Any, error: str | None) -> None:
        after = rollout_state(self.guard)
        event = RolloutChangeEvent(
            request_id=uuid.uuid4().hex,
            mode=self.guard.mode,
            action=action,
            outcome="rejected" if error else "applied",
            before=before,
            after=after,
            error=error,
            client=request.client.host if request.client else None,
        )
        self.events.append(event)
        self.guard.events.dispatch([event])
        self.log.info(
            "guardrail.admin.rollout_change",
            action=action,
            outcome=event.outcome,
            error=error,
            client=event.client,
        )

    async def change(self, action: str, request: Request, apply: Callable[[], object]) -> Any:
        """Run ``apply`` (in a thread: it may load bundles) and record the outcome."""
        async with self.lock:
            before = rollout_state(self.guard)
            try:
                await asyncio.to_thread(apply)
            except GuardrailError as exc:
                self.record(action, request, before, str(exc))
                raise
            self.record(action, request, before, None)
            return rollout_state(self.guard)

    def arm_change(self, change: Callable[[Rollout], None]) -> Callable[[], None]:
        """A change of the current rollout's arms, verified through ``set_rollout``;
        on a failed verification the previous config is restored."""

        def apply() -> None:
            rollout = self.guard.rollout
            if rollout is None:
                raise InputError("no rollout is configured; PUT /admin/rollout first")
            previous = rollout.config
            change(rollout)
            try:
                self.guard.set_rollout(rollout)  # every bundle it serves passes _admit
            except GuardrailError:
                rollout.update(previous)
                raise

        return apply


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise InputError(f"the request body exceeds {MAX_BODY_BYTES} bytes")
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    try:
        if kind in ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"):
            import yaml

            data = yaml.safe_load(raw.decode("utf-8")) if raw.strip() else {}
        else:
            data = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"the request body does not parse as {kind}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError
        raise InputError(f"the request body does not parse as YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InputError("the request body must be a JSON or YAML object")
    return data


def admin_router(guard: Guardrail, token: str, log: Any) -> APIRouter:
    """The admin routes, every one behind the bearer token."""
    admin = Admin(guard, log)
    router = APIRouter(prefix="/admin", dependencies=[Depends(token_check(token))])

    @router.get("/rollout")
    async def get_rollout() -> dict[str, Any]:
        return rollout_state(guard)

    @router.put("/rollout")
    async def put_rollout(request: Request) -> Any:
        config = await _body(request)
        return await admin.change("set_rollout", request, lambda: guard.set_rollout(config))

    @router.post("/rollout/promote")
    async def promote(request: Request) -> Any:
        return await admin.change("promote", request, admin.arm_change(Rollout.promote))

    @router.post("/rollout/rollback")
    async def rollback(request: Request) -> Any:
        return await admin.change("rollback", request, admin.arm_change(Rollout.rollback))

    @router.post("/rollout/canary-share")
    async def canary_share(request: Request) -> Any:
        body = await _body(request)
        share = body.get("share")
        if isinstance(share, bool) or not isinstance(share, (int, float)):
            raise InputError("canary-share needs a JSON body {'share': <fraction 0..1>}")
        value = float(share)
        return await admin.change(
            "canary_share", request, admin.arm_change(lambda r: r.set_canary_share(value))
        )

    @router.post("/rollout/kill-switch")
    async def kill_switch(request: Request) -> Any:
        body = await _body(request)
        on = body.get("on")
        if not isinstance(on, bool):
            raise InputError("kill-switch needs a JSON body {'on': true} or {'on': false}")
        return await admin.change(
            "kill_switch_on" if on else "kill_switch_off",
            request,
            admin.arm_change(lambda r: r.set_kill_switch(on)),
        )

    @router.get("/policies")
    async def policies() -> dict[str, Any]:
        out: dict[str, Any] = {
            "policy": bundle_info(guard.policy) if guard.policy is not None else None,
            "rollout": {},
            "registry": None,
        }
        rollout = guard.rollout
        if rollout is not None:
            out["rollout"]["stable"] = bundle_info(rollout.stable)
            if rollout.canary is not None:
                out["rollout"]["canary"] = bundle_info(rollout.canary)
            out["rollout"]["shadow"] = [bundle_info(b) for b in rollout.shadows]
        listing = getattr(guard.registry, "list", None)
        if callable(listing):
            out["registry"] = await asyncio.to_thread(listing)
        return out

    @router.get("/events")
    async def events() -> list[dict[str, Any]]:
        return [e.model_dump(mode="json") for e in admin.events]

    return router
