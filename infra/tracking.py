"""Experiment tracking on MLflow: one run per stage execution, resumable by a tuneship run key.

A stage restarted with the same run key continues the same MLflow run (found by its
``tuneship.run_key`` tag), so a resumed fine-tune has one loss curve, not two halves.

    tracker = MlflowTracker(settings.mlflow_tracking_uri)
    with tracker.run("demo-3f2a", stage="finetune") as run_id:
        tracker.log_params({"lora.r": 16})
        tracker.log_metrics({"loss": 1.2}, step=10)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists are kept as values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class MlflowTracker:
    """Thin wrapper over MLflow's fluent API, pointed at one tracking URI and experiment."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str = "tuneship",
        *,
        system_metrics: bool = True,
        artifact_location: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.system_metrics = system_metrics
        self.artifact_location = artifact_location

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> MlflowTracker:
        """A tracker for ``settings``; a local sqlite store keeps its artifacts under ``$TUNESHIP_HOME/mlartifacts``."""
        location = None
        if settings.mlflow_tracking_uri.startswith("sqlite:"):
            location = (Path(settings.home) / "mlartifacts").resolve().as_uri()
        return cls(settings.mlflow_tracking_uri, artifact_location=location, **kwargs)

    def _mlflow(self) -> Any:
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        return mlflow

    @contextlib.contextmanager
    def run(self, run_key: str, *, stage: str, tags: Mapping[str, str] | None = None) -> Iterator[str]:
        """Start, or resume, the MLflow run tagged with ``run_key`` and ``stage``; yield its id."""
        mlflow = self._mlflow()
        if self.artifact_location and mlflow.get_experiment_by_name(self.experiment) is None:
            mlflow.create_experiment(self.experiment, artifact_location=self.artifact_location)
        experiment = mlflow.set_experiment(self.experiment)
        found = mlflow.search_runs(
            experiment_ids=[experiment.experiment_id],
            filter_string=f"tags.`tuneship.run_key` = '{run_key}' and tags.`tuneship.stage` = '{stage}'",
            max_results=1,
            output_format="list",
        )
        run_tags = {"tuneship.run_key": run_key, "tuneship.stage": stage, **(tags or {})}
        kwargs: dict[str, Any] = {"log_system_metrics": self.system_metrics}
        if found:
            kwargs["run_id"] = found[0].info.run_id
        else:
            kwargs.update(run_name=f"{stage}-{run_key}", tags=run_tags)
        with mlflow.start_run(**kwargs) as active:
            yield active.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        mlflow = self._mlflow()
        clean = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(params).items()}
        existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
        mlflow.log_params({k: v for k, v in clean.items() if k not in existing})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._mlflow().log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._mlflow().set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._mlflow().log_artifact(str(path), artifact_path=artifact_path)
