"""Local services on loopback: an S3 endpoint (moto), an MLflow server, and the process plumbing they share.

Each service runs in its own process group on a free 127.0.0.1 port, logs to a file, is waited on
until its health URL answers, and is stopped with its whole group (MLflow spawns workers). Used by
the test suite's session fixtures, by ``make demo`` and by ``tuneship services up``.

    with start_s3(Path(".tuneship/services")) as s3, start_mlflow(Path(".tuneship/services"), s3=s3) as mlflow:
        print(s3.endpoint_url, mlflow.tracking_uri)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from infra.errors import TransientError

# Credentials the loopback S3 endpoint accepts; any non-empty strings do.
LOCAL_S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "tuneship-local", "AWS_SECRET_ACCESS_KEY": "tuneship-local-secret"}


class ServiceError(TransientError):
    """A service did not start, did not become healthy, died, or failed a request."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to send ``sig`` to the child when its parent dies (``PR_SET_PDEATHSIG``); None
    elsewhere. The libc function is bound here, in the parent, so the child only makes one C call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, sig)


@dataclass
class ManagedProcess:
    """A server process in its own process group, with a health URL and a log file."""

    name: str
    argv: list[str]
    health_url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    # Linux: the server gets SIGTERM when the thread that started it dies, whatever killed it (even SIGKILL).
    # Only for servers started on a long-lived (main) thread: a helper thread's exit would stop them too.
    stop_with_parent: bool = False
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float) -> ManagedProcess:
        """Start the process and wait until ``health_url`` answers 200; raise :class:`ServiceError` otherwise."""
        self.launch()
        try:
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> ManagedProcess:
        """Start the process without waiting for it (then :meth:`wait_healthy`), e.g. beside another one."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env={**os.environ, **self.env},
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=parent_death_signal() if self.stop_with_parent else None,
            )
        return self

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with code {self.proc.returncode} before it was healthy; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            if self.healthy():
                return
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{self.name} not healthy at {self.health_url} after {timeout:.0f} s; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.5)

    def healthy(self) -> bool:
        """Whether ``health_url`` answers 200 now."""
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(self.health_url, timeout=2.0).status_code == 200
        return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after ``grace`` s, wait until it is gone."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session=True: the leader's pid is the group id
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()  # reap the leader; orphaned workers are reaped by init
                if not group_alive(pgid):
                    return
                time.sleep(0.1)

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class S3Server(ManagedProcess):
    endpoint_url: str = ""

    def client_env(self) -> dict[str, str]:
        """Environment that points boto3 (and tuneship's settings) at this endpoint."""
        return {**LOCAL_S3_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1"}

    def create_bucket(self, bucket: str) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=LOCAL_S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=LOCAL_S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)


def start_s3(workdir: Path, *, port: int | None = None, timeout: float = 60) -> S3Server:
    """Start ``moto_server`` on loopback: a real HTTP S3 endpoint (multipart included)."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    server = S3Server(
        name="s3 (moto_server)",
        argv=[sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        health_url=f"{url}/moto-api/",
        log_path=workdir / f"s3-{port}.log",
        endpoint_url=url,
    )
    server.start(timeout)
    return server


@dataclass
class MlflowServer(ManagedProcess):
    tracking_uri: str = ""


def start_mlflow(
    workdir: Path,
    *,
    s3: S3Server,
    bucket: str = "mlflow",
    port: int | None = None,
    timeout: float = 120,
) -> MlflowServer:
    """Start ``mlflow server`` on loopback: sqlite backend, artifacts proxied to ``s3://bucket`` on ``s3``."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    s3.create_bucket(bucket)
    db = (workdir / f"mlflow-{port}.db").resolve()
    url = f"http://127.0.0.1:{port}"
    server = MlflowServer(
        name="mlflow server",
        argv=[
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            f"s3://{bucket}/artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        health_url=f"{url}/health",
        log_path=workdir / f"mlflow-{port}.log",
        env={**s3.client_env(), "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url},
        tracking_uri=url,
    )
    server.start(timeout)
    return server


@dataclass
class PrefectServer(ManagedProcess):
    api_url: str = ""

    def client_env(self) -> dict[str, str]:
        """What a Prefect client (CLI, worker, flow process) needs to talk to this server."""
        return {"PREFECT_API_URL": self.api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def start_prefect(
    workdir: Path,
    *,
    home: Path | None = None,
    port: int | None = None,
    timeout: float | None = 180,
    stop_with_parent: bool = False,
) -> PrefectServer:
    """Start ``prefect server start`` on loopback with its SQLite database in ``home`` (default: a new directory
    under ``workdir``). ``timeout=None`` returns at once: call ``wait_healthy`` when the server is needed."""
    port = port or free_port()
    home = (home or workdir / f"prefect-{port}").resolve()
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    server = PrefectServer(
        name="prefect server",
        argv=[sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        health_url=f"{url}/api/health",
        log_path=workdir / f"prefect-{port}.log",
        env={
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_UI_ENABLED": "false",
        },
        api_url=f"{url}/api",
        stop_with_parent=stop_with_parent,
    )
    if timeout is None:
        return server.launch()
    server.start(timeout)
    return server
