"""The gateway's narrow view of the inference engine: vLLM's OpenAI-compatible API over aiohttp.

The gateway depends on the :class:`Upstream` protocol only, so tests and other engines plug in through
``create_app(settings, upstream)``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import aiohttp


class UpstreamError(Exception):
    """The engine is unreachable or answered with an error."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


class Upstream(Protocol):
    async def complete(self, path: str, body: dict[str, Any], request_id: str | None = None) -> bytes: ...
    def events(self, path: str, body: dict[str, Any], request_id: str | None = None) -> AsyncIterator[list[bytes]]: ...
    async def models(self) -> list[dict[str, Any]]: ...
    async def load_adapter(self, name: str, path: Path) -> None: ...
    async def unload_adapter(self, name: str) -> None: ...
    async def aclose(self) -> None: ...


class VllmUpstream:
    """vLLM's OpenAI server at ``base_url``; one pooled aiohttp session for every request.

    Answers come back as the engine's bytes (a JSON document, or one SSE event's data at a time): the gateway
    relays them without parsing and re-encoding what it only passes on. aiohttp parses HTTP in C; per streamed
    chunk it costs a fraction of a pure-Python HTTP stack (``make bench``: gateway_isolated).
    """

    def __init__(
        self, base_url: str, *, api_key: str | None = None, timeout: float = 300.0, max_connections: int = 256
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=5.0)
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """Made on first use, inside the event loop that serves the app."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=self.max_connections)
            self._session = aiohttp.ClientSession(
                self.base_url, connector=connector, timeout=self.timeout, headers=self.headers
            )
        return self._session

    def _unreachable(self, exc: Exception, when: str = "is unreachable") -> UpstreamError:
        return UpstreamError(f"vLLM at {self.base_url} {when}: {exc.__class__.__name__}")

    async def _refused(self, response: aiohttp.ClientResponse) -> UpstreamError:
        text = (await response.read()).decode(errors="replace")
        return UpstreamError(f"vLLM answered {response.status}: {text[:500]}", response.status)

    async def complete(self, path: str, body: dict[str, Any], request_id: str | None = None) -> bytes:
        """The engine's answer; ``request_id`` goes as ``X-Request-Id``, which vLLM makes its answer's id."""
        try:
            data = json.dumps({**body, "stream": False})
            async with self.session.post(path, data=data, headers=_headers(request_id)) as r:
                if r.status != 200:
                    raise await self._refused(r)
                return await r.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from None

    async def events(
        self, path: str, body: dict[str, Any], request_id: str | None = None
    ) -> AsyncIterator[list[bytes]]:
        """The data of the events of a streamed answer, up to ``[DONE]`` (not included), in batches: all that one
        read from the engine completed, so a relay writes them in one go. Leaving the loop closes the upstream
        request (vLLM aborts it)."""
        try:
            data = json.dumps({**body, "stream": True})
            async with self.session.post(path, data=data, headers=_headers(request_id)) as r:
                if r.status != 200:
                    raise await self._refused(r)
                pending, done = b"", False
                async for chunk in r.content.iter_any():  # read to the end, past [DONE]: the connection is reused
                    if done:
                        continue
                    pending += chunk
                    *complete, pending = pending.split(b"\n\n")
                    if b"data: [DONE]" in complete:
                        done = True
                        complete = complete[: complete.index(b"data: [DONE]")]
                    if batch := [event[6:] for event in complete if event.startswith(b"data: ")]:
                        yield batch
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc, "failed mid-request") from None

    async def models(self) -> list[dict[str, Any]]:
        try:
            async with self.session.get("/v1/models") as r:
                if r.status != 200:
                    raise UpstreamError(f"vLLM answered {r.status} to /v1/models")
                return list(json.loads(await r.read())["data"])
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from None

    async def load_adapter(self, name: str, path: Path) -> None:
        """Load a LoRA adapter directory (on vLLM's file system) under ``name`` (runtime LoRA updating)."""
        body = {"lora_name": name, "lora_path": str(path)}
        await self._admin("/v1/load_lora_adapter", body, ok_if="already been loaded")

    async def unload_adapter(self, name: str) -> None:
        """Unload the adapter ``name``; one vLLM no longer has is not an error."""
        await self._admin("/v1/unload_lora_adapter", {"lora_name": name}, ok_if="not found")

    async def _admin(self, path: str, body: dict[str, Any], *, ok_if: str) -> None:
        try:
            async with self.session.post(path, data=json.dumps(body), headers=_JSON) as r:
                if r.status != 200:
                    error = await self._refused(r)
                    if ok_if not in str(error).lower() and r.status != 404:
                        raise error
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


_JSON = {"content-type": "application/json"}


def _headers(request_id: str | None) -> dict[str, str]:
    return {**_JSON, "X-Request-Id": request_id} if request_id else _JSON
