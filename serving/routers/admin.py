"""Admin routes (their own keys): what a deploy uses to move a gateway onto the registry's aliases (or, on a gateway
without a registry, to switch an alias atomically) and to watch the old target drain."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from serving.contract import Problem, error_responses
from serving.gateway import Gateway, GatewayDep, GatewayError, require_admin_key
from serving.routes import RouteConflict

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin_key)],
    responses={**error_responses(Problem, 401, 403, 413, 422, 503), 409: {"model": Problem}},
)


class RouteSwitch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    target: str = Field(min_length=1, max_length=256, description="a model the upstream serves")
    expect: str | None = Field(default=None, max_length=256, description="switch only if the alias still points here")


class CanaryShare(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    share: float = Field(ge=0, le=1)


def _snapshot(gateway: Gateway) -> dict[str, Any]:
    routes = gateway.routes.snapshot()
    if gateway.adapters is not None:
        adapters = gateway.adapters
        routes["adapters"] = {"loaded": list(adapters.loaded), "pinned": sorted(adapters.pinned)}
    return routes


@router.get("/routes")
async def get_routes(gateway: GatewayDep) -> dict[str, Any]:
    return _snapshot(gateway)


@router.post("/refresh")
async def refresh(gateway: GatewayDep) -> dict[str, Any]:
    """Re-read the registry now (a deploy calls this on every replica), and answer the routes it gave."""
    try:
        await gateway.refresh()
    except GatewayError:
        raise
    except Exception as exc:  # noqa: BLE001 - the registry or vLLM unreachable: the last routes stay
        raise gateway.refuse(503, f"registry not read, the last routes stay: {exc.__class__.__name__}: {exc}") from None
    return _snapshot(gateway)


@router.put("/routes/{alias}")
async def switch_route(alias: str, req: RouteSwitch, gateway: GatewayDep) -> dict[str, Any]:
    if gateway.registry is not None and "@" in alias:
        message = f"{alias} follows the registry: move the MLflow alias, then POST /admin/refresh"
        raise gateway.refuse(409, message)
    known = await gateway.upstream_models()
    if req.target not in known:
        raise gateway.refuse(422, f"{req.target!r} is not served upstream; it serves {sorted(known)}")
    try:
        previous = gateway.routes.switch(alias, req.target, expect=req.expect)
    except RouteConflict as exc:
        raise gateway.refuse(409, str(exc)) from None
    return {"alias": alias, "target": req.target, "previous": previous}


@router.put("/canary")
async def set_canary(req: CanaryShare, gateway: GatewayDep) -> dict[str, Any]:
    gateway.routes.set_canary(req.share)
    return gateway.routes.snapshot()
