"""Settings come from the environment only; bad values fail at start-up with one line naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.settings import SettingsError, load_settings

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
    "TUNESHIP_VLLM_KEEP_ALIVE_S",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SETTINGS_VARS:
        monkeypatch.delenv(name, raising=False)


def test_defaults_are_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path / "home"))
    s = load_settings()
    assert s.artifact_root == str(tmp_path / "home" / "artifacts")
    assert s.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert s.vllm_url == "local"
    assert s.s3_endpoint_url is None
    assert s.api_keys == []


def test_standard_aliases_and_key_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESHIP_ARTIFACT_ROOT", "s3://bucket/prefix")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000/")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("TUNESHIP_API_KEYS", "k1, k2,,")
    s = load_settings()
    assert s.artifact_root_is_s3
    assert s.s3_endpoint_url == "http://127.0.0.1:9000"
    assert s.mlflow_tracking_uri == "http://127.0.0.1:5000"
    assert [k.get_secret_value() for k in s.api_keys] == ["k1", "k2"]
    assert "k1" not in repr(s)  # secrets never print


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("TUNESHIP_ARTIFACT_ROOT", "ftp://host/x", "TUNESHIP_ARTIFACT_ROOT: unknown scheme 'ftp'"),
        ("TUNESHIP_ARTIFACT_ROOT", "s3:///prefix", "TUNESHIP_ARTIFACT_ROOT: 's3:///prefix' names no bucket"),
        ("TUNESHIP_S3_ENDPOINT_URL", "localhost:9000", "TUNESHIP_S3_ENDPOINT_URL: 'localhost:9000' is not an http"),
        ("TUNESHIP_VLLM_URL", "somewhere", "TUNESHIP_VLLM_URL: 'somewhere' is neither 'local', an http(s)"),
        ("TUNESHIP_VLLM_URL", "unix:vllm.sock", "TUNESHIP_VLLM_URL: 'unix:vllm.sock': a Unix socket's URL is unix:"),
        ("TUNESHIP_VLLM_DEVICE", "tpu", "TUNESHIP_VLLM_DEVICE: Input should be 'cpu' or 'gpu'"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str, message: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_a_vllm_on_a_unix_socket_is_named_by_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESHIP_VLLM_URL", "unix:/run/vllm/vllm.sock")
    settings = load_settings()
    assert settings.vllm_url == "unix:/run/vllm/vllm.sock" and not settings.vllm_uds  # a local one: TCP by default
    monkeypatch.setenv("TUNESHIP_VLLM_UDS", "true")
    assert load_settings().vllm_uds


def test_the_gateway_reuses_engine_connections_a_second_less_than_vllm_keeps_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.serve import upstream

    assert upstream(load_settings(), "http://127.0.0.1:8000").reuse_s == 59  # a vLLM tuneship starts keeps 60 s
    monkeypatch.setenv("TUNESHIP_VLLM_KEEP_ALIVE_S", "5")  # a vLLM run elsewhere, with vLLM's own default
    assert upstream(load_settings(), "http://127.0.0.1:8000").reuse_s == 4
    monkeypatch.setenv("TUNESHIP_VLLM_KEEP_ALIVE_S", "1")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert str(info.value).startswith("TUNESHIP_VLLM_KEEP_ALIVE_S")
