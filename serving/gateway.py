"""What every route of the gateway shares: its configuration, its state, and one way to take a slot upstream.

A :class:`Gateway` lives on ``app.state.gateway`` (built by :func:`serving.app.create_app`); routes reach it with
the ``GatewayDep`` dependency. Each refusal is a :class:`GatewayError` (status, message, headers) counted in the
metrics once, where it is raised; the app answers it as JSON. ``Gateway.slot`` is the one place that admits a
request upstream and maps the upstream's failures: too many requests → 429, the engine's 4xx passed on, its
5xx or no answer → 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from serving.metrics import GatewayMetrics
from serving.routes import RouteTable
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


class GatewayError(Exception):
    """A request the gateway refuses or cannot serve: answered with ``status`` and ``{"detail": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class Limiter:
    """At most ``max_in_flight`` requests upstream and ``max_queue`` waiting; beyond that, refuse at once."""

    def __init__(self, max_in_flight: int, max_queue: int, metrics: GatewayMetrics) -> None:
        self.slots = asyncio.Semaphore(max_in_flight)
        self.capacity = max_in_flight + max_queue
        self.admitted = 0
        self.metrics = metrics

    @property
    def full(self) -> bool:
        return self.admitted >= self.capacity

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[bool]:
        """Wait for a slot and hold it; yields False at once (holding nothing) when the queue is full."""
        if self.full:
            yield False
            return
        self.admitted += 1
        self.metrics.queue_depth.inc()
        queued = True
        try:
            await self.slots.acquire()
            self.metrics.queue_depth.dec()
            queued = False
            self.metrics.in_flight.inc()
            try:
                yield True
            finally:
                self.metrics.in_flight.dec()
                self.slots.release()
        finally:
            if queued:  # cancelled while waiting
                self.metrics.queue_depth.dec()
            self.admitted -= 1


class Gateway:
    """The gateway's state and the checks every route applies: keys, model names, limits, slots."""

    def __init__(self, config: GatewayConfig, upstream: Upstream) -> None:
        self.config = config
        self.upstream = upstream
        self.metrics = GatewayMetrics()
        self.limiter = Limiter(config.max_in_flight, config.max_queue, self.metrics)
        self.routes = RouteTable(config.aliases, canary_share=config.canary_share)
        self.metrics.track_routes(self.routes)

    def refuse(self, status: int, message: str, headers: dict[str, str] | None = None) -> GatewayError:
        """Count a refusal and return it, to raise."""
        self.metrics.errors.labels(status=str(status)).inc()
        return GatewayError(status, message, headers)

    def overloaded(self) -> GatewayError:
        return self.refuse(429, "overloaded: too many requests in flight", {"Retry-After": "1"})

    def upstream_failed(self, exc: UpstreamError) -> GatewayError:
        return self.refuse(exc.status if exc.status < 500 else 503, str(exc))

    def check_key(self, request: Request, keys: list[str]) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        # Compare against every key, in constant time, so timing tells nothing about which prefix matched.
        if not any([hmac.compare_digest(token.encode(), key.encode()) for key in keys]):  # noqa: C419
            self.metrics.errors.labels(status="401").inc()
            raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})

    def check_limits(self, prompt: str, max_tokens: int) -> None:
        if len(prompt) > self.config.max_prompt_chars:
            limit = self.config.max_prompt_chars
            raise self.refuse(422, f"prompt is {len(prompt)} characters; the limit is {limit}")
        if max_tokens > self.config.max_tokens_cap:
            raise self.refuse(422, f"max_tokens {max_tokens} is over the cap of {self.config.max_tokens_cap}")

    async def upstream_models(self) -> set[str]:
        try:
            return {m["id"] for m in await self.upstream.models()}
        except UpstreamError as exc:
            raise self.upstream_failed(exc) from None

    async def served(self, name: str) -> str:
        """The upstream model behind ``name``: an alias from the route table, or a model vLLM serves."""
        target = self.routes.resolve(name)
        if target is not None:
            return target
        known = await self.upstream_models()
        if name in known:
            return name
        raise self.refuse(422, f"unknown model {name!r}: use one of {sorted(set(self.routes.aliases) | known)}")

    def admit(self) -> None:
        """Refuse a stream before it starts when the queue is full, so the client gets a 429, not an SSE error."""
        if self.limiter.full:
            raise self.overloaded()

    @contextlib.asynccontextmanager
    async def slot(self, model: str) -> AsyncIterator[None]:
        """Hold a slot upstream for ``model`` (counted for draining); failures become :class:`GatewayError`."""
        async with self.limiter.slot() as admitted:
            if not admitted:
                raise self.overloaded()
            try:
                async with self.routes.track(model):
                    yield
            except UpstreamError as exc:
                raise self.upstream_failed(exc) from None


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def require_api_key(request: Request, gateway: GatewayDep) -> None:
    gateway.check_key(request, gateway.config.api_keys)


def require_admin_key(request: Request, gateway: GatewayDep) -> None:
    gateway.check_key(request, gateway.config.admin_keys or gateway.config.api_keys)
