"""The seed's endpoints: ``POST /generate`` (SSE, or one JSON answer) and ``POST /generate/batch``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from infra.segments import new_request_id
from serving.contract import (
    SSE_EVENT,
    BatchRequest,
    BatchResult,
    GenerateRequest,
    GenerateResult,
    Problem,
    error_responses,
)
from serving.gateway import Gateway, GatewayError, require_api_key
from serving.middleware import overhead_header
from serving.request_log import REQUEST_ID_HEADER as REQUEST_ID
from serving.request_log import SERVED_HEADER as SERVED

router = APIRouter(
    tags=["generate"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(Problem, 401, 403, 413, 422, 429, 503),
)
STREAM = {"text/event-stream": {"schema": SSE_EVENT}}


def _completion(
    gateway: Gateway, model: str, prompt: str, max_tokens: int, req: GenerateRequest | BatchRequest
) -> dict[str, Any]:
    sampling = {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p}
    return {"model": model, "prompt": prompt, **sampling, **gateway.decoding(model)}


def sse(data: str, event: str | None = None) -> bytes:
    return (f"event: {event}\ndata: {data}\n\n" if event else f"data: {data}\n\n").encode()


@router.post(
    "/generate",
    response_model=GenerateResult,
    responses={200: {"content": STREAM, "description": "stream=true: text deltas as server-sent events"}},
)
async def generate(req: GenerateRequest, request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    gateway.check_prompts([req.prompt])
    served = await gateway.served(request, req.model)
    body = _completion(gateway, served, req.prompt, gateway.max_tokens(req.max_tokens), req)
    request_id = gateway.request_id(request, served)
    started = time.perf_counter()
    if not req.stream:
        async with gateway.slot(served):
            result = json.loads(await gateway.upstream.complete("/v1/completions", body, request_id))
        elapsed = time.perf_counter() - started
        choice, usage = result["choices"][0], result.get("usage") or {}
        gateway.metrics.observe(req.model, elapsed, None, usage.get("completion_tokens", 0))
        finish = choice.get("finish_reason")
        gateway.record(
            request,
            request_id,
            req.model,
            served,
            elapsed,
            req=req,
            text=choice["text"],
            finish_reason=finish,
            usage=usage,
        )
        answer = {"text": choice["text"], "finish_reason": finish, "usage": usage, "request_id": request_id}
        headers = {**overhead_header(request.scope, elapsed), REQUEST_ID: request_id, SERVED: served}
        return JSONResponse(answer, headers=headers)
    gateway.admit()
    body["stream_options"] = {"include_usage": True}
    events = _sse(gateway, request, req, body, request_id, started)
    return StreamingResponse(events, media_type="text/event-stream", headers={REQUEST_ID: request_id, SERVED: served})


async def _sse(
    gateway: Gateway, request: Request, req: GenerateRequest, body: dict[str, Any], request_id: str, started: float
) -> AsyncIterator[bytes]:
    first: float | None = None
    finish, usage, texts = None, {}, []
    try:
        async with gateway.slot(body["model"]):
            async for batch in gateway.upstream.events("/v1/completions", body, request_id):
                deltas = []
                for chunk in map(json.loads, batch):
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices", ()):
                        if choice.get("text"):
                            texts.append(choice["text"])
                            deltas.append(sse(json.dumps({"text": choice["text"]})))
                        finish = choice.get("finish_reason") or finish
                if deltas:
                    first = first or time.perf_counter()
                    yield b"".join(deltas)
        elapsed, ttft = time.perf_counter() - started, (first or time.perf_counter()) - started
        gateway.metrics.observe(req.model, elapsed, ttft, usage.get("completion_tokens", len(texts)))
        yield sse(json.dumps({"finish_reason": finish, "usage": usage, "request_id": request_id}))
        error = None
    except GatewayError as exc:  # the stream had started: report in-band, then end it properly
        yield sse(json.dumps({"detail": exc.message, "status": exc.status, "request_id": request_id}), event="error")
        error = exc.message
    elapsed = time.perf_counter() - started
    text = "".join(texts)
    gateway.record(
        request,
        request_id,
        req.model,
        body["model"],
        elapsed,
        req=req,
        text=text,
        finish_reason=finish,
        usage=usage,
        error=error,
    )
    yield sse("[DONE]")


@router.post("/generate/batch", response_model=BatchResult)
async def generate_batch(req: BatchRequest, request: Request) -> JSONResponse:
    gateway: Gateway = request.app.state.gateway
    config = gateway.config
    if len(req.prompts) > config.max_batch:
        raise gateway.refuse(422, f"batch of {len(req.prompts)} prompts; the limit is {config.max_batch}")
    max_tokens = gateway.max_tokens(req.max_tokens)
    model = await gateway.served(request, req.model)
    batch_id = new_request_id()  # the batch's; each answer has its own, for feedback
    gate = asyncio.Semaphore(config.batch_concurrency)

    async def one(index: int, prompt: str) -> dict[str, Any]:
        if not prompt or len(prompt) > config.max_prompt_chars:
            return {"error": f"prompt is {len(prompt)} characters; allowed: 1 to {config.max_prompt_chars}"}
        request_id = gateway.request_id(request, model, f"{batch_id}-{index}")
        async with gate:
            started = time.perf_counter()
            try:
                async with gateway.slot(model):
                    body = _completion(gateway, model, prompt, max_tokens, req)
                    result = json.loads(await gateway.upstream.complete("/v1/completions", body, request_id))
            except GatewayError as exc:
                return {"error": exc.message}
        choice = result["choices"][0]
        finish = choice.get("finish_reason")
        usage = result.get("usage") or {}
        elapsed = time.perf_counter() - started
        gateway.record(
            request,
            request_id,
            req.model,
            model,
            elapsed,
            prompt=prompt,
            text=choice["text"],
            finish_reason=finish,
            usage=usage,
        )
        return {"text": choice["text"], "finish_reason": finish, "request_id": request_id}

    results = await asyncio.gather(*(one(i, p) for i, p in enumerate(req.prompts)))
    return JSONResponse({"results": results}, headers={REQUEST_ID: batch_id, SERVED: model})
