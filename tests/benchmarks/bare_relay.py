"""A benchmark-only reference: the least a relay written in Python can do, to show the floor under the gateway's
figures on the same machine. Never used by tuneship itself.

    python tests/benchmarks/bare_relay.py --port 8198 --upstream http://127.0.0.1:8199

uvloop and httptools, no framework, no checks: one POST in, its body sent upstream with the model name swapped,
the upstream's answer written back frame by frame as each read completes, upstream connections kept alive and
reused. No auth, validation, limits, metrics, alias lookup or error mapping: what remains is the event loop, the
HTTP parsing and the socket reads and writes (on loopback the kernel's part of those includes delivering the
bytes to the receiving socket).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any, cast
from urllib.parse import urlsplit

import httptools


class _Upstream(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self.client, self.transport = client, cast(asyncio.Transport, None)
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.client.transport.write(b"%x\r\n%b\r\n" % (len(body), body))

    def on_message_complete(self) -> None:
        self.client.transport.write(b"0\r\n\r\n")
        self.client.idle.append(self)


class _Client(asyncio.Protocol):
    def __init__(self, upstream: Any, idle: list[_Upstream]) -> None:
        self.upstream, self.idle, self.url, self.body = upstream, idle, b"", b""
        self.transport = cast(asyncio.Transport, None)
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        body, self.body = self.body.replace(b'"champion"', b'"base"'), b""
        if self.url == b"/health":
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        else:
            asyncio.ensure_future(self._forward(body))

    async def _forward(self, body: bytes) -> None:
        if self.idle:
            upstream = self.idle.pop()
            upstream.client, upstream.parser = self, httptools.HttpResponseParser(upstream)
        else:
            loop = asyncio.get_running_loop()
            _, upstream = await loop.create_connection(
                lambda: _Upstream(self), self.upstream.hostname, self.upstream.port
            )
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        head = b"POST %b HTTP/1.1\r\nHost: upstream\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        upstream.transport.write(head % (self.url, len(body)) + body)


async def main(port: int, upstream: str) -> None:
    split, idle = urlsplit(upstream), []
    server = await asyncio.get_running_loop().create_server(lambda: _Client(split, idle), "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    import uvloop

    uvloop.run(main(args.port, args.upstream))
