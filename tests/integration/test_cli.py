"""The command line against real endpoints: bad settings end in one clear line, not a stack trace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from infra.services import LOCAL_S3_CREDENTIALS, free_port

SETTINGS_VARS = [
    "TUNESHIP_HOME",
    "TUNESHIP_ARTIFACT_ROOT",
    "TUNESHIP_CACHE_DIR",
    "TUNESHIP_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "TUNESHIP_MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_URI",
    "TUNESHIP_VLLM_URL",
    "TUNESHIP_VLLM_PYTHON",
    "TUNESHIP_VLLM_DEVICE",
    "TUNESHIP_API_KEYS",
]


def run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in SETTINGS_VARS and not k.startswith("AWS_")}
    base["AWS_EC2_METADATA_DISABLED"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        env={**base, **env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tuneship: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_unknown_scheme_is_one_line(tmp_path: Path) -> None:
    result = run_cli("doctor", env={"TUNESHIP_ARTIFACT_ROOT": "gs://bucket/x"}, cwd=tmp_path)
    assert_one_line_error(result, "TUNESHIP_ARTIFACT_ROOT", "unknown scheme 'gs'")


def test_cli_unreachable_s3_endpoint_is_one_line(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {"TUNESHIP_ARTIFACT_ROOT": "s3://bucket/x", "TUNESHIP_S3_ENDPOINT_URL": dead, **LOCAL_S3_CREDENTIALS}
    result = run_cli("artifacts", "list", env=env, cwd=tmp_path)
    assert_one_line_error(result, f"cannot reach the S3 endpoint {dead}")


def test_cli_missing_credentials_is_one_line(s3_server, tmp_path: Path) -> None:
    env = {
        "TUNESHIP_ARTIFACT_ROOT": "s3://bucket/x",
        "TUNESHIP_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
    }
    result = run_cli("doctor", env=env, cwd=tmp_path)
    assert_one_line_error(result, "no AWS credentials for s3://bucket")


def test_cli_missing_bucket_is_one_line(s3_server, tmp_path: Path) -> None:
    env = {
        "TUNESHIP_ARTIFACT_ROOT": "s3://no-such-bucket/x",
        "TUNESHIP_S3_ENDPOINT_URL": s3_server.endpoint_url,
        **LOCAL_S3_CREDENTIALS,
    }
    result = run_cli("doctor", env=env, cwd=tmp_path)
    assert_one_line_error(result, "s3://no-such-bucket", "does not exist")


def test_cli_round_trip_through_s3(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_text("hello")
    env = {
        **s3_server.client_env(),
        "TUNESHIP_ARTIFACT_ROOT": f"s3://{s3_bucket}/root",
        "TUNESHIP_CACHE_DIR": str(tmp_path / "cache"),
    }
    put = run_cli("artifacts", "put", str(tmp_path / "d"), "demo/one", env=env, cwd=tmp_path)
    assert put.returncode == 0, put.stderr
    assert f"s3://{s3_bucket}/root/demo/one" in put.stdout
    got = run_cli("artifacts", "get", "demo/one", env=env, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert (Path(got.stdout.strip()) / "f.txt").read_text() == "hello"


def test_output_that_is_not_a_terminal_is_not_wrapped(tmp_path: Path) -> None:
    cache = tmp_path / ("a-long-directory-name-" * 8) / "cache"  # a table cell far wider than 80 columns
    env = {"TUNESHIP_HOME": str(tmp_path), "TUNESHIP_CACHE_DIR": str(cache), "TUNESHIP_VLLM_URL": "http://127.0.0.1:9"}
    result = run_cli("doctor", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "cache" in line and "│" in line]
    assert len(rows) == 1 and str(cache) in rows[0], result.stdout  # the whole path in one table row


def test_retrain_is_a_command(tmp_path: Path) -> None:
    result = run_cli("retrain", "--help", env={}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for option in ("config", "--set", "--no-deploy", "--max-eval-examples"):
        assert option in result.stdout
    missing = run_cli("retrain", env={}, cwd=tmp_path)
    assert missing.returncode == 2 and "Missing argument" in missing.stderr  # the run config is required
