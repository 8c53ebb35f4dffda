"""A placed stage as an Amazon SageMaker training job: ``retrain(placement={"fine-tune": "sagemaker"})``.

The stage's request (the ``stage`` flow's parameters) goes to the artifact store, which must be S3; the job runs
the GPU worker image, whose ``train`` command runs the stage from that request (the ``request`` channel) and
writes the result back to the store, where the flow reads it — the same hand-over as a work-pool placement.
The job's instance comes from the run config's compute profile; ``infra/sagemaker_job.py`` submits it with the
`sagemaker` SDK in its own venv. Settings: TUNESHIP_SAGEMAKER_ROLE, _IMAGE, _REGION, _PYTHON.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from infra.artifacts import ArtifactStore
from infra.compute import Compute
from infra.errors import TransientError, UserError
from infra.settings import Settings

REPO = Path(__file__).resolve().parents[1]
# (GPU type, GPUs) → the SageMaker training instance with them.
INSTANCE_TYPES = {
    ("H100", 8): "ml.p5.48xlarge",
    ("H200", 8): "ml.p5e.48xlarge",
    ("A100", 8): "ml.p4d.24xlarge",
    ("A100-80GB", 8): "ml.p4de.24xlarge",
    ("A10G", 1): "ml.g5.2xlarge",
    ("A10G", 4): "ml.g5.12xlarge",
    ("A10G", 8): "ml.g5.48xlarge",
    ("L4", 1): "ml.g6.2xlarge",
    ("L4", 4): "ml.g6.12xlarge",
    ("L4", 8): "ml.g6.48xlarge",
    ("L40S", 1): "ml.g6e.2xlarge",
    ("L40S", 4): "ml.g6e.12xlarge",
    ("L40S", 8): "ml.g6e.48xlarge",
}
FORWARDED = (  # what the job's container needs to reach the store, the registry and Prefect
    "TUNESHIP_ARTIFACT_ROOT",
    "TUNESHIP_MLFLOW_TRACKING_URI",
    "TUNESHIP_WANDB_MODE",
    "TUNESHIP_WANDB_PROJECT",
    "PREFECT_API_URL",
)


class SageMakerError(UserError, RuntimeError):
    """The job cannot be submitted as configured, or it failed; the message says which and why."""


def instance_type(profile: Compute, section: str = "compute.finetune") -> str:
    key = ((profile.gpu_type or "").upper(), profile.gpus)
    if key not in INSTANCE_TYPES:
        known = ", ".join(f"{g}×{n}" for g, n in INSTANCE_TYPES)
        raise SageMakerError(f"{section}: no SageMaker instance for gpu_type {profile.gpu_type!r} × {profile.gpus}; "
                             f"known: {known}")  # fmt: skip
    return INSTANCE_TYPES[key]


def job_spec(
    profile: Compute, *, settings: Settings, store: ArtifactStore, request_key: str, job_name_prefix: str
) -> dict[str, Any]:
    """What ``infra/sagemaker_job.py`` submits: the profile's instance, the request channel, the environment."""
    import os

    if not settings.sagemaker_role or not settings.sagemaker_image:
        raise SageMakerError("TUNESHIP_SAGEMAKER_ROLE and TUNESHIP_SAGEMAKER_IMAGE must be set to place on SageMaker")
    request = store.backend.uri(request_key)
    if not request.startswith("s3://"):
        raise SageMakerError(f"TUNESHIP_ARTIFACT_ROOT={settings.artifact_root}: SageMaker reads its input from S3")
    bucket = request.removeprefix("s3://").split("/", 1)[0]
    environment = {k: os.environ[k] for k in FORWARDED if os.environ.get(k)}
    environment["TUNESHIP_ARTIFACT_ROOT"] = settings.artifact_root
    environment["TUNESHIP_MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
    return {
        "region": settings.sagemaker_region,
        "bucket": bucket,
        "role": settings.sagemaker_role,
        "image": settings.sagemaker_image,
        "job_name_prefix": job_name_prefix,
        "instance_type": instance_type(profile),
        "instance_count": 1,
        "volume_gib": int(profile.disk_gib or 200),
        "spot": profile.spot,
        "max_runtime_s": 5 * 24 * 3600,
        "max_wait_s": 7 * 24 * 3600,  # spot: waiting for capacity included
        "request_s3": request.rstrip("/") + "/",
        "output_s3": f"s3://{bucket}/sagemaker/output/",
        "environment": environment,
    }


def submit(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Submit with the SDK (its venv); the job's description."""
    python = settings.sagemaker_python
    if not python.is_absolute():
        python = REPO / python
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps(spec))
        done = subprocess.run(
            [str(python), str(REPO / "infra" / "sagemaker_job.py"), str(path)],
            capture_output=True,
            text=True,
            timeout=600,
        )
    if done.returncode != 0:
        raise SageMakerError(f"SageMaker refused the training job: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait(job_name: str, settings: Settings, *, poll_s: float = 30, timeout_s: float = 7 * 24 * 3600) -> dict[str, Any]:
    """Poll the job until it ends; its last description. A failed or stopped job raises with SageMaker's reason."""
    import boto3

    client = boto3.client("sagemaker", region_name=settings.sagemaker_region)
    deadline = time.monotonic() + timeout_s
    while True:
        described = client.describe_training_job(TrainingJobName=job_name)
        status = described["TrainingJobStatus"]
        if status == "Completed":
            return described
        if status in ("Failed", "Stopped"):
            raise SageMakerError(f"SageMaker job {job_name} {status.lower()}: {described.get('FailureReason', '')}")
        if time.monotonic() > deadline:
            raise TransientError(f"SageMaker job {job_name} still {status} after {timeout_s:g} s")
        time.sleep(poll_s)
