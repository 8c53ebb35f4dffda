"""The RunPod worker pod: built from a compute profile with the runpod SDK's own create_pod parameters and rendered
into the SDK's GraphQL mutation offline (creating it needs a RunPod account, so no test does)."""

from __future__ import annotations

import pytest

from infra.compute import WORKER_IMAGE, Compute
from infra.runpod_worker import RunpodSpecError, mutation, worker_pod

PROFILE = Compute(gpus=8, gpu_type="H100", cpu=64, memory_gib=900, disk_gib=500)
ENV = {"PREFECT_API_URL": "https://prefect.example.com/api", "TUNESHIP_ARTIFACT_ROOT": "s3://ml-artifacts/tuneship"}


def test_a_gpu_worker_pod_that_exposes_nothing() -> None:
    spec = worker_pod(PROFILE, env=ENV)
    assert spec["gpu_type_id"] == "NVIDIA H100 80GB HBM3" and spec["gpu_count"] == 8
    assert (spec["min_vcpu_count"], spec["min_memory_in_gb"], spec["container_disk_in_gb"]) == (64, 900, 500)
    assert spec["image_name"] == WORKER_IMAGE
    assert spec["docker_args"] == "prefect worker start --pool tuneship-gpu --type process"
    text = mutation(spec)
    assert "podFindAndDeployOnDemand" in text
    assert 'gpuTypeId: "NVIDIA H100 80GB HBM3"' in text and "gpuCount: 8" in text
    assert "supportPublicIp: false" in text and "startSsh" not in text and "ports" not in text  # SSH: only when true
    assert '{ key: "PREFECT_API_URL", value: "https://prefect.example.com/api" }' in text


@pytest.mark.parametrize(
    ("profile", "env", "field"),
    [
        (Compute(gpu_type="H100"), ENV, "compute.gpus"),
        (PROFILE.model_copy(update={"spot": True}), ENV, "compute.spot"),
        (PROFILE.model_copy(update={"gpu_type": "TPUv5"}), ENV, "compute.gpu_type 'TPUv5'"),
        (PROFILE, {"PREFECT_API_KEY": 'x" }, { key: "EVIL'}, "env PREFECT_API_KEY"),
        (PROFILE, {"bad key": "x"}, "env bad key"),
    ],
)
def test_what_a_pod_cannot_express_is_refused_by_name(profile, env, field) -> None:
    with pytest.raises(RunpodSpecError, match=field):
        worker_pod(profile, env=env)
