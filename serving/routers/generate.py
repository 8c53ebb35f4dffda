"""The seed's endpoints: ``POST /generate`` (SSE, or one JSON answer) and ``POST /generate/batch``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ConfigDict, Field

from serving.gateway import Gateway, GatewayDep, GatewayError, require_api_key

router = APIRouter(tags=["generate"], dependencies=[Depends(require_api_key)])


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    max_tokens: int = Field(default=128, gt=0)
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=0.9, gt=0, le=1)
    model: str = "champion"
    stream: bool = True


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(min_length=1)
    max_tokens: int = Field(default=128, gt=0)
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=0.9, gt=0, le=1)
    model: str = "champion"


def _completion(model: str, prompt: str, req: GenerateRequest | BatchRequest) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
    }


@router.post("/generate")
async def generate(req: GenerateRequest, gateway: GatewayDep) -> Response:
    gateway.check_limits(req.prompt, req.max_tokens)
    body = _completion(await gateway.served(req.model), req.prompt, req)
    started = time.perf_counter()
    if not req.stream:
        async with gateway.slot(body["model"]):
            result = await gateway.upstream.complete("/v1/completions", body)
        choice, usage = result["choices"][0], result.get("usage") or {}
        gateway.metrics.observe(req.model, time.perf_counter() - started, None, usage.get("completion_tokens", 0))
        return JSONResponse({"text": choice["text"], "finish_reason": choice.get("finish_reason"), "usage": usage})
    gateway.admit()
    return EventSourceResponse(_sse(gateway, req.model, body, started))


async def _sse(gateway: Gateway, alias: str, body: dict[str, Any], started: float) -> AsyncIterator[bytes]:
    first: float | None = None
    finish, usage, tokens = None, {}, 0
    try:
        async with gateway.slot(body["model"]):
            async for chunk in gateway.upstream.stream("/v1/completions", body):
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    if choice.get("text"):
                        first = first or time.perf_counter()
                        tokens += 1
                        yield format_sse_event(data_str=json.dumps({"text": choice["text"]}))
                    finish = choice.get("finish_reason") or finish
        elapsed, ttft = time.perf_counter() - started, (first or time.perf_counter()) - started
        gateway.metrics.observe(alias, elapsed, ttft, usage.get("completion_tokens", tokens))
        yield format_sse_event(data_str=json.dumps({"finish_reason": finish, "usage": usage}))
    except GatewayError as exc:  # the stream had started: report in-band, then end it properly
        yield format_sse_event(event="error", data_str=json.dumps({"detail": exc.message, "status": exc.status}))
    yield format_sse_event(data_str="[DONE]")


@router.post("/generate/batch")
async def generate_batch(req: BatchRequest, gateway: GatewayDep) -> dict[str, Any]:
    config = gateway.config
    if len(req.prompts) > config.max_batch:
        raise gateway.refuse(422, f"batch of {len(req.prompts)} prompts; the limit is {config.max_batch}")
    gateway.check_limits("", req.max_tokens)
    model = await gateway.served(req.model)
    gate = asyncio.Semaphore(config.batch_concurrency)

    async def one(prompt: str) -> dict[str, Any]:
        if len(prompt) > config.max_prompt_chars:
            return {"error": f"prompt is {len(prompt)} characters; the limit is {config.max_prompt_chars}"}
        async with gate:
            try:
                async with gateway.slot(model):
                    result = await gateway.upstream.complete("/v1/completions", _completion(model, prompt, req))
            except GatewayError as exc:
                return {"error": exc.message}
        choice = result["choices"][0]
        return {"text": choice["text"], "finish_reason": choice.get("finish_reason")}

    return {"results": await asyncio.gather(*(one(p) for p in req.prompts))}
