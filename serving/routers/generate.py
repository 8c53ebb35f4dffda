"""The seed's endpoints: ``POST /generate`` (SSE, or one JSON answer) and ``POST /generate/batch``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.contract import (
    SSE_EVENT,
    BatchRequest,
    BatchResult,
    GenerateRequest,
    GenerateResult,
    Problem,
    error_responses,
)
from serving.gateway import Gateway, GatewayDep, GatewayError, require_api_key
from serving.middleware import overhead_header

router = APIRouter(
    tags=["generate"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(Problem, 401, 413, 422, 429, 503),
)
STREAM = {"text/event-stream": {"schema": SSE_EVENT}}


def _completion(model: str, prompt: str, max_tokens: int, req: GenerateRequest | BatchRequest) -> dict[str, Any]:
    sampling = {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p}
    return {"model": model, "prompt": prompt, **sampling}


def sse(data: str, event: str | None = None) -> bytes:
    return (f"event: {event}\ndata: {data}\n\n" if event else f"data: {data}\n\n").encode()


@router.post(
    "/generate",
    response_model=GenerateResult,
    responses={200: {"content": STREAM, "description": "stream=true: text deltas as server-sent events"}},
)
async def generate(req: GenerateRequest, request: Request, gateway: GatewayDep) -> Response:
    gateway.check_prompts([req.prompt])
    body = _completion(await gateway.served(req.model), req.prompt, gateway.max_tokens(req.max_tokens), req)
    started = time.perf_counter()
    if not req.stream:
        async with gateway.slot(body["model"]):
            result = json.loads(await gateway.upstream.complete("/v1/completions", body))
        elapsed = time.perf_counter() - started
        choice, usage = result["choices"][0], result.get("usage") or {}
        gateway.metrics.observe(req.model, elapsed, None, usage.get("completion_tokens", 0))
        answer = {"text": choice["text"], "finish_reason": choice.get("finish_reason"), "usage": usage}
        return JSONResponse(answer, headers=overhead_header(request.scope, elapsed))
    gateway.admit()
    body["stream_options"] = {"include_usage": True}
    return StreamingResponse(_sse(gateway, req.model, body, started), media_type="text/event-stream")


async def _sse(gateway: Gateway, alias: str, body: dict[str, Any], started: float) -> AsyncIterator[bytes]:
    first: float | None = None
    finish, usage, tokens = None, {}, 0
    try:
        async with gateway.slot(body["model"]):
            async for batch in gateway.upstream.events("/v1/completions", body):
                deltas = []
                for chunk in map(json.loads, batch):
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices", ()):
                        if choice.get("text"):
                            deltas.append(sse(json.dumps({"text": choice["text"]})))
                        finish = choice.get("finish_reason") or finish
                if deltas:
                    first = first or time.perf_counter()
                    tokens += len(deltas)
                    yield b"".join(deltas)
        elapsed, ttft = time.perf_counter() - started, (first or time.perf_counter()) - started
        gateway.metrics.observe(alias, elapsed, ttft, usage.get("completion_tokens", tokens))
        yield sse(json.dumps({"finish_reason": finish, "usage": usage}))
    except GatewayError as exc:  # the stream had started: report in-band, then end it properly
        yield sse(json.dumps({"detail": exc.message, "status": exc.status}), event="error")
    yield sse("[DONE]")


@router.post("/generate/batch", response_model=BatchResult)
async def generate_batch(req: BatchRequest, gateway: GatewayDep) -> dict[str, Any]:
    config = gateway.config
    if len(req.prompts) > config.max_batch:
        raise gateway.refuse(422, f"batch of {len(req.prompts)} prompts; the limit is {config.max_batch}")
    max_tokens = gateway.max_tokens(req.max_tokens)
    model = await gateway.served(req.model)
    gate = asyncio.Semaphore(config.batch_concurrency)

    async def one(prompt: str) -> dict[str, Any]:
        if not prompt or len(prompt) > config.max_prompt_chars:
            return {"error": f"prompt is {len(prompt)} characters; allowed: 1 to {config.max_prompt_chars}"}
        async with gate:
            try:
                async with gateway.slot(model):
                    body = _completion(model, prompt, max_tokens, req)
                    result = json.loads(await gateway.upstream.complete("/v1/completions", body))
            except GatewayError as exc:
                return {"error": exc.message}
        choice = result["choices"][0]
        return {"text": choice["text"], "finish_reason": choice.get("finish_reason")}

    return {"results": await asyncio.gather(*(one(p) for p in req.prompts))}
