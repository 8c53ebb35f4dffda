"""The gateway's one ASGI middleware: the request-body size limit (413), and the request's arrival time.

Pure ASGI (no ``BaseHTTPMiddleware``), and it does not wrap ``send``: a streamed answer's chunks go to the
server without passing through it. It leaves the request's arrival time in the scope (``ARRIVED``) for
:func:`overhead_header`, which a route that waited on the engine puts on its answer: ``X-Tuneship-Overhead-Ms``,
the time the request spent in the gateway itself (arrival to answer, less the engine's part). The generating
routes' fast lane (``serving.lane``) does the same for the requests it serves.
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.contract import openai_error

OVERHEAD_HEADER = "x-tuneship-overhead-ms"
ARRIVED = "tuneship.arrived"


def overhead_header(scope: Scope, upstream_s: float) -> dict[str, str]:
    """``X-Tuneship-Overhead-Ms`` for an answer that waited ``upstream_s`` on the engine."""
    return {OVERHEAD_HEADER: f"{(time.perf_counter() - scope[ARRIVED] - upstream_s) * 1000:.3f}"}


class BodyLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int, errors: Any) -> None:
        self.app, self.max_bytes, self.errors = app, max_bytes, errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVED] = time.perf_counter()
        length = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(scope, send)
            return
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, more = b"", True
            while more:  # a chunked body: read it up to the limit, then hand it on in one piece
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_bytes:
                    await self._too_large(scope, send)
                    return
            receive = replay(body, receive)
        await self.app(scope, receive, send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        self.errors.labels(status="413").inc()
        message = f"request body over the limit of {self.max_bytes} bytes"
        content = openai_error(413, message) if scope["path"].startswith("/v1/") else {"detail": message}
        body = json.dumps(content).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def replay(body: bytes, receive: Receive) -> Receive:
    """The body read in one piece, then the server's own ``receive``: it answers ``http.disconnect`` only when the
    client has gone (a streamed answer watches for that to stop)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
