"""A chat backend: one guarded model behind FastAPI, with streaming over SSE.

    pip install fastapi uvicorn
    GUARDRAIL_MODEL=organism uvicorn examples.fastapi_backend:app --port 8000
    curl -s localhost:8000/chat -H 'content-type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi"}], "user": "alice"}'

The guardrail is built once at start-up and shared by every request (it is safe to
call from many threads and tasks at once). Each response carries the decision;
bad input is a 400 with the guardrail's message, never an unguarded answer.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from guardrail import Guardrail, GuardrailResult, InputError, InputLimits
from guardrail.models import organism
from guardrail.models.loading import load_model


class ChatRequest(BaseModel):
    messages: list[dict[str, Any]]
    user: str | None = None
    max_new_tokens: int = 64


def build_guardrail() -> Guardrail:
    name = os.environ.get("GUARDRAIL_MODEL", "organism")
    model, processor = load_model(name)
    policy = os.environ.get("GUARDRAIL_POLICY") or (
        organism.POLICY_DIR if name == "organism" else None
    )
    if policy is None:
        from guardrail.testing import tiny_policy

        policy = tiny_policy(model, processor, tau=-10.0, lam=4.0, kappa=2.0)
    # Requests come from the network: accept in-memory images only, never file paths.
    return Guardrail(model, processor, policy, limits=InputLimits(allow_paths=False))


app = FastAPI(title="guarded chat")
guard: Guardrail | None = None


def _guard() -> Guardrail:
    global guard
    if guard is None:
        guard = build_guardrail()
    return guard


@app.post("/chat")
async def chat(request: ChatRequest) -> dict[str, Any]:
    try:
        result = await _guard().agenerate(
            request.messages, key=request.user, max_new_tokens=request.max_new_tokens
        )
    except InputError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    return {"text": result.text, "guardrail": result.decision()}


@app.post("/chat/stream")
async def chat_stream(request: ChatRequest) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        async for item in _guard().astream(
            request.messages, key=request.user, max_new_tokens=request.max_new_tokens
        ):
            if isinstance(item, GuardrailResult):
                yield f"event: done\ndata: {json.dumps(item.decision())}\n\n"
            else:
                yield f"data: {json.dumps(item)}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
