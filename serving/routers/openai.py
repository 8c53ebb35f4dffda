"""The OpenAI-compatible API: ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``, relayed to vLLM
with the model alias resolved and answered under the alias the client asked for."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event

from serving.gateway import Gateway, GatewayDep, GatewayError, require_api_key
from serving.upstream import UpstreamError

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])


async def _relay(gateway: Gateway, path: str, request: Request) -> Response:
    body = await request.json()
    if not isinstance(body, dict) or "model" not in body:
        raise gateway.refuse(422, "the body must be a JSON object with a 'model'")
    alias, max_tokens = body["model"], body.get("max_tokens") or 0
    if not isinstance(alias, str) or not isinstance(max_tokens, int):
        raise gateway.refuse(422, "'model' must be a string and 'max_tokens' an integer")
    gateway.check_limits("", max_tokens)
    body = {**body, "model": await gateway.served(alias)}
    started = time.perf_counter()
    if not body.get("stream"):
        async with gateway.slot(body["model"]):
            result = await gateway.upstream.complete(path, body)
        tokens = (result.get("usage") or {}).get("completion_tokens", 0)
        gateway.metrics.observe(alias, time.perf_counter() - started, None, tokens)
        return JSONResponse({**result, "model": alias})
    gateway.admit()

    async def relay() -> AsyncIterator[bytes]:
        first, tokens = None, 0
        try:
            async with gateway.slot(body["model"]):
                async for chunk in gateway.upstream.stream(
                    path, {k: v for k, v in body.items() if k != "stream_options"}
                ):
                    if chunk.get("choices"):
                        first = first or time.perf_counter()
                        tokens += 1
                    yield format_sse_event(data_str=json.dumps({**chunk, "model": alias}))
            elapsed, ttft = time.perf_counter() - started, (first or time.perf_counter()) - started
            gateway.metrics.observe(alias, elapsed, ttft, tokens)
        except GatewayError as exc:
            yield format_sse_event(data_str=json.dumps({"error": {"message": exc.message, "code": exc.status}}))
        yield format_sse_event(data_str="[DONE]")

    return EventSourceResponse(relay())


@router.post("/completions")
async def completions(request: Request, gateway: GatewayDep) -> Response:
    return await _relay(gateway, "/v1/completions", request)


@router.post("/chat/completions")
async def chat_completions(request: Request, gateway: GatewayDep) -> Response:
    return await _relay(gateway, "/v1/chat/completions", request)


@router.get("/models")
async def models(gateway: GatewayDep) -> dict[str, Any]:
    try:
        upstream_models = await gateway.upstream.models()
    except UpstreamError as exc:
        raise gateway.upstream_failed(exc) from None
    data = [
        {"id": alias, "object": "model", "owned_by": "tuneship", "root": target}
        for alias, target in gateway.routes.aliases.items()
    ]
    return {"object": "list", "data": data + upstream_models}
