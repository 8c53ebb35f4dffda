"""The streamed answer's fast path: the engine's SSE events go straight to the client's socket.

Through the general path (a ``StreamingResponse`` over the upstream's event iterator) each streamed token passes
aiohttp's stream reader, an async generator, Starlette's response loop, two middleware ``send`` wrappers and the
server's ``send``: a few dozen Python frames per token. Here the engine's connection is an asyncio protocol whose
HTTP response httptools parses in C (``VllmUpstream.relay``), and each read from the engine costs one Python call
that writes one chunk frame to the client's transport. The answer's head and its end (the ``[DONE]`` event, the
last chunk) still go through ASGI, so the server keeps its own state: keep-alive, flow control, graceful shutdown;
a client that leaves cancels the stream (its slot freed, vLLM's request dropped), as under StreamingResponse.

It is on by default (``GatewayConfig.direct_relay``; ``TUNESHIP_GATEWAY_DIRECT_RELAY=false`` turns it off), and
it needs the server's transport. ``serving.lane.GatewayApp`` keeps the server's own ``send`` in the scope, and under
uvicorn's httptools protocol (what ``tuneship serve`` runs) that is the request cycle, whose transport the relay
writes to. Under any other server, or an in-process test client, :func:`client_socket` finds nothing and the
routes take the general path: the same events (``tests/integration/test_gateway_relay.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from serving.upstream import Write

SERVER_SEND = "tuneship.server_send"  # the server's own send, kept in the scope by serving.lane.GatewayApp


class _Tripwire(asyncio.Event):
    """Stands in for the request cycle's event, which uvicorn's protocol sets when the client disconnects: then it
    also calls ``on_gone``, once, so that no task need sit waiting on it."""

    def __init__(self, cycle: Any, on_gone: Callable[[], None]) -> None:
        super().__init__()
        self.cycle, self.on_gone = cycle, on_gone
        if cycle.message_event.is_set():
            super().set()

    def set(self) -> None:
        super().set()
        on_gone = self.on_gone
        if on_gone is not None and self.cycle.disconnected:
            self.on_gone = None
            on_gone()


@dataclass
class ClientSocket:
    """The client's end of one HTTP/1.1 exchange whose answer is chunked: frames are written to it directly."""

    # uvicorn's RequestResponseCycle: its transport, its flow control (write_paused while the client is slow to
    # read, drain() waits for it) and the event its protocol sets when the client disconnects
    cycle: Any

    def watch(self, on_gone: Callable[[], None]) -> Callable[[], None]:
        """Call ``on_gone`` when the client disconnects; returns what stops watching. No task waits for it:
        uvicorn's protocol sets the cycle's event when the connection is lost, and the event calls back. Reading
        from the client resumes (as the server's ``receive`` does), so that its leaving is seen."""
        tripwire = self.cycle.message_event = _Tripwire(self.cycle, on_gone)
        self.cycle.flow.resume_reading()

        def stop() -> None:
            tripwire.on_gone = None

        return stop

    def writer(self, on_wait: Callable[[], None]) -> Write:
        """Write SSE events as one chunk frame: False when the client has gone, an awaitable to wait on before
        reading more from the engine when the client is slow (its buffer over the transport's high-water mark;
        ``on_wait`` is told each time)."""
        transport, flow = self.cycle.transport, self.cycle.flow

        def write(events: bytes) -> bool | Awaitable[None]:
            if transport.is_closing():
                return False
            transport.write(b"%x\r\n%b\r\n" % (len(events), events))
            if flow.write_paused:
                on_wait()
                return flow.drain()
            return True

        return write


def client_socket(scope: Scope) -> ClientSocket | None:
    """The client's socket for a chunked answer, when the server is uvicorn with its httptools protocol."""
    try:
        from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
    except ImportError:  # pragma: no cover - uvicorn is a dependency
        return None
    cycle: Any = getattr(scope.get(SERVER_SEND), "__self__", None)
    if not isinstance(cycle, RequestResponseCycle) or cycle.disconnected:
        return None
    return ClientSocket(cycle)


class RelayedStream(Response):
    """A server-sent-event answer made by ``events(write)``: on the fast path ``write`` is the client's socket and
    ``events`` yields only what the gateway adds; on the general path ``write`` is None and it yields everything."""

    media_type = "text/event-stream"

    def __init__(
        self,
        events: Callable[[Write | None], AsyncIterator[bytes]],
        headers: dict[str, str],
        *,
        direct: bool = True,
        on_wait: Callable[[], None] = lambda: None,
    ) -> None:
        self.events, self.direct, self.on_wait, self.status_code, self.background = events, direct, on_wait, 200, None
        self.init_headers(headers)  # as StreamingResponse does: no body, so no content-length (the answer is chunked)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        socket = client_socket(scope) if self.direct else None
        if socket is None:
            general = StreamingResponse(self.events(None), headers=self.headers, media_type=self.media_type)
            await general(scope, receive, send)
            return
        # A client that leaves cancels the stream, as under StreamingResponse (which uses an anyio task group and
        # a task waiting on ``receive``: a callback from the server's protocol costs 0.05-0.07 CPU-ms less per
        # request than even a plain watcher task, docs/benchmarks.md). The cancellation frees the slot and closes
        # the connection to vLLM, which aborts the request there.
        task, gone = asyncio.current_task(), False
        assert task is not None

        def cancel() -> None:
            nonlocal gone
            gone = True
            task.cancel()

        unwatch = socket.watch(cancel)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async with contextlib.aclosing(self.events(socket.writer(self.on_wait))) as events:
                async for piece in events:
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:  # the server's own cancellation (shutdown past its grace period): not ours to swallow
                raise
            task.uncancel()
        finally:
            unwatch()
