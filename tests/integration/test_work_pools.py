"""Compute profiles on every pool type, checked the way Prefect and each platform check them: the base job template
(the worker package's own default plus tuneship's GPU variables) is accepted by a real `prefect server` creating a
pool of that type, a deployment of the `stage` flow with the profile's job variables passes the server's job-variable
validation and `enforce_parameter_schema`, and the worker package's own job configuration renders what each platform
then reads: a Kubernetes Job (validated against the Kubernetes 1.33 schema), docker-py's container arguments, and
ECS RegisterTaskDefinition / RunTask requests (validated against botocore's service model)."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from infra.compute import POOL_TYPES, Compute, base_job_template, job_variables

BIG = Compute(gpus=8, gpu_type="H100", cpu=64, memory_gib=900, disk_gib=500, shm_gib=64, spot=True)
SMALL = Compute(gpus=1, gpu_type="L4", cpu=8, memory_gib=32)
# One wrongly typed job variable per pool type: the server must refuse it.
BAD = {
    "kubernetes": {"gpu_count": "eight"},
    "docker": {"mem_limit": 64},
    "ecs": {"resource_requirements": [{"type": "TPU", "value": "1"}]},
    "modal:push": {"gpu": "H100:0"},
}


@pytest.fixture(scope="module")
def api(prefect_server):
    from tests.integration.test_retrain_flow import RetryBusy

    with httpx.Client(
        base_url=prefect_server.client_env()["PREFECT_API_URL"], timeout=30, transport=RetryBusy()
    ) as client:
        yield client


@pytest.fixture(scope="module")
def stage_flow_id(api) -> str:
    return api.post("/flows/", json={"name": "stage"}).json()["id"]


def _stage_params() -> dict:
    return {
        "params": {
            "stage": "fine-tune",
            "config": "{}",
            "base_revision": "0" * 40,
            "inputs": {},
            "result_key": "placements/x/fine-tune",
        }
    }


@pytest.mark.parametrize("pool_type", POOL_TYPES)
def test_a_prefect_server_accepts_each_pool_type_with_the_profiles_job_variables(api, stage_flow_id, pool_type):
    from prefect.utilities.callables import parameter_schema

    from flows.retrain import stage_flow

    template = base_job_template(pool_type)
    name = f"gpu-{pool_type.replace(':', '-')}-{uuid.uuid4().hex[:6]}"
    created = api.post("/work_pools/", json={"name": name, "type": pool_type, "base_job_template": template})
    assert created.status_code == 201, created.text
    assert created.json()["base_job_template"] == template

    schema = parameter_schema(stage_flow).model_dump_for_openapi()
    deployment = api.post(
        "/deployments/",
        json={
            "name": f"fine-tune-{name}",
            "flow_id": stage_flow_id,
            "work_pool_name": name,
            "job_variables": job_variables(BIG, pool_type),
            "enforce_parameter_schema": True,
            "parameter_openapi_schema": schema,
        },
    )
    assert deployment.status_code == 201, deployment.text
    dep_id = deployment.json()["id"]
    assert deployment.json()["job_variables"] == job_variables(BIG, pool_type)

    run = api.post(
        f"/deployments/{dep_id}/create_flow_run",
        json={"parameters": _stage_params(), "job_variables": job_variables(SMALL, pool_type)},
    )
    assert run.status_code == 201, run.text
    bad_vars = api.post(
        f"/deployments/{dep_id}/create_flow_run", json={"parameters": _stage_params(), "job_variables": BAD[pool_type]}
    )
    assert bad_vars.status_code in (409, 422), bad_vars.text
    assert next(iter(BAD[pool_type])) in bad_vars.text
    params = _stage_params()
    params["params"]["stage"] = "train"
    bad_params = api.post(f"/deployments/{dep_id}/create_flow_run", json={"parameters": params})
    assert bad_params.status_code in (409, 422), bad_params.text
    assert "stage" in bad_params.text


def _render(config_cls, pool_type: str, profile: Compute, prefect_server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server.client_env()["PREFECT_API_URL"]}):
        return asyncio.run(
            config_cls.from_template_and_values(base_job_template(pool_type), job_variables(profile, pool_type))
        )


def test_the_kubernetes_worker_renders_a_valid_gpu_job(prefect_server) -> None:
    import kubernetes_validate
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    job = _render(KubernetesWorkerJobConfiguration, "kubernetes", BIG, prefect_server).job_manifest
    job["metadata"]["generateName"] = "tuneship-"  # what the worker fills in from the flow run
    job["spec"]["template"]["spec"]["containers"][0]["args"] = ["prefect", "flow-run", "execute"]
    kubernetes_validate.validate(job, "1.33", strict=True)
    pod = job["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 8
    assert resources["requests"] == {"cpu": "64", "memory": "921600Mi", "ephemeral-storage": "512000Mi"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100", "karpenter.sh/capacity-type": "spot"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "65536Mi"}

    # No profile: the pool's defaults, no GPU keys left behind.
    plain = _render(KubernetesWorkerJobConfiguration, "kubernetes", Compute(), prefect_server).job_manifest
    plain["metadata"]["generateName"] = "tuneship-"
    kubernetes_validate.validate(plain, "1.33", strict=True)
    plain_pod = plain["spec"]["template"]["spec"]
    assert "nodeSelector" not in plain_pod and "nvidia.com/gpu" not in plain_pod["containers"][0]["resources"]["limits"]


def test_the_docker_worker_passes_gpu_device_requests_to_docker(prefect_server) -> None:
    from docker.models.containers import _create_container_args
    from prefect_docker.worker import DockerWorkerJobConfiguration

    cfg = _render(DockerWorkerJobConfiguration, "docker", BIG, prefect_server)
    args = _create_container_args(
        {
            "image": cfg.image,
            "command": ["prefect"],
            "mem_limit": cfg.mem_limit,
            "version": "1.44",  # the Docker API version docker-py negotiates with a current daemon
            **cfg.container_create_kwargs,
        }
    )
    host = args["host_config"]
    assert host["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": 8, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert host["Memory"] == 900 * 2**30 and host["NanoCpus"] == 64 * 10**9 and host["ShmSize"] == 64 * 2**30


def test_the_ecs_worker_asks_for_gpus_on_ec2_spot_capacity(prefect_server) -> None:
    import botocore.session
    from botocore.validate import ParamValidator
    from prefect_aws.workers.ecs_worker import ECSJobConfiguration

    cfg = _render(ECSJobConfiguration, "ecs", BIG, prefect_server)
    task_definition = cfg.task_definition
    container = task_definition["containerDefinitions"][0]
    assert container["resourceRequirements"] == [{"type": "GPU", "value": "8"}]
    assert cfg.task_run_request["capacityProviderStrategy"] == [
        {"capacityProvider": "tuneship-gpu-spot", "weight": 1, "base": 0}
    ]
    assert cfg.task_run_request["launchType"] == "EC2"  # the worker drops it beside a capacity provider strategy

    model = botocore.session.get_session().get_service_model("ecs")
    register = {**task_definition, "family": "tuneship", "requiresCompatibilities": ["EC2"]}
    register["containerDefinitions"] = [{**container, "name": "prefect", "memory": 921600}]
    register["cpu"], register["memory"] = str(register["cpu"]), str(register["memory"])
    report = ParamValidator().validate(register, model.operation_model("RegisterTaskDefinition").input_shape)
    assert not report.has_errors(), report.generate_report()
    run = {k: v for k, v in cfg.task_run_request.items() if k != "launchType"}
    run |= {"taskDefinition": "tuneship:1", "cluster": "gpu"}
    run["overrides"]["containerOverrides"][0]["name"] = "prefect"
    for key in ("cpu", "memory"):  # as the worker's _prepare_task_run_request does
        run["overrides"][key] = str(run["overrides"][key])
    report = ParamValidator().validate(run, model.operation_model("RunTask").input_shape)
    assert not report.has_errors(), report.generate_report()


def test_profiles_render_nothing_for_a_process_pool_and_the_defaults() -> None:
    assert job_variables(BIG, "process") == {}
    for pool_type in POOL_TYPES:
        assert job_variables(Compute(), pool_type) == {}
    assert job_variables(SMALL, "modal:push") == {"gpu": "L4", "cpu": 8.0, "memory": 32768}
    assert job_variables(BIG, "modal:push")["gpu"] == "H100:8"


def test_the_shipped_templates_are_what_infra_compute_writes(tmp_path) -> None:
    """deployments/work-pools/*.json (what `prefect work-pool create --base-job-template` and ci-deploy.sh read) are
    regenerated by `python -m infra.compute write`: an edit by hand or a worker package upgrade shows up here."""
    from infra.compute import TEMPLATE_DIR, write_templates

    for path in write_templates(tmp_path):
        assert (TEMPLATE_DIR / path.name).read_text() == path.read_text(), "run `python -m infra.compute write`"
