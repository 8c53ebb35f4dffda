"""The gateway's lifespan: what the process holds once it serves is kept out of the collector's scans."""

from __future__ import annotations

import gc

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
