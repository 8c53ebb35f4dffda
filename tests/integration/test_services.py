"""Service plumbing: health waits, clear failures, and stops that leave no stray processes."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from infra.services import ManagedProcess, ServiceError, free_port, group_alive, start_mlflow


def test_mlflow_server_is_healthy_and_stops_with_its_workers(s3_server, tmp_path: Path) -> None:
    server = start_mlflow(tmp_path, s3=s3_server)
    try:
        assert httpx.get(f"{server.tracking_uri}/health", timeout=5).status_code == 200
        experiments = httpx.get(
            f"{server.tracking_uri}/api/2.0/mlflow/experiments/search", params={"max_results": 5}, timeout=10
        )
        assert experiments.status_code == 200
        assert experiments.json()["experiments"][0]["name"] == "Default"
        pgid = server.proc.pid
        assert group_alive(pgid)
    finally:
        server.stop()
    assert not group_alive(pgid)


def test_process_that_dies_reports_its_log(tmp_path: Path) -> None:
    proc = ManagedProcess(
        name="broken",
        argv=[sys.executable, "-c", "import sys; print('boom: bad flag'); sys.exit(3)"],
        health_url=f"http://127.0.0.1:{free_port()}/health",
        log_path=tmp_path / "broken.log",
    )
    with pytest.raises(ServiceError, match=r"(?s)broken exited with code 3.*boom: bad flag"):
        proc.start(timeout=30)


def test_process_that_never_gets_healthy_times_out_and_is_stopped(tmp_path: Path) -> None:
    proc = ManagedProcess(
        name="silent",
        argv=[sys.executable, "-c", "import time; time.sleep(60)"],
        health_url=f"http://127.0.0.1:{free_port()}/health",
        log_path=tmp_path / "silent.log",
    )
    with pytest.raises(ServiceError, match="silent not healthy"):
        proc.start(timeout=2)
    assert not proc.running
