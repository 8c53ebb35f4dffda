"""``POST /feedback``: a user's rating of one answer, and the right answer when they have it.

Only the API key that made the request may rate it (403 otherwise). An id the gateway never issued, or one
whose record should long be in the store and is not, is a 404. Feedback that arrives before its request's record
was written (another replica still holds it) is accepted and joined to it at curation time.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from infra.segments import parse_request_id
from serving.contract import FeedbackAccepted, FeedbackRequest, Problem, error_responses
from serving.gateway import GatewayDep, require_api_key

router = APIRouter(
    tags=["feedback"],
    dependencies=[Depends(require_api_key)],
    responses={
        **error_responses(Problem, 401, 413, 422, 429),
        403: {"model": Problem, "description": "the request was made with another API key"},
        404: {"model": Problem, "description": "no such request (or the request log is off)"},
    },
)


@router.post("/feedback", status_code=202, response_model=FeedbackAccepted)
async def feedback(req: FeedbackRequest, request: Request, gateway: GatewayDep) -> JSONResponse:
    log = gateway.log
    if log is None:
        raise gateway.refuse(404, "the request log is off (TUNESHIP_REQUEST_LOG=off): no request can be rated")
    parsed = parse_request_id(req.request_id)
    if parsed is None:
        raise gateway.refuse(404, f"no request {req.request_id!r}: not an id this gateway issues")
    request_id, issued = parsed
    origin = await asyncio.to_thread(log.origin, request_id)
    key_id = log.key_id(gateway.bearer(request))
    if origin is None:
        age = time.time() - issued
        if age > log.config.join_window_s or age < -60:
            raise gateway.refuse(404, f"no request {request_id!r} in the request log")
    elif origin.key_id != key_id:
        raise gateway.refuse(403, f"request {request_id!r} was made with another API key")
    log.rate(request_id, key_id, origin, rating=req.rating, correction=req.correction, comment=req.comment)
    return JSONResponse({"request_id": request_id, "joined": origin is not None}, 202)
