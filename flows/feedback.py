"""Retraining on feedback: the watch that turns what users sent into a retrain request, once.

    watch_feedback(WatchParams(config="deployments/configs/tiny-cpu.yaml"))

The ``watch-feedback`` deployment runs this every ten minutes (deployments/prefect.yaml). Each run curates (a new
curated version when there is new feedback), then requests a retrain — the Prefect event
``tuneship.feedback.retrain-requested``, on which the ``retrain-on-feedback`` deployment triggers — when either

- the curated versions added at least ``curate.min_new_rows`` rows since the last request, or
- the served champion's thumbs-down share over the last ``curate.trigger_window_s`` seconds reached
  ``curate.trigger_down_rate``, with at least ``curate.trigger_min_feedback`` ratings behind it,

and the last request is at least ``curate.cooldown_s`` old: a burst of feedback starts one retrain, not one per
curation. The last request (time, rows, curated version) is kept in the artifact store at
``curated/<model>/trigger``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from pydantic import BaseModel, Field

from flows.results import PERSISTED
from flows.retrain import Services, config_file, curate_stage
from infra.artifacts import ArtifactNotFoundError, ArtifactStore
from infra.registry import RegistryError, get_version, served_id
from infra.segments import FEEDBACK, hour_prefix, read_segment
from infra.settings import load_settings
from tasks.config import RunConfig, load_run_config
from tasks.curate import CURATED
from tasks.refs import CuratedRef

EVENT = "tuneship.feedback.retrain-requested"


class WatchParams(BaseModel):
    config: str = Field(description="Run config: deployments/configs/NAME.yaml or artifact://KEY/PATH.")
    overrides: list[str] = Field(default_factory=list, description="Dotted overrides, e.g. registry.model_name=x.")


class WatchResult(BaseModel):
    curated: CuratedRef
    rows_since_request: int
    down_rate: float | None
    ratings_in_window: int
    requested: bool
    reason: str


def trigger_key(model_name: str) -> str:
    return f"{CURATED}/{model_name}/trigger"


def last_request(store: ArtifactStore, model_name: str) -> dict | None:
    try:
        return json.loads((store.get_dir(trigger_key(model_name)) / "trigger.json").read_text())
    except ArtifactNotFoundError:
        return None


def champion_down_rate(cfg: RunConfig, store: ArtifactStore, tracking_uri: str, now: float) -> tuple[float | None, int]:
    """The share of thumbs-down among the served champion's ratings over the window, and how many there were."""
    try:
        champion = get_version(cfg.model_name, "champion", tracking_uri=tracking_uri)
    except RegistryError:
        return None, 0
    served = served_id(cfg.model_name, str(champion.version))
    since = now - cfg.curate.trigger_window_s
    hours = {hour_prefix(FEEDBACK, t) for t in range(int(since), int(now) + 3600, 3600)}
    ratings = [
        record["rating"] == "down"
        for hour in sorted(hours)
        for key in store.keys(hour)
        for record in read_segment(store, key)
        if record.get("served") == served and record["issued_ms"] >= since * 1000
    ]
    return (sum(ratings) / len(ratings) if ratings else None), len(ratings)


@task(name="request a retrain", cache_policy=NO_CACHE)
def decide(cfg: RunConfig, curated: CuratedRef, services: Services) -> WatchResult:
    now = time.time()
    rules, store = cfg.curate, services.store
    last = last_request(store, cfg.model_name)
    rows = curated.counts["feedback_rows"]
    rows_since = rows - (last["rows"] if last else 0)
    down_rate, ratings = champion_down_rate(cfg, store, services.settings.mlflow_tracking_uri, now)
    reasons = []
    if rows_since >= rules.min_new_rows:
        reasons.append(f"{rows_since} new rows since the last request (≥ {rules.min_new_rows})")
    if down_rate is not None and ratings >= rules.trigger_min_feedback and down_rate >= rules.trigger_down_rate:
        reasons.append(f"the champion's thumbs-down share is {down_rate:.0%} over {ratings} ratings")
    result = {
        "curated": curated,
        "rows_since_request": rows_since,
        "down_rate": down_rate,
        "ratings_in_window": ratings,
    }
    if not reasons:
        return WatchResult(**result, requested=False, reason="nothing to act on")
    if last and now - last["requested_at"] < rules.cooldown_s:
        wait = rules.cooldown_s - (now - last["requested_at"])
        return WatchResult(**result, requested=False, reason=f"cooling down ({wait:.0f} s left): " + "; ".join(reasons))
    with tempfile.TemporaryDirectory() as tmp:
        marker = {"requested_at": now, "rows": rows, "version": curated.version, "reasons": reasons}
        (Path(tmp) / "trigger.json").write_text(json.dumps(marker))
        store.put_dir(Path(tmp), trigger_key(cfg.model_name), overwrite=True)
    emit_event(
        event=EVENT,
        resource={
            "prefect.resource.id": f"tuneship.model.{cfg.model_name}",
            "tuneship.model.name": cfg.model_name,
            "tuneship.curated.version": str(curated.version),
        },
        payload={"reasons": reasons, "train": curated.train, "holdout": curated.holdout},
    )
    return WatchResult(**result, requested=True, reason="; ".join(reasons))


@flow(name="watch-feedback", log_prints=True, validate_parameters=True, **PERSISTED)
def watch_feedback(params: WatchParams) -> WatchResult:
    """Curate the new feedback; request a retrain when enough was learned or the champion does badly."""
    services = Services(load_settings())
    try:
        cfg = load_run_config(config_file(params.config, services.store), params.overrides)
        curated = curate_stage(cfg, services)
        result = decide(cfg, curated, services)
    finally:
        services.close()
    print(f"curated v{curated.version}: {'retrain requested' if result.requested else 'no retrain'}: {result.reason}")
    return result
