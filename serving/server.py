"""Running the gateway app: in the foreground (``tuneship serve --no-deploy``) or on a background thread (demo,
tests, ``tuneship serve``).

Both refuse to listen beyond loopback without API keys, and both stop gracefully: no new connections, in-flight
requests and streams get ``grace_s`` seconds to finish, then are cut. uvicorn picks uvloop and httptools (both
pinned) for its event loop and HTTP parser.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from infra.errors import UserError
from infra.settings import GATEWAY_KEEP_ALIVE_S
from serving.gateway import GatewayConfig, is_loopback


class ExposedGateway(UserError):
    """A gateway asked to listen beyond loopback with no API keys."""


def check_exposure(config: GatewayConfig, host: str) -> None:
    """Refuse to serve an open gateway anywhere but loopback."""
    if not is_loopback(host) and not config.api_keys:
        raise ExposedGateway(
            f"the gateway would listen on {host} with no API keys: set TUNESHIP_API_KEYS, "
            "or listen on loopback (TUNESHIP_GATEWAY_HOST=127.0.0.1)"
        )


def _server(
    app: Any,
    host: str,
    port: int,
    grace_s: float,
    log_level: str,
    http: str = "auto",
    keep_alive_s: int = GATEWAY_KEEP_ALIVE_S,
) -> Any:
    import uvicorn

    check_exposure(app.state.gateway.config, host)
    # Below info, uvicorn's access log prints nothing but still formats each line's parts: off, it costs nothing.
    access_log = log_level in ("trace", "debug", "info")
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=grace_s,
        http=http, timeout_keep_alive=keep_alive_s,
    )  # fmt: skip
    return uvicorn.Server(config)


def serve_forever(
    app: Any, *, host: str, port: int, grace_s: float = 10, keep_alive_s: int = GATEWAY_KEEP_ALIVE_S
) -> None:
    """Serve in the foreground until SIGTERM or SIGINT (uvicorn's handlers), then shut down gracefully."""
    _server(app, host, port, grace_s, "info", keep_alive_s=keep_alive_s).run()


@contextlib.contextmanager
def serve_in_thread(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 30,
    grace_s: float = 10,
    http: str = "auto",
    sock: socket.socket | None = None,
    keep_alive_s: int = GATEWAY_KEEP_ALIVE_S,
) -> Iterator[str]:
    """Serve ``app`` on a background thread; yield its base URL; shut it down gracefully on exit. ``http`` is
    uvicorn's HTTP protocol: ``auto`` is httptools, under which streams take the direct relay (``serving.relay``).
    ``sock``: a bound socket to listen on instead of ``host:port`` (the connections it accepts inherit its
    options, such as its send buffer's size). ``keep_alive_s``: how long an idle client connection stays open."""
    if sock is not None:
        host, port = sock.getsockname()[:2]
    elif not port:
        raise ValueError("serve_in_thread needs a port or a bound socket")
    server = _server(app, host, port, grace_s, "warning", http, keep_alive_s)
    run = functools.partial(server.run, sockets=[sock]) if sock is not None else server.run
    thread = threading.Thread(target=run, name=f"gateway-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=grace_s + 10)
