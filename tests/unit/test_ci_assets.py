"""The CI workflow validates against GitHub's workflow schema; the Prefect deployments file is coherent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_deploy_workflow_matches_the_github_workflow_schema() -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    workflow = REPO / ".github" / "workflows" / "deploy.yml"
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.github-workflows", workflow], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = yaml.safe_load(workflow.read_text())["jobs"]
    assert jobs["deploy"]["needs"] == "test"
    assert any("ci-deploy.sh" in step.get("run", "") for step in jobs["deploy"]["steps"])
    assert any(".ci/run" in step.get("run", "") for step in jobs["test"]["steps"])


def test_prefect_deployments_point_at_flows_that_exist() -> None:
    import importlib

    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert {"retrain-scheduled", "retrain", "deploy-champion", "fine-tune", "evaluate"} <= names
    for deployment in spec["deployments"]:
        path, func = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert hasattr(getattr(module, func), "fn"), f"{deployment['entrypoint']} is not a Prefect flow"
        assert deployment["enforce_parameter_schema"] is True
    scheduled = next(d for d in spec["deployments"] if d["name"] == "retrain-scheduled")
    assert scheduled["schedules"][0]["cron"] == "0 3 * * 1"
