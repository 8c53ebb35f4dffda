"""The direct relay's engine connection (``VllmUpstream.relay``) when the engine stalls: an engine that takes a
request and never finishes its answer fails it within the upstream's timeout, with the connection closed and
no second try, and a gateway slot held for it is given back.

The engine here is a plain TCP listener that reads the request and answers only a response head: a stalled
engine, which a real vLLM server cannot be made into on demand.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from serving.gateway import Gateway, GatewayConfig, GatewayError
from serving.upstream import UpstreamError, VllmUpstream

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
EVENT = b'data: {"choices":[{"text":"a"}]}\n\n'


async def _stalled_engine(requests: list[bytes]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.read(65536))
        writer.write(HEAD + b"%x\r\n%b\r\n" % (len(EVENT), EVENT))  # one event, then nothing: no end
        await writer.drain()
        await reader.read()  # until the gateway closes its end

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_an_engine_that_stalls_mid_answer_fails_it_within_the_timeout_and_frees_the_slot() -> None:
    async def run() -> tuple[float, list[bytes], list[bytes], Exception | None, dict[str, object]]:
        requests: list[bytes] = []
        server = await _stalled_engine(requests)
        port = server.sockets[0].getsockname()[1]
        upstream = VllmUpstream(f"http://127.0.0.1:{port}", timeout=0.5)
        gateway = Gateway(GatewayConfig(aliases={"champion": "base"}), upstream)
        written: list[bytes] = []
        started, failure = time.perf_counter(), None
        try:
            async with gateway.slot("base"):
                body = {"model": "base", "prompt": "hi", "max_tokens": 4}
                await upstream.relay("/v1/completions", body, "req-1", lambda b: written.append(b) or True, keep=False)
        except GatewayError as exc:
            failure = exc
        elapsed = time.perf_counter() - started
        await upstream.aclose()
        server.close()
        await server.wait_closed()
        return elapsed, requests, written, failure, gateway.routes.snapshot()

    elapsed, requests, written, failure, routes = asyncio.run(run())
    assert isinstance(failure, GatewayError) and failure.status == 503
    assert "failed mid-request: TimeoutError" in failure.message
    assert 0.5 <= elapsed < 5  # the timeout, not a hang
    assert len(requests) == 1 and requests[0].startswith(b"POST /v1/completions HTTP/1.1")  # no second try
    assert written == [EVENT]  # what came before the stall was relayed
    assert routes["in_flight"] == {}  # the slot and the model's in-flight count given back


def test_a_stall_without_a_gateway_is_the_upstreams_error() -> None:
    async def run() -> None:
        server = await _stalled_engine([])
        upstream = VllmUpstream(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", timeout=0.3)
        try:
            with pytest.raises(UpstreamError, match="failed mid-request: TimeoutError"):
                await upstream.relay("/v1/completions", {"model": "base"}, None, lambda b: True, keep=False)
            assert not upstream._idle  # the stalled connection is not kept for reuse
        finally:
            await upstream.aclose()
            server.close()
            await server.wait_closed()

    asyncio.run(run())
