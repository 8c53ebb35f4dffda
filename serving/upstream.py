"""The gateway's narrow view of the inference engine: vLLM's OpenAI-compatible API over aiohttp.

The gateway depends on the :class:`Upstream` protocol only, so tests and other engines plug in through
``create_app(settings, upstream)``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import aiohttp
import httptools

from infra.vllm_server import unix_socket

Write = Callable[[bytes], bool | Awaitable[None]]
"""Where a relayed stream's events go: False back means the client left, an awaitable that it is slow to read."""


class UpstreamError(Exception):
    """The engine is unreachable or answered with an error."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


class Upstream(Protocol):
    async def complete(self, path: str, body: dict[str, Any], request_id: str | None = None) -> bytes: ...
    def events(self, path: str, body: dict[str, Any], request_id: str | None = None) -> AsyncIterator[list[bytes]]: ...
    async def relay(
        self,
        path: str,
        body: dict[str, Any],
        request_id: str | None,
        write: Write,
        *,
        keep: bool,
        rename: tuple[bytes, bytes] | None = None,
    ) -> Relayed: ...
    async def models(self) -> list[dict[str, Any]]: ...
    async def load_adapter(self, name: str, path: Path) -> None: ...
    async def unload_adapter(self, name: str) -> None: ...
    async def aclose(self) -> None: ...


ENGINE_KEEP_ALIVE_S = 5.0  # vLLM's own default (VLLM_HTTP_TIMEOUT_KEEP_ALIVE); tuneship passes its own setting


class VllmUpstream:
    """vLLM's OpenAI server at ``base_url`` (http(s), or ``unix:`` and the path of the socket vLLM's ``--uds``
    made); one pooled aiohttp session for every request.

    Answers come back as the engine's bytes (a JSON document, or one SSE event's data at a time): the gateway
    relays them without parsing and re-encoding what it only passes on. aiohttp parses HTTP in C; per streamed
    chunk it costs a fraction of a pure-Python HTTP stack (``make bench``: gateway_isolated).

    Idle connections are kept for the next request while the engine keeps them (``keep_alive_s``: vLLM's
    ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``), so a burst after a quiet spell does not open a connection per request.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 300.0,
        max_connections: int = 256,
        keep_alive_s: float = ENGINE_KEEP_ALIVE_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # unix:/path/vllm.sock (vLLM's --uds): requests go over that socket, to http://localhost/...
        self.unix_socket = unix_socket(self.base_url)
        http_url = "http://localhost" if self.unix_socket else self.base_url
        # The engine closes a connection idle for keep_alive_s; the gateway stops reusing it a second before, so
        # that no request is sent on a connection the engine is closing.
        self.reuse_s = max(keep_alive_s - 1.0, keep_alive_s / 2)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=5.0)
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._http_url = http_url
        self._split = urlsplit(http_url)
        extra = "".join(f"{name}: {value}\r\n" for name, value in (self.headers or {}).items())
        self._fixed_headers = (
            f"Host: {self._split.netloc}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n{extra}"
        )
        self._idle: collections.deque[tuple[float, _EngineConnection]] = collections.deque()

    @property
    def session(self) -> aiohttp.ClientSession:
        """Made on first use, inside the event loop that serves the app."""
        if self._session is None:
            limits = {"limit": self.max_connections, "limit_per_host": self.max_connections}
            connector = (
                aiohttp.UnixConnector(self.unix_socket, keepalive_timeout=self.reuse_s, **limits)
                if self.unix_socket
                else aiohttp.TCPConnector(keepalive_timeout=self.reuse_s, **limits)
            )
            self._session = aiohttp.ClientSession(
                self._http_url, connector=connector, timeout=self.timeout, headers=self.headers
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

    async def relay(
        self,
        path: str,
        body: dict[str, Any],
        request_id: str | None,
        write: Write,
        *,
        keep: bool,
        rename: tuple[bytes, bytes] | None = None,
    ) -> Relayed:
        """Stream an answer straight through: ``write`` gets whole SSE events (``data: ...\\n\\n``, one or more
        per call) as the engine's reads complete them, up to ``[DONE]`` (not included); when it returns False (the
        client left) the engine's request is dropped, when it returns an awaitable (the client is slow) the
        engine's connection is not read until that is done. With ``keep``, the events' data are kept too (for
        the request log); with ``rename`` (old, new), ``old`` is replaced by ``new`` in the events written. The
        gateway's streamed fast path (``serving.relay``); its connections are kept alive and reused, as the
        general path's are."""
        head = f"POST {self._split.path}{path} HTTP/1.1\r\n{self._fixed_headers}"
        if request_id:
            head += f"X-Request-Id: {request_id}\r\n"
        payload = json.dumps({**body, "stream": True}).encode()
        request = f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload
        connection = self._idle_connection()
        reused, loop = connection is not None, asyncio.get_running_loop()
        while True:
            if connection is None:
                connection = await self._connect()
            answer = connection.begin(write, keep, rename)
            expiry = loop.call_later(self.timeout.total, connection.expire)  # the answer fails: TimeoutError
            try:
                connection.send(request)
                await answer.finished
            except BaseException:  # cancelled (client gone, shutdown): vLLM sees the close
                connection.close()
                raise
            finally:
                expiry.cancel()
            if reused and answer.failure is not None and not answer.received and not answer.expired:
                connection, reused = None, False  # the engine had closed this idle connection: once more, anew
                continue
            break
        if connection.reusable() and len(self._idle) < self.max_connections:
            self._idle.append((time.monotonic(), connection))
        else:
            connection.close()
        if answer.status not in (0, 200):  # 0: no answer's head came before the connection failed
            text = bytes(answer.error).decode(errors="replace")
            raise UpstreamError(f"vLLM answered {answer.status}: {text[:500]}", answer.status)
        if answer.failure is not None:
            raise self._unreachable(answer.failure, "failed mid-request")
        return answer.relayed

    def _idle_connection(self) -> _EngineConnection | None:
        """The most recently used idle connection still open; those idle longer than ``reuse_s`` are closed."""
        now = time.monotonic()
        while self._idle and (now - self._idle[0][0] > self.reuse_s or self._idle[0][1].closed):
            self._idle.popleft()[1].close()
        while self._idle:
            connection = self._idle.pop()[1]
            if not connection.closed:
                return connection
        return None

    async def _connect(self) -> _EngineConnection:
        split, loop = self._split, asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout.sock_connect):
                if self.unix_socket:
                    _, connection = await loop.create_unix_connection(_EngineConnection, self.unix_socket)
                else:
                    _, connection = await loop.create_connection(
                        _EngineConnection, split.hostname, split.port or (443 if split.scheme == "https" else 80),
                        ssl=split.scheme == "https" or None,
                    )  # fmt: skip
        except (OSError, TimeoutError) as exc:
            raise self._unreachable(exc) from None
        return connection

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
        while self._idle:
            self._idle.pop()[1].close()
        if self._session is not None:
            await self._session.close()


