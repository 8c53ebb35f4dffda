"""The vLLM command line and environment are built from a launch description, per device."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.vllm_server import VllmLaunch, build_vllm_command, build_vllm_env, unix_socket


def test_cpu_launch_serves_fp32_eager_with_runtime_lora() -> None:
    launch = VllmLaunch(model=Path("/m"), served_model_name="base", max_lora_rank=16)
    argv = build_vllm_command(Path("/venv/bin/python"), launch, host="127.0.0.1", port=8123)
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(argv)
    assert "--model /m" in joined and "--port 8123" in joined
    assert "--dtype float32" in joined and "--enforce-eager" in joined
    assert "--enable-lora --max-lora-rank 16" in joined
    env = build_vllm_env(launch)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "60"  # idle connections outlive vLLM's own 5 s


def test_gpu_launch_lets_vllm_pick_16_bit() -> None:
    launch = VllmLaunch(model=Path("/m"), device="gpu", enable_lora=False)
    argv = build_vllm_command(Path("python"), launch, host="0.0.0.0", port=8000)
    assert "--dtype auto" in " ".join(argv)
    assert "--enable-lora" not in argv and "--enforce-eager" not in argv
    assert "VLLM_CPU_KVCACHE_SPACE" not in build_vllm_env(launch)


def test_unsupported_lora_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="max_lora_rank=12"):
        VllmLaunch(model=Path("/m"), max_lora_rank=12)


def test_a_keyed_launch_passes_the_key_in_the_environment_only() -> None:
    launch = VllmLaunch(model=Path("/m"), api_key="sk-vllm-secret")
    assert build_vllm_env(launch)["VLLM_API_KEY"] == "sk-vllm-secret"
    assert "sk-vllm-secret" not in " ".join(build_vllm_command(Path("python"), launch, host="127.0.0.1", port=1))
    assert "sk-vllm-secret" not in repr(launch)  # launches are logged
    assert "VLLM_API_KEY" not in build_vllm_env(VllmLaunch(model=Path("/m")))


def test_a_stream_interval_reaches_vllm_only_when_set() -> None:
    argv = build_vllm_command(Path("python"), VllmLaunch(model=Path("/m"), stream_interval=8), host="h", port=1)
    assert argv[argv.index("--stream-interval") + 1] == "8"
    assert "--stream-interval" not in build_vllm_command(Path("python"), VllmLaunch(model=Path("/m")), host="h", port=1)


def test_a_unix_socket_replaces_host_and_port() -> None:
    argv = build_vllm_command(Path("python"), VllmLaunch(model=Path("/m")), host="h", port=1, uds=Path("/s/vllm.sock"))
    assert argv[argv.index("--uds") + 1] == "/s/vllm.sock"
    assert "--host" not in argv and "--port" not in argv
    assert unix_socket("unix:/s/vllm.sock") == "/s/vllm.sock" and unix_socket("http://127.0.0.1:8000") is None
