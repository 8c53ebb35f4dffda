"""The gateway's ASGI app, and its fast lane: the generating OpenAI routes taken without the framework's
per-request machinery.

Through FastAPI, each request passes five middleware layers, the router's nested route matching (one included
router after another) and dependency injection before its endpoint runs: about 0.14 CPU-ms per request on a
2-core CPU machine, as much as everything the gateway itself does for a short stream (``make bench``:
gateway_isolated). A lane serves ``POST`` to one route's path in one step: read the body (up to the size limit),
validate it with the route's own body model as FastAPI does (``json.loads``, then the model in Python mode), run
the route's own dependencies (each takes only the request: the key check), call the route's own endpoint, and
answer what they raise with the app's own exception handlers. Nothing is written twice: a :class:`Lane` is read off
the FastAPI route at startup, and :meth:`Lane.of` refuses a route that needs more of the framework than that.

A lane takes only what it can serve exactly as the route would. A body that is absent, chunked, over the limit,
not ``application/json``, not JSON or not valid goes on to FastAPI, with the body read so far handed on, so
every refusal of a bad body is FastAPI's own answer (one place for the 413 and 422 shapes). The lanes stand
aside altogether when middleware was added to the app after :func:`serving.app.create_app` built it (CORS,
tracing: those must see every request), when a dependency is overridden, and when FastAPI's OpenTelemetry
support is on.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.responses import Response
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from serving.middleware import ARRIVED, replay
from serving.relay import SERVER_SEND


@dataclass(frozen=True)
class Lane:
    """One route served in one step: its body model, its dependencies and its endpoint, as FastAPI would call them."""

    model: type[BaseModel]
    dependencies: tuple[Callable[[Request], Awaitable[Any]], ...]
    endpoint: Callable[..., Awaitable[Response]]
    body_name: str
    request_name: str

    @classmethod
    def of(cls, route: RouteContext) -> Lane:
        """The lane for ``route``; ValueError unless it is a POST whose endpoint takes one body model (not
        embedded) and the request, returns a Response, and whose dependencies are coroutines taking only the
        request, with none of their own."""
        dependant: Dependant = route.dependant
        problems = []
        if route.methods != {"POST"}:
            problems.append(f"methods {sorted(route.methods)}")
        body = dependant.body_params
        embedded = len(body) != 1 or getattr(body[0].field_info, "embed", False)
        model = None if embedded else body[0].field_info.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            problems.append("not one body model (not embedded)")
        if _other_params(dependant, body=1) or not inspect.iscoroutinefunction(route.endpoint):
            problems.append("an endpoint that takes more than the body and the request, or is not a coroutine")
        returns = inspect.signature(route.endpoint, eval_str=True).return_annotation
        if not (isinstance(returns, type) and issubclass(returns, Response)):
            problems.append(f"an endpoint that returns {returns}, not a Response")
        for sub in dependant.dependencies:
            if _other_params(sub, body=0) or not inspect.iscoroutinefunction(sub.call) or sub.scope == "request":
                problems.append(f"dependency {getattr(sub.call, '__name__', sub.call)} takes more than the request")
        if problems:
            raise ValueError(f"{route.path}: no fast lane for a route with {'; '.join(problems)}")
        assert model is not None and dependant.request_param_name is not None
        calls = tuple(sub.call for sub in dependant.dependencies if sub.call is not None)
        return cls(model, calls, route.endpoint, body[0].name, dependant.request_param_name)

    async def serve(self, app: FastAPI, scope: Scope, receive: Receive, send: Send, limit: int) -> Receive | None:
        """Serve the request; or, when it is not one this lane takes, the ``receive`` to hand it on to FastAPI
        with (the body read so far replayed). None: answered, or the client left while sending its body."""
        arrived = time.perf_counter()
        length = content_type = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"content-type":
                content_type = value
        if length is None or not length.isdigit() or int(length) > limit or not _is_json(content_type):
            return receive
        chunks = []
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        receive = replay(body, receive)
        try:
            req = self.model.model_validate(json.loads(body))
        except (ValueError, ValidationError):  # not JSON (not UTF-8 either), not valid: FastAPI's own 422
            return receive
        scope[ARRIVED], scope["app"] = arrived, app
        request = Request(scope, receive, send)
        try:
            for dependency in self.dependencies:
                await dependency(request)
            response = await self.endpoint(**{self.body_name: req, self.request_name: request})
        except Exception as exc:  # answered by the app's handler for it, as FastAPI's exception middleware does
            handler = _handler(app, exc)
            if handler is None:
                raise
            if inspect.iscoroutinefunction(handler):
                response = await handler(request, exc)
            else:  # a plain function, run in a thread as Starlette runs it
                response = await run_in_threadpool(handler, request, exc)
        await response(scope, receive, send)
        return None


def _handler(app: FastAPI, exc: Exception) -> Callable[[Request, Exception], Any] | None:
    """The app's handler for ``exc`` (by its class, then its bases; an HTTP error also by its status code), or
    None: unexpected, the server answers 500."""
    handlers: dict[Any, Any] = app.exception_handlers
    if isinstance(exc, HTTPException) and exc.status_code in handlers:
        return handlers[exc.status_code]
    return next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers and cls is not Exception), None)


def _other_params(dependant: Dependant, *, body: int) -> bool:
    """Whether ``dependant`` takes anything but the request and ``body`` body parameters."""
    return bool(
        dependant.path_params
        or dependant.query_params
        or dependant.header_params
        or dependant.cookie_params
        or len(dependant.body_params) != body
        or (body == 0 and bool(dependant.dependencies))
        or dependant.request_param_name is None
        or dependant.websocket_param_name
        or dependant.http_connection_param_name
        or dependant.response_param_name
        or dependant.background_tasks_param_name
        or dependant.security_scopes_param_name
    )


def _is_json(content_type: bytes | None) -> bool:
    return content_type is not None and content_type.split(b";", 1)[0].strip().lower() == b"application/json"


class GatewayApp(FastAPI):
    """FastAPI, keeping the server's own ``send`` in the scope (middleware wraps the one routes get;
    ``serving.relay`` writes to the server's socket), and serving the fast lanes (:meth:`open_lanes`)."""

    lanes: dict[str, Lane]
    body_limit: int
    _lanes_for: int  # how many middleware the app had when the lanes opened
    _lanes_open: bool | None = None  # decided on the first request, when the app's middleware is final
    # (dependency overrides, which tests set and clear at any time, are checked on every request)

    def open_lanes(self, paths: list[str], body_limit: int) -> None:
        """Serve ``POST`` to each of ``paths`` in a lane (call once the routes and middleware are in place)."""
        routes = {r.path: r for r in iter_route_contexts(self.routes) if isinstance(r.original_route, APIRoute)}
        self.lanes = {path: Lane.of(routes[path]) for path in paths}
        self.body_limit, self._lanes_for = body_limit, len(self.user_middleware)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND] = send
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and self._lanes_taken()
            and not self.dependency_overrides
        ):
            lane = self.lanes.get(scope["path"])
            if lane is not None:
                handed_on = await lane.serve(self, scope, receive, send, self.body_limit)
                if handed_on is None:
                    return
                receive = handed_on
        await super().__call__(scope, receive, send)

    def _lanes_taken(self) -> bool:
        if self._lanes_open is None:
            telemetry = getattr(self, "_native_telemetry", None)
            self._lanes_open = (
                bool(getattr(self, "lanes", None))
                and len(self.user_middleware) == self._lanes_for
                and not (telemetry is not None and telemetry.enabled())
            )
        return self._lanes_open
