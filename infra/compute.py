"""Compute profiles: what one stage needs (GPUs, CPU, memory, disk, spot), rendered for the work pool it runs on.

A run config has one ``compute`` section per stage::

    compute:
      finetune: {gpus: 8, gpu_type: H100, cpu: 64, memory_gib: 900, disk_gib: 500, spot: true}
      evaluate: {gpus: 1, gpu_type: H100, memory_gib: 120}

A placed stage (``retrain(placement=…)``) starts its deployment with ``job_variables(profile, pool_type)`` — the
variables of that pool type's base job template, which the worker turns into a Kubernetes Job, a Docker container,
an ECS task or a Modal function. Prefect's workers know CPU and memory but not GPUs, so ``base_job_template``
takes each worker package's own default template and adds what GPUs need (``nvidia.com/gpu`` with its node selector
and tolerations; ECS ``resourceRequirements``); Docker's ``container_create_kwargs`` already carries device requests.
``deployments/work-pools/*.json`` are these templates, written by ``python -m infra.compute write``.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PoolType = Literal["process", "kubernetes", "docker", "ecs", "modal:push"]
POOL_TYPES: tuple[str, ...] = ("kubernetes", "docker", "ecs", "modal:push")
TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "deployments" / "work-pools"
TEMPLATE_FILES = {
    "kubernetes": "kubernetes-gpu.json",
    "docker": "docker-gpu.json",
    "ecs": "ecs-gpu.json",
    "modal:push": "modal-gpu.json",
}
WORKER_IMAGE = "ghcr.io/tuneship/worker-gpu:latest"
# Node labels: NVIDIA GPU feature discovery names the product, Karpenter the capacity type (node_selector overrides).
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
SPOT_LABEL = "karpenter.sh/capacity-type"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


class Compute(BaseModel):
    """What one stage asks of the machine it runs on. Unset fields leave the pool's defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpus: int = Field(default=0, ge=0, le=64, description="GPUs (per node).")
    gpu_type: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        max_length=63,
        description="e.g. H100, A100-80GB, L4: Kubernetes node selector value, Modal GPU name.",
    )
    cpu: float | None = Field(default=None, gt=0, le=512, description="vCPUs.")
    memory_gib: float | None = Field(default=None, gt=0, le=4096)
    disk_gib: float | None = Field(default=None, gt=0, le=65536, description="Scratch disk (checkpoints, caches).")
    shm_gib: float | None = Field(default=None, gt=0, le=1024, description="/dev/shm (data loaders, NCCL).")
    spot: bool = Field(default=False, description="Run on spot / preemptible capacity (the fine-tune resumes).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Extra Kubernetes node labels.")
    spot_capacity_provider: str = Field(
        default="tuneship-gpu-spot", description="ECS: the cluster's capacity provider of spot GPU instances."
    )


