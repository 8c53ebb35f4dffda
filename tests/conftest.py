"""Shared fixtures: one real service of each kind per test session, on loopback.

Expensive things (the S3 endpoint, the MLflow server, the vLLM server, a tiny model) are session
scoped and started lazily, only when a test asks for them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Never let boto3 probe the EC2 instance-metadata address while looking for credentials.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def s3_server(services_dir: Path) -> Iterator[object]:
    from infra.services import start_s3

    with start_s3(services_dir) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the session's S3 endpoint, with the environment pointing boto3 at it."""
    for key, value in s3_server.client_env().items():
        monkeypatch.setenv(key, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    return bucket


@pytest.fixture(scope="session")
def mlflow_server(services_dir: Path, s3_server) -> Iterator[object]:
    from infra.services import start_mlflow

    with start_mlflow(services_dir, s3=s3_server) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away, randomly initialised 2-layer Llama (head_dim 64) with its own tokenizer."""
    from infra.base_model import LlamaArch, init_model, save_model, train_tokenizer

    texts = [f"SELECT name FROM table_{i} WHERE id = {i * 7 % 13};" for i in range(200)]
    texts += ["the quick brown fox jumps over the lazy dog"] * 20
    tokenizer = train_tokenizer(texts, vocab_size=512)
    arch = LlamaArch(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256, vocab_size=512)
    model = init_model(arch, tokenizer, seed=0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def vllm_server(services_dir: Path, tiny_model_dir: Path) -> Iterator[object]:
    from infra.vllm_server import VllmLaunch, start_vllm

    launch = VllmLaunch(model=tiny_model_dir, served_model_name="tiny", max_lora_rank=16)
    with start_vllm(launch, python=REPO / ".venv-vllm" / "bin" / "python", workdir=services_dir) as server:
        yield server
