"""The gateway's narrow view of the inference engine: vLLM's OpenAI-compatible API over httpx.

The gateway depends on the :class:`Upstream` protocol only, so tests and other engines plug in through
``create_app(settings, upstream)``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

import httpx


class UpstreamError(Exception):
    """The engine is unreachable or answered with an error."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


class Upstream(Protocol):
    async def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]: ...
    def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...
    async def models(self) -> list[dict[str, Any]]: ...
    async def aclose(self) -> None: ...


class VllmUpstream:
    """vLLM's OpenAI server at ``base_url``; one pooled async client for every request."""

    def __init__(self, base_url: str, *, timeout: float = 300.0, max_connections: int = 256) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self.client.post(path, json={**body, "stream": False})
        except httpx.HTTPError as exc:
            raise UpstreamError(f"vLLM at {self.base_url} is unreachable: {exc.__class__.__name__}") from None
        if response.status_code != 200:
            raise UpstreamError(f"vLLM answered {response.status_code}: {response.text[:500]}", response.status_code)
        return response.json()

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Parsed chunks of a streamed completion; leaving the loop closes the upstream request (vLLM aborts it)."""
        payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
        try:
            async with self.client.stream("POST", path, json=payload) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    raise UpstreamError(f"vLLM answered {response.status_code}: {text[:500]}", response.status_code)
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        return
                    yield json.loads(data)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"vLLM at {self.base_url} failed mid-request: {exc.__class__.__name__}") from None

    async def models(self) -> list[dict[str, Any]]:
        try:
            response = await self.client.get("/v1/models")
        except httpx.HTTPError as exc:
            raise UpstreamError(f"vLLM at {self.base_url} is unreachable: {exc.__class__.__name__}") from None
        if response.status_code != 200:
            raise UpstreamError(f"vLLM answered {response.status_code} to /v1/models")
        return list(response.json()["data"])

    async def aclose(self) -> None:
        await self.client.aclose()
