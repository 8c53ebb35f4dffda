"""The retraining flow: preprocess → fine-tune → evaluate → register + gate → deploy (only when promoted).

    python -m flows.retrain                              # embedded defaults: the demo task on the offline model
    retrain(RetrainParams(config="deployments/configs/llama3-8b-qlora.yaml", overrides=["data.source=s3://…"]))

Prefect stays in this file; the stages are the plain functions of ``tasks/``. Each stage is a task whose cache
key is a hash of its input refs, its part of the run config and the code version, with its result persisted,
so a re-run with unchanged inputs skips finished stages. I/O-bound stages retry with backoff; a fine-tune
retried after a crash resumes from its newest checkpoint (its run id is a hash of config + data). Each stage
publishes a Prefect artifact (dataset stats, loss curve, eval comparison, gate decision, deployment).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.events import emit_event
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from flows.serve import local_vllm
from infra.artifacts import ArtifactStore, open_store
from infra.base_model import ResolvedModel, resolve_base_model
from infra.costs import TrainingCost, load_prices, training_cost
from infra.demo_task import build_demo_task
from infra.errors import UserError
from infra.settings import Settings, load_settings
from infra.tracking import MlflowTracker
from tasks.config import DeployConfig, RunConfig, load_run_config
from tasks.refs import AdapterRef, DatasetRef, Deployment, EvalReport, ModelVersionRef, PromotionDecision

REPO = Path(__file__).resolve().parents[1]
DEMO_PRESET = "deployments/configs/tiny-cpu.yaml"


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry what may pass (I/O, a crashed worker); not a user error (bad config or data), which would fail again."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return False


IO_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 10, 30], "retry_jitter_factor": 0.5,
              "retry_condition_fn": _transient}  # fmt: skip


class RetrainParams(BaseModel):
    """What a run trains and where it ships; the Prefect UI renders this as a form."""

    config: str = Field(default=DEMO_PRESET, description="Run config YAML (see deployments/configs/).")
    overrides: list[str] = Field(default_factory=list, description="Dotted overrides, e.g. finetune.train.epochs=1.")
    demo_data: bool = Field(default=True, description="Write the demo task first (for the demo preset's data paths).")
    deploy: bool = Field(default=True, description="Hot-swap a promoted model into the serving stack.")
    max_eval_examples: int | None = Field(default=None, gt=0, le=100_000, description="Cap on test examples.")
    placement: dict[Literal["fine-tune"], str] = Field(
        default_factory=dict,
        description='Stages to run as their own deployment on another work pool, e.g. {"fine-tune": '
        '"finetune-stage/finetune-stage"}; the rest run inline.',
    )


class RetrainSummary(BaseModel):
    model_name: str
    dataset: str
    adapter: str
    report: str
    version: str
    promoted: bool
    reasons: str
    metrics: dict[str, float]
    deployment: Deployment | None = None
    training_cost: TrainingCost | None = None


def code_version() -> str:
    """A hash of the pipeline's source: a code change invalidates every stage cache."""
    digest = hashlib.sha256()
    for path in sorted([*REPO.glob("tasks/*.py"), *REPO.glob("infra/*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _key(stage: str, services: Services, *parts: Any) -> str:
    """Stage, code version, the artifact store the refs live in, and the stage's inputs."""
    where = [services.store.root_uri, services.settings.s3_endpoint_url, services.settings.mlflow_tracking_uri]
    blob = json.dumps([stage, code_version(), where, *parts], sort_keys=True, default=str)
    return f"tuneship-{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def _source_digest(source: str) -> str:
    """Content hash of a local data file or directory (so edited data misses the cache); else the name."""
    path = Path(source)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(f.relative_to(path)).encode() + f.read_bytes())
        return digest.hexdigest()
    return source


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json") if hasattr(model, "model_dump") else model


def _preprocess_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    cfg: RunConfig = p["cfg"]
    files = [cfg.data.source, cfg.data.test_file or ""]
    return _key(
        "preprocess",
        p["services"],
        _dump(cfg.data),
        _dump(cfg.preprocess),
        p["base"].revision,
        *map(_source_digest, files),
    )


def _finetune_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    return _key("finetune", p["services"], p["data"].fingerprint, _dump(p["cfg"].finetune), p["base"].revision)


def _evaluate_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    champion = p["champion"].sha256 if p["champion"] else None
    return _key(
        "evaluate", p["services"], p["adapter"].sha256, champion, p["data"].fingerprint, _dump(p["cfg"].evaluate)
    )


def _register_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    return _key("register", p["services"], p["cfg"].model_name, p["adapter"].sha256, p["report"].artifact.uri,
                _dump(p["cfg"].registry))  # fmt: skip


class StageFailed(RuntimeError):
    """A stage failed after its retries; the flow run's final state carries this message."""


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Name the stage in the error that ends the flow (the champion is untouched: nothing was promoted)."""
    try:
        yield
    except Exception as exc:
        raise StageFailed(f"stage {name!r} failed: {type(exc).__name__}: {exc}") from exc


class Services:
    """What the stages share: settings, artifact store, tracker, and a vLLM server started only if a stage that
    needs one actually runs (a fully cached re-run starts none)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: ArtifactStore = open_store(settings, check=False)  # the first stage reaches it, with retries
        self.tracker = MlflowTracker.from_settings(settings)
        self._stack = contextlib.ExitStack()
        self._vllm: str | None = None
        self.base: ResolvedModel | None = None

    def vllm_url(self) -> str:
        if self._vllm is None:
            assert self.base is not None
            self._vllm = self._stack.enter_context(local_vllm(self.settings, Path(self.base.path)))
        return self._vllm

    def close(self) -> None:
        self._stack.close()


# Stages. Each takes the shared services (excluded from the cache key by the key functions) and refs.


@task(name="resolve base model", cache_policy=NO_CACHE, **IO_RETRIES)
def resolve_stage(name: str, services: Services) -> ResolvedModel:
    """The base model: built or fetched from the artifact store / per-user cache, or a hub id."""
    return resolve_base_model(name, store=services.store, cache_dir=services.settings.cache_dir)


@task(name="preprocess", cache_key_fn=_preprocess_key, persist_result=True, **IO_RETRIES)
def preprocess_stage(cfg: RunConfig, base: ResolvedModel, services: Services) -> DatasetRef:
    from tasks.preprocess import preprocess

    ref = preprocess(cfg, base=base, store=services.store, workdir=services.settings.home / "work")
    stats = ref.stats
    rows = [{"split": name, "rows": n} for name, n in stats.splits.items()]
    rows += [{"split": f"rejected: {reason}", "rows": n} for reason, n in stats.reject_reasons.items()]
    create_table_artifact(
        rows, key="dataset-stats", description=f"{ref.artifact.uri} (fingerprint {ref.fingerprint[:12]})"
    )
    return ref


@task(
    name="fine-tune",
    cache_key_fn=_finetune_key,
    persist_result=True,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_transient,
)
def finetune_stage(cfg: RunConfig, data: DatasetRef, base: ResolvedModel, services: Services) -> AdapterRef:
    from tasks.finetune import finetune

    adapter = finetune(cfg, data, base=base, store=services.store, tracker=services.tracker,
                       workdir=services.settings.home / "work")  # fmt: skip
    m = adapter.metrics
    create_markdown_artifact(
        f"# Fine-tune\n\n{m.get('global_step', 0):.0f} steps, train loss {m.get('train_loss', float('nan')):.3f}, "
        f"eval loss {m.get('eval_loss', float('nan')):.3f}, {m.get('tokens_per_s', 0):.0f} tokens/s\n\n"
        f"Adapter: `{adapter.artifact.uri}` · MLflow run `{adapter.mlflow_run_id}` (loss curve: `loss_curve.png`)",
        key="fine-tune",
    )
    return adapter


@task(name="evaluate", cache_key_fn=_evaluate_key, persist_result=True, **IO_RETRIES)
def evaluate_stage(cfg: RunConfig, adapter: AdapterRef, data: DatasetRef, base: ResolvedModel,
                   champion: AdapterRef | None, services: Services) -> EvalReport:  # fmt: skip
    from tasks.evaluate import evaluate

    report = evaluate(cfg, adapter, data, base=base, store=services.store, tracker=services.tracker,
                      champion=champion, server_url=services.vllm_url(), served_base="base",
                      workdir=services.settings.home / "work")  # fmt: skip
    m = report.metrics
    rows = [{"model": role, "accuracy": round(m[f"accuracy_{role}"], 4)} for role in ("base", "candidate", "champion")
            if f"accuracy_{role}" in m]  # fmt: skip
    for name, c in report.comparisons.items():
        rows.append({"model": f"candidate − {name}", "accuracy": round(c.accuracy_diff, 4),
                     "ci95": f"[{c.ci_low:+.3f}, {c.ci_high:+.3f}]"})  # fmt: skip
    create_table_artifact(rows, key="eval-comparison", description=f"report: {report.artifact.uri}")
    return report


@task(name="register", cache_key_fn=_register_key, persist_result=True, **IO_RETRIES)
def register_stage(cfg: RunConfig, adapter: AdapterRef, report: EvalReport, data: DatasetRef,
                   services: Services) -> tuple[ModelVersionRef, PromotionDecision]:  # fmt: skip
    from tasks.register import promote, register

    uri = services.settings.mlflow_tracking_uri
    version = register(cfg, adapter, report, data, store=services.store, tracking_uri=uri,
                       flow_run_id=str(flow_run.get_id() or "none"))  # fmt: skip
    decision = promote(cfg, version, report, tracking_uri=uri)
    verdict = "**promoted** to @champion" if decision.promoted else "**not promoted** (stays @challenger)"
    lines = [f"# Gate: {cfg.model_name} v{version.version} {verdict}", "", "| rule | passed | value |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if r.passed else 'no'} | {r.value} |" for name, r in decision.rules.items()]
    create_markdown_artifact("\n".join(lines), key="gate-decision")
    if decision.promoted:  # deploy-champion deployments trigger on this event (deployments/prefect.yaml)
        emit_event(event="tuneship.champion.promoted", resource={
            "prefect.resource.id": f"tuneship.model.{version.name}", "tuneship.model.name": version.name,
            "tuneship.model.version": version.version})  # fmt: skip
    return version, decision


@task(name="deploy", cache_policy=NO_CACHE, **IO_RETRIES)
def deploy_stage(cfg: DeployConfig, name: str, version: str, services: Services) -> Deployment | None:
    from tasks.deploy import deploy, render_manifests

    settings = services.settings
    uri = settings.mlflow_tracking_uri
    if cfg.target == "manifests":
        dep = render_manifests(name, version, cfg, store=services.store, tracking_uri=uri)
    elif settings.vllm_url == "local" and not settings.gateway_url:
        get_run_logger().info("no serving stack configured (TUNESHIP_VLLM_URL / TUNESHIP_GATEWAY_URL): "
                              "`tuneship serve` will serve the new champion")  # fmt: skip
        return None
    else:
        dep = deploy(name, version, cfg, store=services.store, tracking_uri=uri, vllm_url=services.vllm_url(),
                     gateway_url=settings.gateway_url, admin_key=settings.admin_key)  # fmt: skip
    where = dep.gateway_url or dep.vllm_url or str(Path(cfg.manifests_dir).resolve())
    create_link_artifact(where, link_text=f"{name} v{dep.version} → {dep.adapter_name}", key="deployment")
    return dep


def finetune_elsewhere(deployment: str, cfg: RunConfig, data: DatasetRef, base: ResolvedModel,
                       services: Services) -> AdapterRef:  # fmt: skip
    """Run the fine-tune as deployment ``deployment`` (e.g. on a GPU work pool) and wait; the adapter ref comes
    back through the artifact store, so the two sides share nothing but the store and the registry."""
    from prefect.deployments import run_deployment

    key = f"placements/{flow_run.get_id() or uuid.uuid4().hex}/fine-tune"
    params = {"config": cfg.model_dump_json(), "data": data.model_dump(mode="json"), "base_revision": base.revision,
              "result_key": key}  # fmt: skip
    child = run_deployment(deployment, parameters={"params": params}, timeout=None)
    if child.state is None or not child.state.is_completed():
        state = child.state.name if child.state else "unknown"
        raise StageFailed(f"deployment {deployment} ended {state}: {child.state.message if child.state else ''}")
    saved = services.store.get_dir(key) / "adapter.json"
    return AdapterRef.model_validate_json(saved.read_text())


class FinetuneStageParams(BaseModel):
    config: str = Field(description="The run config, as JSON.")
    data: DatasetRef
    base_revision: str = Field(description="The base model revision the caller resolved; the worker must match.")
    result_key: str = Field(description="Artifact-store key the adapter ref is written to.")


@flow(name="finetune-stage", log_prints=True, validate_parameters=True)
def finetune_stage_flow(params: FinetuneStageParams) -> AdapterRef:
    """The fine-tune stage on its own (a GPU worker): resolve the base, train (or resume), store the ref."""
    import tempfile

    settings = load_settings()
    services = Services(settings)
    cfg = RunConfig.model_validate_json(params.config)
    base = resolve_stage(cfg.base_model, services)
    if base.revision != params.base_revision:
        raise StageFailed(f"base model {cfg.base_model} is revision {base.revision[:12]} here, "
                          f"{params.base_revision[:12]} for the caller")  # fmt: skip
    adapter = finetune_stage(cfg, params.data, base, services)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "adapter.json").write_text(adapter.model_dump_json())
        services.store.put_dir(Path(tmp), params.result_key, overwrite=True)
    return adapter


def record_training_cost(version: ModelVersionRef, seconds: float, settings: Settings) -> TrainingCost:
    """Price the fine-tune's wall-clock time on the configured instance and tag the model version with it —
    once: a re-run that took the adapter from the cache keeps the original run's cost."""
    from tasks.register import get_version, set_version_tags

    tags = get_version(version.name, version.version, tracking_uri=settings.mlflow_tracking_uri).tags
    if "tuneship.cost.training_usd" in tags:
        return TrainingCost(instance=tags["tuneship.cost.instance"], seconds=float(tags["tuneship.cost.training_s"]),
                            usd=float(tags["tuneship.cost.training_usd"]))  # fmt: skip
    cost = training_cost(load_prices(), settings.instance_type, seconds=seconds)
    set_version_tags(version.name, version.version, {"tuneship.cost.training_usd": f"{cost.usd:.6f}",
                     "tuneship.cost.training_s": f"{cost.seconds:.1f}", "tuneship.cost.instance": cost.instance},
                     tracking_uri=settings.mlflow_tracking_uri)  # fmt: skip
    return cost


@flow(name="retrain", log_prints=True, validate_parameters=True)
def retrain(params: RetrainParams = RetrainParams()) -> RetrainSummary:  # noqa: B008 (a default the UI shows)
    """Preprocess → fine-tune → evaluate (base vs fine-tuned vs champion) → register + gate → deploy."""
    from tasks.register import champion_adapter

    settings = load_settings()
    overrides = list(params.overrides)
    if params.demo_data:
        task_dir = settings.home / "demo-task"
        build_demo_task(task_dir)
        overrides = [f"data.source={task_dir / 'train.jsonl'}", f"data.test_file={task_dir / 'test.jsonl'}",
                     f"evaluate.database={task_dir / 'retail.db'}", *overrides]  # fmt: skip
    if params.max_eval_examples:
        overrides.append(f"evaluate.max_examples={params.max_eval_examples}")
    cfg = load_run_config(REPO / params.config if not Path(params.config).is_absolute() else params.config, overrides)
    services = Services(settings)
    try:
        with stage("resolve base model"):
            base = resolve_stage(cfg.base_model, services)
        services.base = base
        with stage("preprocess"):
            data = preprocess_stage(cfg, base, services)
        with stage("fine-tune"):
            started = time.perf_counter()
            if "fine-tune" in params.placement:
                adapter = finetune_elsewhere(params.placement["fine-tune"], cfg, data, base, services)
            else:
                adapter = finetune_stage(cfg, data, base, services)
            training_s = time.perf_counter() - started  # every attempt, retries included
        with stage("evaluate"):
            champion = champion_adapter(cfg.model_name, tracking_uri=settings.mlflow_tracking_uri, store=services.store)
            if champion is not None and champion.sha256 == adapter.sha256:
                champion = None  # unchanged inputs: the candidate is the champion already
            champion_base = (champion.base_model, champion.base_model_revision) if champion else None
            if champion_base and champion_base != (base.id, base.revision):
                # An adapter only means something on its own base weights: no head-to-head on this base. The
                # gate then keeps the candidate as challenger and says why (tasks.register.promote).
                print(f"the champion was trained on {champion_base[0]}@{champion_base[1][:12]}, the candidate on "
                      f"{base.id}@{base.revision[:12]}: not compared")  # fmt: skip
                champion = None
            report = evaluate_stage(cfg, adapter, data, base, champion, services)
        with stage("register"):
            version, decision = register_stage(cfg, adapter, report, data, services)
            cost = record_training_cost(version, training_s, settings)
        deployment = None
        if params.deploy and decision.promoted:
            with stage("deploy"):
                deployment = deploy_stage(cfg.deploy, version.name, version.version, services)
    finally:
        services.close()
    return RetrainSummary(model_name=cfg.model_name, dataset=data.artifact.uri, adapter=adapter.artifact.uri,
                          report=report.artifact.uri, version=version.version, promoted=decision.promoted,
                          reasons=decision.reasons(), metrics=report.metrics, deployment=deployment,
                          training_cost=cost)  # fmt: skip


class DeployChampionParams(BaseModel):
    model_name: str = Field(default="retail-sql", description="Registered model whose champion to deploy.")
    alias: str = Field(default="champion", description="Gateway alias to switch.")


@flow(name="deploy-champion", log_prints=True, validate_parameters=True)
def deploy_champion(params: DeployChampionParams = DeployChampionParams()) -> Deployment | None:  # noqa: B008
    """Deploy the registry's current champion to the configured serving stack (on merge, or on a new champion)."""
    from tasks.register import get_version

    settings = load_settings()
    services = Services(settings)
    try:
        mv = get_version(params.model_name, "champion", tracking_uri=settings.mlflow_tracking_uri)
        services.base = resolve_base_model(mv.tags.get("tuneship.base_model", ""), store=services.store,
                                           cache_dir=settings.cache_dir)  # fmt: skip
        return deploy_stage(DeployConfig(alias=params.alias), params.model_name, str(mv.version), services)
    finally:
        services.close()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the retrain flow once (embedded defaults: the demo).")
    parser.add_argument("--config", default=DEMO_PRESET)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override key=value")
    parser.add_argument("--no-deploy", dest="deploy", action="store_false")
    args = parser.parse_args()
    print(retrain(RetrainParams(config=args.config, overrides=args.overrides, deploy=args.deploy)).model_dump_json())
