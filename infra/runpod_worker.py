"""A RunPod GPU pod that runs a Prefect worker for tuneship's GPU pool (RunPod has no Prefect worker type: a
long-lived pod with a process worker takes the GPU pool's runs).

    spec = worker_pod(Compute(gpus=8, gpu_type="H100", cpu=64, memory_gib=900, disk_gib=500),
                      env={"PREFECT_API_URL": "https://…", "PREFECT_API_KEY": "…", "TUNESHIP_ARTIFACT_ROOT": "s3://…"})
    runpod.api_key = "…"; runpod.create_pod(**spec)      # needs a RunPod account: not run by the tests

``worker_pod`` returns ``runpod.create_pod``'s keyword arguments, checked against the SDK's own signature and
rendered into the GraphQL mutation the SDK would send (``mutation``). The pod exposes nothing: no public IP, no
SSH, no ports; the worker reaches out to Prefect and the artifact store.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from infra.compute import WORKER_IMAGE, Compute

# RunPod's GPU type ids for the names compute profiles use (RunPod's `gpuTypes` query lists them all).
GPU_TYPE_IDS = {
    "H100": "NVIDIA H100 80GB HBM3",
    "H100-PCIE": "NVIDIA H100 PCIe",
    "H200": "NVIDIA H200",
    "A100": "NVIDIA A100-SXM4-80GB",
    "A100-80GB": "NVIDIA A100-SXM4-80GB",
    "A100-PCIE": "NVIDIA A100 80GB PCIe",
    "L40S": "NVIDIA L40S",
    "L4": "NVIDIA L4",
    "A10G": "NVIDIA A10G",
    "RTX4090": "NVIDIA GeForce RTX 4090",
}
# The SDK writes env values into a GraphQL string without escaping them: only plain values pass.
SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:/@%+=~\-]*$")
SAFE_KEY = re.compile(r"^[A-Z_][A-Z0-9_]*$")


class RunpodSpecError(ValueError):
    """The profile or environment cannot be expressed as a RunPod pod; the message names the field."""


def worker_pod(
    profile: Compute,
    *,
    env: dict[str, str],
    pool: str = "tuneship-gpu",
    image: str = WORKER_IMAGE,
    name: str = "tuneship-gpu-worker",
) -> dict[str, Any]:
    """``runpod.create_pod`` arguments for a pod running ``prefect worker start --pool POOL`` on ``profile``."""
    import runpod

    if not profile.gpus:
        raise RunpodSpecError("compute.gpus: a RunPod worker pod needs at least one GPU")
    if profile.spot:
        raise RunpodSpecError("compute.spot: the SDK's create_pod rents on-demand pods only; set spot: false")
    gpu = GPU_TYPE_IDS.get((profile.gpu_type or "").upper())
    if gpu is None:
        raise RunpodSpecError(f"compute.gpu_type {profile.gpu_type!r}: RunPod types known here: {sorted(GPU_TYPE_IDS)}")
    for key, value in env.items():
        if not SAFE_KEY.match(key) or not SAFE_VALUE.match(value):
            raise RunpodSpecError(f"env {key}: only [A-Z0-9_] names and plain values (no quotes, spaces, newlines)")
    spec: dict[str, Any] = {
        "name": name,
        "image_name": image,
        "gpu_type_id": gpu,
        "gpu_count": profile.gpus,
        "cloud_type": "SECURE",
        "support_public_ip": False,
        "start_ssh": False,
        "ports": None,
        "docker_args": f"prefect worker start --pool {pool} --type process",
        "env": {"TUNESHIP_REPO": "/app", **env},
        "container_disk_in_gb": int(profile.disk_gib or 100),
        "min_vcpu_count": int(profile.cpu or 8),
        "min_memory_in_gb": int(profile.memory_gib or 32),
    }
    inspect.signature(runpod.create_pod).bind(**spec)  # the SDK's own parameters, or a TypeError
    return spec


def mutation(spec: dict[str, Any]) -> str:
    """The GraphQL mutation ``runpod.create_pod(**spec)`` sends (built by the SDK, offline)."""
    from runpod.api.mutations.pods import generate_pod_deployment_mutation

    return generate_pod_deployment_mutation(**spec)
