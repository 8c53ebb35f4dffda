"""The OpenAI-compatible API: ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``, relayed to vLLM
with the model alias resolved and answered under the alias the client asked for.

The relay is lean: the engine's bytes go out as they came in (one ``bytes.replace`` puts the alias in place of
the served model's name), never parsed and re-encoded per chunk.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from serving.contract import (
    SSE_EVENT,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    OpenAIObject,
    error_responses,
    openai_error,
)
from serving.gateway import Gateway, GatewayDep, GatewayError, require_api_key
from serving.middleware import overhead_header
from serving.relay import RelayedStream
from serving.request_log import REQUEST_ID_HEADER as REQUEST_ID
from serving.request_log import SERVED_HEADER as SERVED
from serving.upstream import Write

router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(OpenAIError, 401, 403, 413, 422, 429, 503),
)
GENERATED = {
    "response_model": OpenAIObject,
    "responses": {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}},
}
COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')


def _renaming(served: str, alias: str) -> tuple[bytes, bytes] | None:
    """How to put the alias in place of the served name in the engine's JSON (which vLLM writes without spaces)."""
    if served == alias:
        return None
    return b'"model":' + json.dumps(served).encode(), b'"model":' + json.dumps(alias).encode()


async def _relay(
    gateway: Gateway, request: Request, path: str, req: CompletionRequest | ChatCompletionRequest, asked: int | None
) -> Response:
    body = req.model_dump(exclude_none=True, exclude={"max_completion_tokens"})
    body["max_tokens"] = gateway.max_tokens(asked, n=req.n)
    alias = req.model
    served = body["model"] = await gateway.served(request, alias)
    body |= gateway.decoding(served)
    rename = _renaming(served, alias)
    request_id = gateway.request_id(request, served)
    started = time.perf_counter()
    if not req.stream:
        async with gateway.slot(served):
            answer = await gateway.upstream.complete(path, body, request_id)
        elapsed = time.perf_counter() - started
        tokens = COMPLETION_TOKENS.search(answer)
        gateway.metrics.observe(alias, elapsed, None, int(tokens.group(1)) if tokens else 0)
        gateway.record(request, request_id, alias, served, elapsed, req=req, answer=answer)
        content = answer.replace(*rename) if rename else answer
        headers = {**overhead_header(request.scope, elapsed), REQUEST_ID: request_id, SERVED: served}
        return Response(content, media_type="application/json", headers=headers)
    gateway.admit()
    stream = functools.partial(_stream, gateway, request, req, path, body, rename, request_id, started)
    headers = {REQUEST_ID: request_id, SERVED: served}
    waits = gateway.metrics.slow_client_waits.inc
    return RelayedStream(stream, headers=headers, direct=gateway.config.direct_relay, on_wait=waits)


async def _stream(
    gateway: Gateway,
    request: Request,
    req: CompletionRequest | ChatCompletionRequest,
    path: str,
    body: dict[str, Any],
    rename: tuple[bytes, bytes] | None,
    request_id: str,
    started: float,
    write: Write | None,
) -> AsyncIterator[bytes]:
    """The answer's events: with ``write`` (the client's socket, ``serving.relay``) the engine's events go there
    and this yields only what the gateway adds (an error event, ``[DONE]``); without, it yields every event."""
    first, chunks, count, error = None, [], 0, None
    gateway.metrics.relayed("general" if write is None else "direct")
    try:
        async with gateway.slot(body["model"]):
            if write is not None:
                keep = gateway.log is not None
                relayed = await gateway.upstream.relay(path, body, request_id, write, keep=keep, rename=rename)
                first, count, chunks = relayed.first_at, relayed.events, relayed.data
            else:
                async for batch in gateway.upstream.events(path, body, request_id):
                    first = first or time.perf_counter()
                    chunks += batch
                    count += len(batch)
                    events = b"".join([b"data: " + data + b"\n\n" for data in batch])
                    yield events.replace(*rename) if rename else events
        elapsed = time.perf_counter() - started
        gateway.metrics.observe(req.model, elapsed, (first or time.perf_counter()) - started, count)
    except GatewayError as exc:  # the stream had started: OpenAI's in-stream error event
        yield b"data: " + json.dumps(openai_error(exc.status, exc.message, exc.param)).encode() + b"\n\n"
        error = exc.message
    gateway.record(
        request,
        request_id,
        req.model,
        body["model"],
        time.perf_counter() - started,
        req=req,
        chunks=chunks,
        error=error,
    )
    yield b"data: [DONE]\n\n"


@router.post("/completions", **GENERATED)
async def completions(req: CompletionRequest, request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    gateway.check_prompts([req.prompt] if isinstance(req.prompt, str) else req.prompt)
    return await _relay(gateway, request, "/v1/completions", req, req.max_tokens)


@router.post("/chat/completions", **GENERATED)
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    gateway.check_prompts(["".join(m.text() for m in req.messages)], param="messages")
    return await _relay(gateway, request, "/v1/chat/completions", req, req.max_completion_tokens or req.max_tokens)


@router.get("/models", response_model=OpenAIObject)
async def models(request: Request, gateway: GatewayDep) -> dict[str, Any]:
    """What this caller's key may call, once each, by name (no filesystem paths): with a registry, base and every
    registered model with its aliases and versions; without one, the aliases and every model vLLM serves."""
    names = gateway.callable_models(request)
    if gateway.registry is None:
        names += [n for n in sorted(await gateway.upstream_models()) if n not in names]
        allowed = getattr(request.state, "models", None)
        names = [n for n in names if allowed is None or n in allowed]
    data = [{"id": name, "object": "model", "owned_by": "tuneship"} for name in names]
    return {"object": "list", "data": data}