@dataclass
class Relayed:
    """What went through a relayed stream: events (tokens), when the first came, their data when kept."""

    events: int = 0
    first_at: float | None = None
    data: list[bytes] = field(default_factory=list)


_DONE = b"data: [DONE]\n\n"


class _Answer:
    """One streamed answer's state on an engine connection."""

    def __init__(self, write: Write, keep: bool, rename: tuple[bytes, bytes] | None) -> None:
        self.write, self.keep, self.rename = write, keep, rename
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.error = bytearray()
        self.pending = b""
        self.received = False
        self.done = False  # [DONE] seen, or the client left: nothing more is relayed
        self.left = False  # the client left
        self.failure: Exception | None = None
        self.relayed = Relayed()
        self.ended = False  # finished: bytes that still come are nobody's (a plain flag, read on every read)
        self.expired = False  # no end within the upstream's timeout


class _EngineConnection(asyncio.Protocol):
    """A kept-alive HTTP/1.1 connection to the engine carrying one streamed answer at a time. httptools (C) parses
    each response and its chunked framing; a read costs one Python call, which hands the whole SSE events it
    completed to the answer's ``write``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: _Answer | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.keep_alive = False
        self.resuming: asyncio.Task[None] | None = None

    def begin(self, write: Write, keep: bool, rename: tuple[bytes, bytes] | None) -> _Answer:
        if self.resuming is not None:  # the last answer's client was slow: reading may still be paused for it
            self.resuming.cancel()
            self.resuming = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self.answer, self.keep_alive = _Answer(write, keep, rename), False
        self.parser = httptools.HttpResponseParser(self)
        return self.answer

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.transport.write(request)

    def reusable(self) -> bool:
        answer = self.answer
        return not self.closed and answer is not None and answer.failure is None and not answer.left and self.keep_alive

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def expire(self) -> None:
        """The answer took longer than the upstream's timeout: it fails, and the connection closes."""
        if self.answer is not None and not self.answer.ended:
            self.answer.expired = True
            self.close()
            self._finish(TimeoutError())

    def data_received(self, data: bytes) -> None:
        answer = self.answer
        if answer is None or answer.ended:  # bytes nobody asked for: this connection is not usable
            self.close()
            return
        answer.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.close()
            self._finish(exc)

    def on_headers_complete(self) -> None:
        if self.answer is not None:
            self.answer.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        answer = self.answer
        if answer is None or answer.done:
            return
        if answer.status != 200:
            answer.error += body[: 4096 - len(answer.error)]
            return
        data = answer.pending + body if answer.pending else body
        end = data.rfind(b"\n\n") + 2
        if end == 1:  # no whole event yet
            answer.pending = data
            return
        events, answer.pending = data[:end], data[end:]
        if (cut := events.find(_DONE)) >= 0:
            events, answer.done = events[:cut], True
        if not events:
            return
        relayed = answer.relayed
        relayed.first_at = relayed.first_at or time.perf_counter()
        relayed.events += events.count(b"\n\n")
        if answer.keep:
            relayed.data += [e[6:] for e in events.split(b"\n\n") if e.startswith(b"data: ")]
        wrote = answer.write(events.replace(*answer.rename) if answer.rename else events)
        if wrote is False:  # the client left: drop the engine's request
            answer.done = answer.left = True
            self.close()
            self._finish(None)
        elif wrote is not True and self.transport is not None:
            self.transport.pause_reading()  # the client is slow: leave the rest in the kernel's buffers
            self.resuming = asyncio.ensure_future(self._resume(wrote))

    async def _resume(self, drained: Awaitable[None]) -> None:
        await drained
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # read now: the parser resets for the next message
        self._finish(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._finish(exc or ConnectionResetError("the engine closed the connection before the answer ended"))

    def _finish(self, failure: Exception | None) -> None:
        answer = self.answer
        if answer is not None and not answer.ended:
            answer.ended = True
            answer.failure = failure
            if not answer.finished.done():  # cancelled with the relay's task (the client left, a shutdown)
                answer.finished.set_result(None)


_JSON = {"content-type": "application/json"}


def _headers(request_id: str | None) -> dict[str, str]:
    return {**_JSON, "X-Request-Id": request_id} if request_id else _JSON