class ComputeConfig(BaseModel):
    """One profile per stage that can be placed on another work pool."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preprocess: Compute = Field(default_factory=Compute)
    finetune: Compute = Field(default_factory=Compute)
    evaluate: Compute = Field(default_factory=Compute)
    deploy: Compute = Field(default_factory=Compute)


def _mib(gib: float) -> int:
    return math.ceil(gib * 1024)


def job_variables(profile: Compute, pool_type: str) -> dict[str, Any]:
    """The job variables that ask pool type ``pool_type`` (with ``base_job_template(pool_type)``) for ``profile``."""
    if pool_type == "kubernetes":
        return _kubernetes(profile)
    if pool_type == "docker":
        return _docker(profile)
    if pool_type == "ecs":
        return _ecs(profile)
    if pool_type == "modal:push":
        return _modal(profile)
    return {}  # a process worker runs on the machine it is on


def _kubernetes(p: Compute) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if p.cpu:
        out["cpu_request"] = f"{p.cpu:g}"
    if p.memory_gib:
        out["memory_request"] = out["memory_limit"] = f"{_mib(p.memory_gib)}Mi"
    if p.disk_gib:
        out["ephemeral_storage"] = f"{_mib(p.disk_gib)}Mi"
    if p.shm_gib:
        out["shm_size"] = f"{_mib(p.shm_gib)}Mi"
    selector = dict(p.node_selector)
    tolerations = []
    if p.gpus:
        out["gpu_count"] = p.gpus
        tolerations.append(GPU_TOLERATION)
        if p.gpu_type:
            selector.setdefault(GPU_PRODUCT_LABEL, p.gpu_type)
    if p.spot:
        selector.setdefault(SPOT_LABEL, "spot")
    if selector:
        out["node_selector"] = selector
    if tolerations:
        out["tolerations"] = tolerations
    return out


def _docker(p: Compute) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    if p.memory_gib:
        out["mem_limit"] = f"{_mib(p.memory_gib)}m"
    if p.cpu:
        kwargs["nano_cpus"] = int(p.cpu * 1e9)
    if p.shm_gib:
        kwargs["shm_size"] = f"{_mib(p.shm_gib)}m"
    if p.gpus:  # docker-py's DeviceRequest fields (`docker run --gpus N`)
        kwargs["device_requests"] = [{"driver": "nvidia", "count": p.gpus, "capabilities": [["gpu"]]}]
    if kwargs:
        out["container_create_kwargs"] = kwargs
    return out  # disk and spot: the Docker host's own


def _ecs(p: Compute) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if p.cpu:
        out["cpu"] = int(p.cpu * 1024)  # CPU units
    if p.memory_gib:
        out["memory"] = _mib(p.memory_gib)
    if p.gpus:  # Fargate has no GPUs: an EC2 launch (or an EC2 capacity provider) with a GPU requirement
        out["resource_requirements"] = [{"type": "GPU", "value": str(p.gpus)}]
        out["launch_type"] = "EC2"
    if p.spot:
        # The worker drops launchType when a strategy is set (RunTask takes one or the other); EC2 stays the
        # task definition's compatibility.
        out["capacity_provider_strategy"] = [{"capacityProvider": p.spot_capacity_provider, "weight": 1, "base": 0}]
    return out


def _modal(p: Compute) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if p.gpus:
        out["gpu"] = f"{p.gpu_type or 'any'}:{p.gpus}" if p.gpus > 1 else (p.gpu_type or "any")
    if p.cpu:
        out["cpu"] = p.cpu
    if p.memory_gib:
        out["memory"] = _mib(p.memory_gib)
    if p.disk_gib:
        out["ephemeral_disk"] = _mib(p.disk_gib)
    return out  # Modal has no spot choice: its GPUs are preemptible by default


# Base job templates: the worker package's default, plus GPU variables.


def default_template(pool_type: str) -> dict[str, Any]:
    """The worker package's own default base job template for ``pool_type`` (``modal:push``: tuneship's)."""
    if pool_type == "kubernetes":
        from prefect_kubernetes.worker import KubernetesWorker

        return KubernetesWorker.get_default_base_job_template()
    if pool_type == "docker":
        from prefect_docker.worker import DockerWorker

        return DockerWorker.get_default_base_job_template()
    if pool_type == "ecs":
        from prefect_aws.workers.ecs_worker import ECSWorker

        return ECSWorker.get_default_base_job_template()
    if pool_type == "modal:push":
        return copy.deepcopy(MODAL_TEMPLATE)
    raise ValueError(f"pool type {pool_type!r}: tuneship renders {', '.join(POOL_TYPES)}")


def base_job_template(pool_type: str, image: str = WORKER_IMAGE) -> dict[str, Any]:
    """``default_template(pool_type)`` with the GPU variables ``job_variables`` fills, and the worker image."""
    template = default_template(pool_type)
    props = template["variables"]["properties"]
    if "image" in props:
        props["image"]["default"] = image
    if pool_type == "kubernetes":
        _add_kubernetes_gpus(template)
    elif pool_type == "ecs":
        props["resource_requirements"] = {
            "title": "Resource requirements",
            "description": 'Container resource requirements, e.g. [{"type": "GPU", "value": "1"}].',
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"type": {"enum": ["GPU", "InferenceAccelerator"]}, "value": {"type": "string"}},
                "required": ["type", "value"],
            },
        }
        container = template["job_configuration"]["task_definition"]["containerDefinitions"][0]
        container["resourceRequirements"] = "{{ resource_requirements }}"
    return template


def _add_kubernetes_gpus(template: dict[str, Any]) -> None:
    props = template["variables"]["properties"]
    props["gpu_count"] = {"title": "GPUs", "description": "nvidia.com/gpu per pod.", "type": "integer", "minimum": 0}
    props["node_selector"] = {
        "title": "Node selector",
        "type": "object",
        "additionalProperties": {"type": "string"},
    }
    props["tolerations"] = {
        "title": "Tolerations",
        "type": "array",
        "items": {"type": "object", "additionalProperties": {"type": "string"}},
    }
    props["ephemeral_storage"] = {"title": "Scratch disk", "description": "e.g. 500Gi", "type": "string"}
    props["shm_size"] = {"title": "/dev/shm size", "description": "e.g. 16Gi", "type": "string"}
    job = template["job_configuration"]["job_manifest"]["spec"]
    pod = job["template"]["spec"]
    # The package's default puts these Job fields in the pod spec, where the API server rejects them.
    for field in ("completions", "parallelism"):
        if field in pod:
            job[field] = pod.pop(field)
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "{{ shm_size }}"}}]
    container = pod["containers"][0]
    container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    resources = container["resources"]
    resources["limits"]["nvidia.com/gpu"] = "{{ gpu_count }}"  # extended resources: the limit is the request
    resources["limits"]["ephemeral-storage"] = resources["requests"]["ephemeral-storage"] = "{{ ephemeral_storage }}"


# Modal push pools are a Prefect Cloud pool type; no worker package publishes their template, so this is
# tuneship's: Modal's function options (gpu, cpu, memory, ephemeral_disk, timeout) plus the usual job variables.
MODAL_TEMPLATE: dict[str, Any] = {
    "job_configuration": {
        "command": "{{ command }}",
        "env": "{{ env }}",
        "labels": "{{ labels }}",
        "name": "{{ name }}",
        "modal_credentials": "{{ modal_credentials }}",
        "app_name": "{{ app_name }}",
        "image": "{{ image }}",
        "gpu": "{{ gpu }}",
        "cpu": "{{ cpu }}",
        "memory": "{{ memory }}",
        "ephemeral_disk": "{{ ephemeral_disk }}",
        "timeout": "{{ timeout }}",
    },
    "variables": {
        "type": "object",
        "properties": {
            "command": {"title": "Command", "type": "string"},
            "env": {"title": "Environment", "type": "object", "additionalProperties": {"type": "string"}},
            "labels": {"title": "Labels", "type": "object", "additionalProperties": {"type": "string"}},
            "name": {"title": "Name", "type": "string"},
            "modal_credentials": {"title": "Modal credentials", "type": "object"},
            "app_name": {"title": "Modal app", "type": "string", "default": "tuneship"},
            "image": {"title": "Image", "type": "string"},
            "gpu": {
                "title": "GPU",
                "description": "Modal GPU spec: TYPE or TYPE:COUNT, e.g. H100:8.",
                "type": "string",
                "pattern": r"^[A-Za-z0-9-]+(:[1-9][0-9]*)?$",
            },
            "cpu": {"title": "CPU", "type": "number", "exclusiveMinimum": 0},
            "memory": {"title": "Memory (MiB)", "type": "integer", "minimum": 1},
            "ephemeral_disk": {"title": "Disk (MiB)", "type": "integer", "minimum": 1},
            "timeout": {"title": "Timeout (s)", "type": "integer", "minimum": 1, "default": 86400},
        },
    },
}


def write_templates(directory: Path = TEMPLATE_DIR) -> list[Path]:
    """Write ``base_job_template`` of every pool type into ``directory`` (what ``prefect work-pool create
    --base-job-template`` reads)."""
    written = []
    for pool_type, name in TEMPLATE_FILES.items():
        path = directory / name
        path.write_text(json.dumps(base_job_template(pool_type), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    if sys.argv[1:] != ["write"]:
        sys.exit("usage: python -m infra.compute write")
    for path in write_templates():
        print(path)
