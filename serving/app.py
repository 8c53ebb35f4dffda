"""The FastAPI gateway in front of vLLM: ``/generate`` (SSE), ``/generate/batch``, the OpenAI API, auth,
limits, backpressure and Prometheus metrics.

    app = create_app(GatewayConfig(api_keys=["k"], aliases={"champion": "adapter-3f2a"}), VllmUpstream(url))
    uvicorn.run(app, host="127.0.0.1", port=8080)

Routes stay thin: validate, map the model alias to what vLLM serves, take a slot from the limiter, forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ConfigDict, Field

from serving.metrics import GatewayMetrics
from serving.routes import RouteConflict, RouteTable
from serving.upstream import Upstream, UpstreamError


class GatewayConfig(BaseModel):
    """What the gateway enforces. Built from environment settings at the edge (``tuneship serve``)."""

    model_config = ConfigDict(frozen=True)

    api_keys: list[str] = Field(default_factory=list, description="Bearer keys; empty: open.")
    admin_keys: list[str] = Field(default_factory=list, description="Keys for /admin; empty: api_keys.")
    aliases: dict[str, str] = Field(default_factory=dict, description="alias (champion, challenger) → served model")
    canary_share: float = Field(default=0.0, ge=0, le=1, description="share of champion traffic sent to challenger")
    max_prompt_chars: int = 8000
    max_tokens_cap: int = 512
    max_batch: int = 64
    max_in_flight: int = 64
    max_queue: int = 256
    batch_concurrency: int = 16


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


class RouteSwitch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str = Field(min_length=1, description="a model the upstream serves (base or a loaded adapter)")
    expect: str | None = Field(default=None, description="switch only if the alias still points here")


class CanaryShare(BaseModel):
    share: float = Field(ge=0, le=1)


class Overloaded(Exception):
    pass


class Limiter:
    """At most ``max_in_flight`` requests upstream and ``max_queue`` waiting; beyond that, refuse at once."""

    def __init__(self, max_in_flight: int, max_queue: int, metrics: GatewayMetrics) -> None:
        self.slots = asyncio.Semaphore(max_in_flight)
        self.capacity = max_in_flight + max_queue
        self.admitted = 0
        self.metrics = metrics

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.admitted >= self.capacity:
            raise Overloaded
        self.admitted += 1
        self.metrics.queue_depth.inc()
        queued = True
        try:
            await self.slots.acquire()
            self.metrics.queue_depth.dec()
            queued = False
            self.metrics.in_flight.inc()
            try:
                yield
            finally:
                self.metrics.in_flight.dec()
                self.slots.release()
        finally:
            if queued:  # cancelled while waiting
                self.metrics.queue_depth.dec()
            self.admitted -= 1


def create_app(config: GatewayConfig, upstream: Upstream) -> FastAPI:
    """Build the gateway around ``upstream``; every piece of state lives on this app, none in modules."""
    metrics = GatewayMetrics()
    limiter = Limiter(config.max_in_flight, config.max_queue, metrics)
    routes = RouteTable(config.aliases, canary_share=config.canary_share)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await upstream.aclose()

    app = FastAPI(title="tuneship gateway", lifespan=lifespan)
    app.state.config = config
    app.state.metrics = metrics
    app.state.routes = routes
    metrics.track_routes(routes)

    def check_key(request: Request, keys: list[str]) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        # Compare against every key, in constant time, so timing tells nothing about which prefix matched.
        if not any([hmac.compare_digest(token.encode(), key.encode()) for key in keys]):  # noqa: C419
            metrics.errors.labels(status="401").inc()
            raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})

    def authorize(request: Request) -> None:
        check_key(request, config.api_keys)

    def authorize_admin(request: Request) -> None:
        check_key(request, config.admin_keys or config.api_keys)

    auth, admin = [Depends(authorize)], [Depends(authorize_admin)]

    async def served(name: str) -> str:
        target = routes.resolve(name)
        if target is not None:
            return target
        try:
            known = {m["id"] for m in await upstream.models()}
        except UpstreamError as exc:
            metrics.errors.labels(status="503").inc()
            raise HTTPException(503, str(exc)) from None
        if name in known:
            return name
        metrics.errors.labels(status="422").inc()
        raise HTTPException(422, f"unknown model {name!r}: use one of {sorted(set(routes.aliases) | known)}")

    def check_limits(prompt: str, max_tokens: int) -> None:
        if len(prompt) > config.max_prompt_chars:
            metrics.errors.labels(status="422").inc()
            raise HTTPException(422, f"prompt is {len(prompt)} characters; the limit is {config.max_prompt_chars}")
        if max_tokens > config.max_tokens_cap:
            metrics.errors.labels(status="422").inc()
            raise HTTPException(422, f"max_tokens {max_tokens} is over the cap of {config.max_tokens_cap}")

    def overloaded() -> JSONResponse:
        metrics.errors.labels(status="429").inc()
        return JSONResponse({"detail": "overloaded: too many requests in flight"}, 429, headers={"Retry-After": "1"})

    def upstream_down(exc: UpstreamError) -> JSONResponse:
        status = exc.status if exc.status < 500 else 503
        metrics.errors.labels(status=str(status)).inc()
        return JSONResponse({"detail": str(exc)}, status)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        try:
            models = {m["id"] for m in await upstream.models()}
        except UpstreamError as exc:
            return JSONResponse({"ready": False, "detail": str(exc)}, 503)
        missing = {a: m for a, m in routes.aliases.items() if m not in models}
        if not models or missing:
            return JSONResponse({"ready": False, "detail": f"not loaded upstream: {missing or 'no model'}"}, 503)
        return JSONResponse({"ready": True, "models": sorted(models)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/generate", dependencies=auth)
    async def generate(req: GenerateRequest) -> Response:
        check_limits(req.prompt, req.max_tokens)
        body = {
            "model": await served(req.model),
            "prompt": req.prompt,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
        }
        started = time.perf_counter()
        if not req.stream:
            try:
                async with limiter.slot(), routes.track(body["model"]):
                    result = await upstream.complete("/v1/completions", body)
            except Overloaded:
                return overloaded()
            except UpstreamError as exc:
                return upstream_down(exc)
            choice, usage = result["choices"][0], result.get("usage") or {}
            metrics.observe(req.model, time.perf_counter() - started, None, usage.get("completion_tokens", 0))
            return JSONResponse({"text": choice["text"], "finish_reason": choice.get("finish_reason"), "usage": usage})
        if limiter.admitted >= limiter.capacity:
            return overloaded()
        return EventSourceResponse(_sse(req.model, body, started))

    async def _sse(alias: str, body: dict[str, Any], started: float) -> AsyncIterator[bytes]:
        first: float | None = None
        finish, usage, tokens = None, {}, 0
        try:
            async with limiter.slot(), routes.track(body["model"]):
                async for chunk in upstream.stream("/v1/completions", body):
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices", []):
                        if choice.get("text"):
                            first = first or time.perf_counter()
                            tokens += 1
                            yield format_sse_event(data_str=json.dumps({"text": choice["text"]}))
                        finish = choice.get("finish_reason") or finish
            metrics.observe(
                alias,
                time.perf_counter() - started,
                (first or time.perf_counter()) - started,
                usage.get("completion_tokens", tokens),
            )
            yield format_sse_event(data_str=json.dumps({"finish_reason": finish, "usage": usage}))
        except Overloaded:
            metrics.errors.labels(status="429").inc()
            yield format_sse_event(event="error", data_str=json.dumps({"detail": "overloaded"}))
        except UpstreamError as exc:  # the stream had started: report in-band, then end it properly
            metrics.errors.labels(status="502").inc()
            yield format_sse_event(event="error", data_str=json.dumps({"detail": str(exc)}))
        yield format_sse_event(data_str="[DONE]")

    @app.post("/generate/batch", dependencies=auth)
    async def generate_batch(req: BatchRequest) -> JSONResponse:
        if len(req.prompts) > config.max_batch:
            metrics.errors.labels(status="422").inc()
            raise HTTPException(422, f"batch of {len(req.prompts)} prompts; the limit is {config.max_batch}")
        if req.max_tokens > config.max_tokens_cap:
            check_limits("", req.max_tokens)
        model = await served(req.model)
        gate = asyncio.Semaphore(config.batch_concurrency)

        async def one(prompt: str) -> dict[str, Any]:
            if len(prompt) > config.max_prompt_chars:
                return {"error": f"prompt is {len(prompt)} characters; the limit is {config.max_prompt_chars}"}
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": req.max_tokens,
                "temperature": req.temperature,
                "top_p": req.top_p,
            }
            async with gate:
                try:
                    async with limiter.slot(), routes.track(model):
                        result = await upstream.complete("/v1/completions", body)
                except Overloaded:
                    return {"error": "overloaded: retry later"}
                except UpstreamError as exc:
                    return {"error": str(exc)}
            choice = result["choices"][0]
            return {"text": choice["text"], "finish_reason": choice.get("finish_reason")}

        results = await asyncio.gather(*(one(p) for p in req.prompts))
        return JSONResponse({"results": results})

    async def _openai(path: str, request: Request) -> Response:
        body = await request.json()
        if not isinstance(body, dict) or "model" not in body:
            raise HTTPException(422, "the body must be a JSON object with a 'model'")
        alias = body["model"]
        if int(body.get("max_tokens") or 0) > config.max_tokens_cap:
            check_limits("", int(body["max_tokens"]))
        body = {**body, "model": await served(alias)}
        started = time.perf_counter()
        if not body.get("stream"):
            try:
                async with limiter.slot(), routes.track(body["model"]):
                    result = await upstream.complete(path, body)
            except Overloaded:
                return overloaded()
            except UpstreamError as exc:
                return upstream_down(exc)
            metrics.observe(
                alias, time.perf_counter() - started, None, (result.get("usage") or {}).get("completion_tokens", 0)
            )
            return JSONResponse({**result, "model": alias})
        if limiter.admitted >= limiter.capacity:
            return overloaded()

        async def relay() -> AsyncIterator[bytes]:
            first, tokens = None, 0
            try:
                async with limiter.slot(), routes.track(body["model"]):
                    async for chunk in upstream.stream(path, {k: v for k, v in body.items() if k != "stream_options"}):
                        if chunk.get("choices"):
                            first = first or time.perf_counter()
                            tokens += 1
                        yield format_sse_event(data_str=json.dumps({**chunk, "model": alias}))
                metrics.observe(alias, time.perf_counter() - started, (first or time.perf_counter()) - started, tokens)
            except (Overloaded, UpstreamError) as exc:
                metrics.errors.labels(status="502").inc()
                yield format_sse_event(data_str=json.dumps({"error": {"message": str(exc) or "overloaded"}}))
            yield format_sse_event(data_str="[DONE]")

        return EventSourceResponse(relay())

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        return await _openai("/v1/completions", request)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        return await _openai("/v1/chat/completions", request)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> JSONResponse:
        try:
            upstream_models = await upstream.models()
        except UpstreamError as exc:
            return upstream_down(exc)
        data = [
            {"id": alias, "object": "model", "owned_by": "tuneship", "root": target}
            for alias, target in routes.aliases.items()
        ]
        return JSONResponse({"object": "list", "data": data + upstream_models})

    # ---- admin: what a deploy uses to switch an alias atomically and to wait for the old target to drain.

    @app.get("/admin/routes", dependencies=admin)
    async def get_routes() -> dict[str, Any]:
        return routes.snapshot()

    @app.put("/admin/routes/{alias}", dependencies=admin)
    async def switch_route(alias: str, req: RouteSwitch) -> JSONResponse:
        try:
            known = {m["id"] for m in await upstream.models()}
        except UpstreamError as exc:
            return upstream_down(exc)
        if req.target not in known:
            raise HTTPException(422, f"{req.target!r} is not served upstream; it serves {sorted(known)}")
        try:
            previous = routes.switch(alias, req.target, expect=req.expect)
        except RouteConflict as exc:
            raise HTTPException(409, str(exc)) from None
        return JSONResponse({"alias": alias, "target": req.target, "previous": previous})

    @app.put("/admin/canary", dependencies=admin)
    async def set_canary(req: CanaryShare) -> dict[str, Any]:
        routes.set_canary(req.share)
        return routes.snapshot()

    return app
