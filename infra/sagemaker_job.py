"""Submit a tuneship stage as an Amazon SageMaker training job with the `sagemaker` SDK (``ModelTrainer``), and print
the job's description as JSON. It runs in its own venv (``.venv-sagemaker``, requirements/sagemaker.lock): the SDK
pins rich < 15 and importlib-metadata < 7, which the pipeline's MLflow and OpenTelemetry pins exclude.

    .venv-sagemaker/bin/python infra/sagemaker_job.py SPEC.json

SPEC (written by ``flows/sagemaker.py``): job name prefix, image, role, instance type and count, volume, spot,
runtime limits, the request's S3 prefix (the ``request`` channel, mounted at /opt/ml/input/data/request/), the
output path and the container's environment. The image's ``train`` command runs the stage from that request.
This module imports only the SDK and the standard library.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def submit(spec: dict[str, Any]) -> dict[str, Any]:
    import boto3
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.core.training.configs import Compute, InputData, OutputDataConfig, StoppingCondition
    from sagemaker.train import ModelTrainer

    boto = boto3.Session(region_name=spec["region"])
    session = Session(boto_session=boto, default_bucket=spec["bucket"])
    spot = bool(spec.get("spot"))
    trainer = ModelTrainer(
        sagemaker_session=session,
        role=spec["role"],
        training_image=spec["image"],
        base_job_name=spec["job_name_prefix"],
        compute=Compute(
            instance_type=spec["instance_type"],
            instance_count=spec.get("instance_count", 1),
            volume_size_in_gb=spec["volume_gib"],
            enable_managed_spot_training=spot,
        ),
        input_data_config=[InputData(channel_name="request", data_source=spec["request_s3"])],
        output_data_config=OutputDataConfig(s3_output_path=spec["output_s3"]),
        stopping_condition=StoppingCondition(
            max_runtime_in_seconds=spec["max_runtime_s"],
            **({"max_wait_time_in_seconds": spec["max_wait_s"]} if spot else {}),
        ),
        environment=spec.get("environment", {}),
    )
    trainer.train(wait=False, logs=False)
    job = trainer._latest_training_job  # the TrainingJob resource train() created
    described = boto.client("sagemaker").describe_training_job(TrainingJobName=job.training_job_name)
    described.pop("ResponseMetadata", None)
    return described


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python infra/sagemaker_job.py SPEC.json")
    with open(sys.argv[1]) as fh:
        print(json.dumps(submit(json.load(fh)), default=str))
