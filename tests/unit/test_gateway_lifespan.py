"""The gateway's lifespan: what the process holds once it serves is kept out of the collector's scans; idle client
connections stay open longer than a load balancer's."""

from __future__ import annotations

import gc
import socket
import time

import httpx

from infra.services import free_port
from serving.app import GatewayConfig, create_app
from serving.server import serve_in_thread
from serving.upstream import VllmUpstream


def test_a_serving_gateway_keeps_its_startup_objects_out_of_full_collections() -> None:
    upstream = VllmUpstream(f"http://127.0.0.1:{free_port()}")  # nothing listens: no request reaches it
    app = create_app(GatewayConfig(aliases={"champion": "base"}, api_keys=["k"]), upstream)
    with serve_in_thread(app, port=free_port()) as url:
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert gc.get_freeze_count() > 10_000  # the modules, the app, its routes and models
    assert gc.get_freeze_count() == 0  # given back to the collector when the app stops


def _idle_then_ask(url: str, idle_s: float) -> bytes:
    """Two requests on one connection, ``idle_s`` apart: the second's answer, or b'' if the gateway closed it."""
    host, port = url.removeprefix("http://").split(":")
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall(request)
        assert client.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(idle_s)
        try:
            client.sendall(request)
            return client.recv(65536)
        except ConnectionError:
            return b""


def test_idle_client_connections_outlive_a_load_balancers() -> None:
    """uvicorn closes a client connection idle for 5 s; a load balancer in front keeps its own open longer (AWS
    ALB: 60 s) and would send a request on one the gateway is closing: a 502. The gateway keeps them 75 s."""
    upstream = VllmUpstream(f"http://127.0.0.1:{free_port()}")
    app = create_app(GatewayConfig(aliases={"champion": "base"}, api_keys=["k"]), upstream)
    with serve_in_thread(app, port=free_port()) as url:
        assert _idle_then_ask(url, 5.5).startswith(b"HTTP/1.1 200")
    with serve_in_thread(app, port=free_port(), keep_alive_s=1) as url:  # what a shorter setting does
        assert _idle_then_ask(url, 1.5) == b""
