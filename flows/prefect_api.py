"""The Prefect API a command runs its flows against: the one the environment names, else a local server.

    with prefect_api(settings) as api_url:
        retrain(params)

Prefect's own fallback is a temporary server started inside the first flow call, which gives up after
``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (20 s). On a fresh machine that server first creates and
migrates its database; with vLLM starting on the same two cores that took longer, and the first ``make demo``
failed. tuneship starts ``prefect server`` itself instead, as a managed process (own process group, log file,
stopped with the command), and waits until its health endpoint answers *or the process dies*: readiness, not a
race against a short timer (the deadline below only guards against a server that hangs for many minutes).
The database lives in ``PREFECT_HOME`` (``make`` sets ``.tuneship/prefect``), so ``make ui`` shows the runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from infra.services import PrefectServer, start_prefect
from infra.settings import Settings

STARTUP_DEADLINE_S = 900.0


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` as Prefect reads it (environment or profile), or None."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def launch_local_server(settings: Settings) -> PrefectServer:
    """Start ``prefect server`` on loopback over ``PREFECT_HOME``'s database; don't wait for it."""
    home = Path(os.environ.get("PREFECT_HOME") or settings.home / "prefect")
    return start_prefect(settings.home / "services", home=home, timeout=None, stop_with_parent=True)


@contextlib.contextmanager
def prefect_api(
    settings: Settings, *, server: PrefectServer | None = None, say: Callable[[str], None] = print
) -> Iterator[str]:
    """Point Prefect at ``PREFECT_API_URL`` if set, else at ``server`` once it is ready. Without ``server`` one is
    launched here and stopped on exit; a given one stays the caller's to stop."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if configured := configured_api_url():
        yield configured
        return
    with contextlib.ExitStack() as stack:
        if server is None:
            server = stack.enter_context(launch_local_server(settings))
        server.wait_healthy(STARTUP_DEADLINE_S)
        say(f"Prefect API: {server.api_url} (database in {server.env['PREFECT_HOME']}; log {server.log_path})")
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
