"""A benchmark-only upstream: answers OpenAI completions (streamed or not) at a fixed token rate, at a constant
and tiny cost, so that a gateway in front of it can be measured on its own. Never a stand-in for vLLM in tests.

    python tests/benchmarks/fixed_rate_upstream.py --port 8199 --ttft-ms 10 --token-ms 5

Raw asyncio HTTP/1.1 with keep-alive (no framework), on a loopback port and, with ``--uds``, a Unix socket too: each
chunk is pre-built bytes; every request costs the same, whatever the gateway does. ``GET /v1/models`` lists
``base``; every completion yields ``max_tokens`` tokens (64 by default) after ``ttft-ms``, one every ``token-ms``,
each in a chunk of its own; with a stream interval (``--stream-interval``, or the request's ``stream_interval``, the
larger), as vLLM does: the first token at once, then one chunk every that many tokens, and the last at once.

Each streamed chunk's id carries two clock readings (``time.perf_counter_ns``, one clock for every process on
the machine): when the request arrived here and when the chunk was written, ``"id":"cmpl-ARRIVED-WRITTEN"``.
The load generator reads them to split a request's latency into the path's part (the request's way here, the
last token's way back) and this server's schedule, which is the same whichever way the request came.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable

MODEL = "base"


def _chunk(text: str, finish: str | None) -> bytes:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}
    body = {"id": "cmpl-bench", "object": "text_completion", "created": 0, "model": MODEL, "choices": [choice]}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


# The id is filled in per chunk: "cmpl-%d-%d" % (arrived, written), in nanoseconds.
def _stamped(tokens: int, finish: str | None) -> bytes:
    return _chunk(" tok" * tokens, finish).replace(b"cmpl-bench", b"cmpl-%d-%d")


# A chunk of 1..MAX_INTERVAL tokens, and the last chunk of as many.
MAX_INTERVAL = 64
TOKENS = [b""] + [_stamped(n, None) for n in range(1, MAX_INTERVAL + 1)]
LASTS = [b""] + [_stamped(n, "length") for n in range(1, MAX_INTERVAL + 1)]
DONE = b"data: [DONE]\n\n"
MODELS = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]}).encode()


def _usage(tokens: int) -> bytes:
    usage = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": tokens + 8}
    body = {
        "id": "cmpl-bench",
        "object": "text_completion",
        "created": 0,
        "model": MODEL,
        "choices": [],
        "usage": usage,
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _completion(tokens: int) -> bytes:
    choice = {"index": 0, "text": " tok" * tokens, "logprobs": None, "finish_reason": "length"}
    usage = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": tokens + 8}
    body = {"id": "cmpl-bench", "object": "text_completion", "created": 0, "model": MODEL, "choices": [choice]}
    return json.dumps({**body, "usage": usage}, separators=(",", ":")).encode()


def _frame(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _serve(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ttft: float, token: float, interval: int
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path = lines[0].split(" ")[:2]
            headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            arrived = time.perf_counter_ns()
            if method == "GET" and path == "/v1/models":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
                    len(MODELS), MODELS))  # fmt: skip
                continue
            request = json.loads(body or b"{}")
            tokens = int(request.get("max_tokens") or 64)
            if not request.get("stream"):
                await asyncio.sleep(ttft + token * (tokens - 1))
                answer = _completion(tokens)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
                    len(answer), answer))  # fmt: skip
                continue
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            # vLLM's stream interval: the first token at once, then a chunk every `every` tokens, and the last.
            every = min(max(int(request.get("stream_interval") or 1), interval), MAX_INTERVAL)
            await asyncio.sleep(ttft)
            unsent = 0
            for i in range(tokens):
                if i:
                    await asyncio.sleep(token)
                unsent += 1
                last = i == tokens - 1
                if i == 0 or last or unsent >= every:
                    writer.write(_frame((LASTS if last else TOKENS)[unsent] % (arrived, time.perf_counter_ns())))
                    unsent = 0
            if (request.get("stream_options") or {}).get("include_usage"):
                writer.write(_frame(_usage(tokens)))
            writer.write(_frame(DONE) + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int, ttft_ms: float, token_ms: float, interval: int, uds: str | None = None) -> None:
    def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Awaitable[None]:
        return _serve(reader, writer, ttft_ms / 1000, token_ms / 1000, interval)

    servers = [await asyncio.start_server(serve, "127.0.0.1", port, backlog=1024)]
    if uds:  # also on a Unix socket, as vLLM's --uds
        servers.append(await asyncio.start_unix_server(serve, uds, backlog=1024))
    await asyncio.gather(*(server.serve_forever() for server in servers))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft-ms", type=float, default=10.0)
    parser.add_argument("--token-ms", type=float, default=5.0)
    parser.add_argument("--stream-interval", type=int, default=1, help="as vLLM's: tokens per chunk after the first")
    parser.add_argument("--uds", help="also listen on this Unix socket (as vLLM's --uds)")
    args = parser.parse_args()
    import uvloop

    uvloop.run(main(args.port, args.ttft_ms, args.token_ms, args.stream_interval, args.uds))
