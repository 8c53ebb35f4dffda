"""The FastAPI gateway in front of vLLM: ``/generate`` (SSE), ``/generate/batch``, the OpenAI API, auth,
limits, backpressure and Prometheus metrics.

    app = create_app(GatewayConfig(api_keys=["k"], aliases={"champion": "adapter-3f2a"}), VllmUpstream(url))
    uvicorn.run(app, host="127.0.0.1", port=8080)

Routes stay thin (``serving/routers/``): validate, map the model alias to what vLLM serves, take a slot, forward.
Their shared state and checks are ``serving.gateway.Gateway``, one per app.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from serving.gateway import Gateway, GatewayConfig, GatewayError
from serving.routers import admin, generate, openai, ops
from serving.upstream import Upstream

__all__ = ["GatewayConfig", "create_app"]


def create_app(config: GatewayConfig, upstream: Upstream) -> FastAPI:
    """Build the gateway around ``upstream``; every piece of state lives on this app, none in modules."""
    gateway = Gateway(config, upstream)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await upstream.aclose()

    app = FastAPI(title="tuneship gateway", lifespan=lifespan)
    app.state.gateway = gateway
    for router in (ops.router, generate.router, openai.router, admin.router):
        app.include_router(router)

    @app.exception_handler(GatewayError)
    async def refused(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, exc.status, headers=exc.headers)

    return app
