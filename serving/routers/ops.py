"""Health, readiness and Prometheus metrics: open, for load balancers and scrapers."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from serving.gateway import GatewayDep, GatewayError

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


class Readiness(BaseModel):
    ready: bool
    models: list[str] = []
    detail: str | None = None


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}})
async def ready(gateway: GatewayDep) -> JSONResponse:
    try:
        models = await gateway.upstream_models()
    except GatewayError as exc:
        return JSONResponse({"ready": False, "detail": exc.message}, 503)
    if gateway.registry is not None and gateway.catalog is None:
        return JSONResponse({"ready": False, "detail": "the registry has not been read yet"}, 503)
    # Static routes and pinned champions must be loaded; other registered versions load on their first request.
    wanted = {a: m for a, m in gateway.routes.aliases.items() if "@" not in a}
    wanted |= {m: m for m in (gateway.adapters.pinned if gateway.adapters else ())}
    missing = {a: m for a, m in wanted.items() if m not in models}
    if not models or missing:
        return JSONResponse({"ready": False, "detail": f"not loaded upstream: {missing or 'no model'}"}, 503)
    return JSONResponse({"ready": True, "models": sorted(models)})


@router.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def prometheus(gateway: GatewayDep) -> Response:
    body, content_type = gateway.metrics.render()
    return Response(body, media_type=content_type)
