"""A placed stage submitted as a SageMaker training job with the `sagemaker` SDK (its own venv), against the session's
moto server, which serves S3, IAM and SageMaker on one loopback endpoint: it accepts and describes the job (moto
runs no container). What the job's container does — `train` → `tuneship stage` on the request channel — is then
run here on the same request, and its result lands where the flow reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest

from infra.compute import Compute

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/tuneship/worker-gpu:latest"


@pytest.fixture
def sagemaker_env(s3_server, mlflow_server, demo_task, tmp_path, monkeypatch):
    bucket = f"sm-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    for key, value in s3_server.client_env().items():
        monkeypatch.setenv(key, value)
    iam = boto3.client("iam", endpoint_url=s3_server.endpoint_url)
    trust = {"Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole"}
    role = iam.create_role(
        RoleName=f"tuneship-{bucket}",
        AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [trust]}),
    )["Role"]["Arn"]
    env = {
        "TUNESHIP_HOME": str(tmp_path / "home"),
        "TUNESHIP_ARTIFACT_ROOT": f"s3://{bucket}/tuneship",
        "TUNESHIP_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "TUNESHIP_MLFLOW_TRACKING_URI": mlflow_server.tracking_uri,
        "TUNESHIP_SAGEMAKER_ROLE": role,
        "TUNESHIP_SAGEMAKER_IMAGE": IMAGE,
        # The SDK checks the role's permissions with IAM's policy simulator, which moto does not implement.
        "SAGEMAKER_VALIDATE_ROLE": "false",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from infra.artifacts import open_store
    from infra.settings import load_settings

    open_store(load_settings()).put_dir(demo_task, "data/retail-sql")
    return {"bucket": bucket, "role": role, "endpoint": s3_server.endpoint_url, "env": env}


def test_a_stage_submitted_to_sagemaker_is_accepted_described_and_runs_from_its_request(sagemaker_env, tmp_path):
    from flows.retrain import Services, StageParams, run_on_sagemaker
    from infra.settings import load_settings
    from tasks.base_model import resolve_base_model
    from tasks.config import load_run_config
    from tasks.refs import DatasetRef

    settings = load_settings()
    services = Services(settings)
    cfg = load_run_config(
        REPO / "deployments" / "configs" / "tiny-cpu.yaml",
        ["compute.preprocess.gpus=1", "compute.preprocess.gpu_type=L4", "compute.preprocess.disk_gib=120"],
    )
    base = resolve_base_model(cfg.base_model, store=services.store, cache_dir=settings.cache_dir)
    key = f"placements/{uuid.uuid4().hex}/preprocess"
    params = StageParams(stage="preprocess", config=cfg.model_dump_json(), base_revision=base.revision, result_key=key)
    described = run_on_sagemaker(params, cfg.compute.preprocess, services)

    name = described["TrainingJobName"]
    assert name.startswith("tuneship-preprocess") and described["TrainingJobStatus"] == "Completed"
    assert described["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    assert described["RoleArn"] == sagemaker_env["role"]
    assert described["ResourceConfig"] == {"InstanceType": "ml.g6.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 120}
    channel = described["InputDataConfig"][0]
    request_uri = f"s3://{sagemaker_env['bucket']}/tuneship/{key}/request/"
    assert channel["ChannelName"] == "request"
    assert channel["DataSource"]["S3DataSource"]["S3Uri"] == request_uri
    listed = boto3.client("sagemaker", endpoint_url=sagemaker_env["endpoint"]).list_training_jobs()
    assert name in [job["TrainingJobName"] for job in listed["TrainingJobSummaries"]]

    # What the container does: SageMaker copies the channel to /opt/ml/input/data/request/, `train` runs the stage.
    # The container has no Prefect API: the stage starts its own server, never Prefect's temporary one (given 1 s
    # here, so a fall-back to it fails the test).
    channel_dir = tmp_path / "opt-ml-input-data-request"
    channel_dir.mkdir()
    s3 = boto3.client("s3", endpoint_url=sagemaker_env["endpoint"])
    s3.download_file(sagemaker_env["bucket"], f"tuneship/{key}/request/params.json", str(channel_dir / "params.json"))
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "stage", str(channel_dir / "params.json")],
        env={**os.environ, **sagemaker_env["env"], "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = DatasetRef.model_validate_json((services.store.get_dir(key) / "result.json").read_text())
    assert result.stats.splits["train"] > 1000


def test_what_sagemaker_cannot_run_is_refused_by_name(sagemaker_env, monkeypatch) -> None:
    from flows.sagemaker import SageMakerError, instance_type, job_spec
    from infra.artifacts import open_store
    from infra.settings import load_settings

    big = Compute(gpus=8, gpu_type="H100", disk_gib=500, spot=True)
    assert instance_type(big) == "ml.p5.48xlarge"
    store = open_store(load_settings())
    spec = job_spec(big, settings=load_settings(), store=store, request_key="x/request", job_name_prefix="t")
    assert spec["spot"] is True and spec["max_wait_s"] > spec["max_runtime_s"]
    with pytest.raises(SageMakerError, match=r"compute.finetune: no SageMaker instance for gpu_type 'H100' × 3"):
        instance_type(Compute(gpus=3, gpu_type="H100"))
    monkeypatch.setenv("TUNESHIP_SAGEMAKER_ROLE", "")
    with pytest.raises(SageMakerError, match="TUNESHIP_SAGEMAKER_ROLE"):
        job_spec(big, settings=load_settings(), store=store, request_key="x/request", job_name_prefix="t")
