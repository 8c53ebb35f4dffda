"""The retraining flow: preprocess → fine-tune → evaluate → register + gate → deploy (only when promoted).

    tuneship retrain deployments/configs/tiny-cpu.yaml [--set key=value …] [--no-deploy]
    retrain(RetrainParams(config="deployments/configs/llama3-8b-qlora.yaml", overrides=["data.source=s3://…"]))

Prefect stays in this file; the stages are the plain functions of ``tasks/``. Each stage is a task whose cache
key is a hash of its parameters (its config section, its input refs) and the code version, with its result persisted,
so a re-run with unchanged inputs skips finished stages. I/O-bound stages retry with backoff; a fine-tune
retried after a crash resumes from its newest checkpoint (its run id is a hash of config + data). Each stage
publishes a Prefect artifact (dataset stats, loss curve, eval comparison, gate decision, deployment).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.events import emit_event
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from flows.results import PERSISTED
from flows.serve import local_vllm
from infra.artifacts import ARTIFACT_SCHEME, ArtifactStore, artifact_of, local_path, open_store
from infra.costs import TrainingCost, load_prices, training_cost
from infra.errors import TransientError, UserError
from infra.settings import Settings, environ, load_settings, wandb_env
from infra.tracking import MlflowTracker
from infra.vllm_server import answers, vllm_endpoints
from tasks.base_model import ResolvedModel, resolve_base_model
from tasks.config import (
    ConfigError,
    DataConfig,
    DeployConfig,
    EvalConfig,
    FinetuneConfig,
    PreprocessConfig,
    RunConfig,
    load_run_config,
)
from tasks.refs import (
    AdapterRef,
    CuratedRef,
    DatasetRef,
    Deployment,
    EvalReport,
    ModelVersionRef,
    PromotionDecision,
    RuleResult,
    split_metric,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG_ROOT = REPO / "deployments" / "configs"


def _transient_types() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError
    from httpx import TransportError
    from mlflow.exceptions import MlflowException
    from prefect.exceptions import CrashedRun

    return TransientError, OSError, TimeoutError, TransportError, BotoCoreError, MlflowException, CrashedRun


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry what may pass (a service down or slow, a crashed worker); never a user error (bad config or data,
    which would fail again) nor a bug."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, _transient_types()) and not isinstance(exc, UserError)


IO_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": _transient,
}


class RetrainParams(BaseModel):
    """What a run trains and where it ships; the Prefect UI renders this as a form."""

    config: str = Field(
        description="Run config YAML: deployments/configs/NAME.yaml in the repository, or artifact://KEY/PATH in the "
        "artifact store (`tuneship retrain FILE` publishes any other file there)."
    )
    overrides: list[str] = Field(default_factory=list, description="Dotted overrides, e.g. finetune.train.epochs=1.")
    deploy: bool = Field(default=True, description="Hot-swap a promoted model into the serving stack.")
    max_eval_examples: int | None = Field(default=None, gt=0, le=100_000, description="Cap on test examples.")
    curate: bool = Field(
        default=False,
        description="Start with a curate stage: production feedback since the last curated version joins the "
        "training data, and its holdout becomes the 'feedback' test split.",
    )
    placement: dict[Literal["preprocess", "fine-tune", "evaluate", "deploy"], str] = Field(
        default_factory=dict,
        description='Stages to run as their own deployment on another work pool, e.g. {"fine-tune": "stage/fine-tune", '
        '"evaluate": "stage/evaluate"}, or as a SageMaker training job ("sagemaker"), with the run config\'s '
        "compute profile; the rest run inline.",
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
    curated: CuratedRef | None = None


def config_file(config: str, store: ArtifactStore) -> Path:
    """The run config a run parameter names, as a local file: a YAML file under deployments/configs/ or a path in
    the artifact store. Nothing else — a run parameter cannot make a worker read an arbitrary file."""
    if config.startswith(ARTIFACT_SCHEME):
        return local_path(config, store, what="run config")
    path = (REPO / config).resolve()  # an absolute config stays as it is; symlinks are followed before the check
    if path.suffix not in (".yaml", ".yml") or not path.is_relative_to(CONFIG_ROOT.resolve()):
        raise ConfigError(
            f"config {config!r}: a run reads its config from {CONFIG_ROOT.relative_to(REPO)}/ (a .yaml file) or "
            f"from the artifact store (artifact://KEY/PATH), not from {path}"
        )
    return path


def publish_config(path: Path, store: ArtifactStore) -> str:
    """What a run parameter names for the config file ``path``: its place under deployments/configs/, or else a
    copy put into the artifact store (content-addressed), which every worker can also read."""
    resolved = path.resolve()
    if resolved.is_relative_to(CONFIG_ROOT.resolve()):
        return str(resolved.relative_to(REPO.resolve()))
    raw = resolved.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "run.yaml").write_bytes(raw)
        ref = store.put_dir(Path(tmp), f"configs/{hashlib.sha256(raw).hexdigest()[:16]}")
    return f"{ARTIFACT_SCHEME}{ref.key}/run.yaml"


def code_version() -> str:
    """A hash of the pipeline's source: a code change invalidates every stage cache."""
    digest = hashlib.sha256()
    for path in sorted([*REPO.glob("tasks/*.py"), *REPO.glob("infra/*.py"), *REPO.glob("offline/*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _key(stage: str, services: Services, *parts: Any) -> str:
    """Stage, code version, the artifact store the refs live in, and the stage's inputs."""
    where = [services.store.root_uri, services.settings.s3_endpoint_url, services.settings.mlflow_tracking_uri]
    blob = json.dumps([stage, code_version(), where, *parts], sort_keys=True, default=str)
    return f"tuneship-{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def _source_digest(source: str, store: ArtifactStore) -> str:
    """Content hash of a data file or directory, local or in the artifact store (so edited data misses the cache)."""
    if not source:
        return ""
    if source.startswith(ARTIFACT_SCHEME) and (found := artifact_of(source, store)):
        return f"{found[0].sha256}/{found[1]}"
    path = Path(source)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(f.relative_to(path)).encode() + f.read_bytes())
        return digest.hexdigest()
    return source


def _dump(value: Any) -> Any:
    if isinstance(value, ResolvedModel):  # where the files sit locally does not change what they are
        return {"id": value.id, "revision": value.revision}
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value


def _inputs_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    """A stage's signature is its cache key: every parameter but the shared services, and for the data files and
    the evaluation database their content (so edited data misses the cache)."""
    store = p["services"].store
    parts = {name: _dump(value) for name, value in sorted(p.items()) if name != "services"}
    if isinstance(p.get("data"), DataConfig):
        parts["files"] = [_source_digest(p["data"].source, store), _source_digest(p["data"].test_file or "", store)]
    if isinstance(p.get("cfg"), EvalConfig):
        parts["database"] = _source_digest(p["cfg"].database or "", store)
    return _key(ctx.task.name, p["services"], parts)


class StageFailed(RuntimeError):
    """A stage failed after its retries; the flow run's final state carries this message."""


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Name the stage in the error that ends the flow (the champion is untouched: nothing was promoted).

    User errors and service failures (after the stage's retries) get the stage's name in one message; anything
    else is a bug and propagates as it is, traceback included."""
    try:
        yield
    except UserError as exc:
        raise StageFailed(f"stage {name!r} failed: {type(exc).__name__}: {exc}") from exc
    except _transient_types() as exc:
        raise StageFailed(f"stage {name!r} failed after its retries: {type(exc).__name__}: {exc}") from exc


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
        """The vLLM server's URL. A server this run started that no longer answers (it crashed, or was killed
        mid-stage) is replaced, so a stage's retry does not reuse a dead URL; a configured server is the user's."""
        if self._vllm is not None and self.settings.vllm_url == "local" and not answers(self._vllm):
            print(f"vLLM at {self._vllm} stopped answering: starting a new one")
            self._stack.close()  # stops what is left of it (its process group)
            self._stack, self._vllm = contextlib.ExitStack(), None
        if self._vllm is None:
            assert self.base is not None
            self._vllm = self._stack.enter_context(local_vllm(self.settings, Path(self.base.path)))
        return self._vllm

    def close(self) -> None:
        self._stack.close()


# Stages. Each takes the shared services (excluded from the cache key by the key functions) and refs.


@task(name="curate", cache_policy=NO_CACHE, **IO_RETRIES)
def curate_stage(cfg: RunConfig, services: Services) -> CuratedRef:
    """Requests + feedback since the last curated version → a new curated dataset (or the last one, unchanged)."""
    from tasks.curate import curate

    ref = curate(cfg, store=services.store, workdir=services.settings.home / "work")
    rows = [{"outcome": key, "rows": n} for key, n in ref.counts.items()]
    rows += [{"outcome": f"rejected: {code}", "rows": n} for code, n in ref.reasons.items()]
    create_table_artifact(rows, key="curation", description=f"curated v{ref.version}: {ref.train}")
    return ref


def curated_overrides(ref: CuratedRef) -> list[str]:
    """Run-config overrides that train on a curated version and test on its feedback holdout (when it has one)."""
    overrides = [f"data.source={ref.train}"]
    if ref.counts.get("holdout_rows", 0):
        overrides.append(f"data.extra_test.feedback={ref.holdout}")
    return overrides


@task(name="resolve base model", cache_policy=NO_CACHE, **IO_RETRIES)
def resolve_stage(name: str, services: Services) -> ResolvedModel:
    """The base model: built or fetched from the artifact store / per-user cache, or a hub id."""
    return resolve_base_model(name, store=services.store, cache_dir=services.settings.cache_dir)


# log_prints off: `datasets` fingerprints functions with dill, which disassembles them into a captured stdout
# that Prefect's print capture would log line by line.
@task(name="preprocess", cache_key_fn=_inputs_key, persist_result=True, log_prints=False, **IO_RETRIES, **PERSISTED)
def preprocess_stage(
    cfg: PreprocessConfig, data: DataConfig, name: str, base: ResolvedModel, services: Services
) -> DatasetRef:
    from tasks.preprocess import preprocess

    ref = preprocess(cfg, data, name=name, base=base, store=services.store, workdir=services.settings.home / "work")
    stats = ref.stats
    rows = [{"split": name, "rows": n} for name, n in stats.splits.items()]
    rows += [{"split": f"rejected: {reason}", "rows": n} for reason, n in stats.reject_reasons.items()]
    create_table_artifact(
        rows, key="dataset-stats", description=f"{ref.artifact.uri} (fingerprint {ref.fingerprint[:12]})"
    )
    return ref


@task(
    name="fine-tune",
    cache_key_fn=_inputs_key,
    persist_result=True,
    **PERSISTED,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_transient,
)
def finetune_stage(
    cfg: FinetuneConfig,
    data: DatasetRef,
    name: str,
    base: ResolvedModel,
    services: Services,
    init: AdapterRef | None = None,
) -> AdapterRef:
    from tasks.finetune import finetune

    work = services.settings.home / "work"
    wandb = wandb_env(services.settings)
    with environ(wandb):
        adapter = finetune(
            cfg,
            data,
            name=name,
            base=base,
            store=services.store,
            tracker=services.tracker,
            workdir=work,
            init=init,
            report_to=("wandb",) if wandb else (),
        )
    m = adapter.metrics
    create_markdown_artifact(
        f"# Fine-tune\n\n{m.get('global_step', 0):.0f} steps, train loss {m.get('train_loss', float('nan')):.3f}, "
        f"eval loss {m.get('eval_loss', float('nan')):.3f}, {m.get('tokens_per_s', 0):.0f} tokens/s\n\n"
        f"Adapter: `{adapter.artifact.uri}` · MLflow run `{adapter.mlflow_run_id}` (loss curve: `loss_curve.png`)",
        key="fine-tune",
    )
    return adapter


@task(name="evaluate", cache_key_fn=_inputs_key, persist_result=True, **IO_RETRIES, **PERSISTED)
def evaluate_stage(
    cfg: EvalConfig,
    adapter: AdapterRef,
    data: DatasetRef,
    base: ResolvedModel,
    champion: AdapterRef | None,
    services: Services,
) -> EvalReport:
    from tasks.evaluate import evaluate

    report = evaluate(
        cfg,
        adapter,
        data,
        base=base,
        store=services.store,
        tracker=services.tracker,
        champion=champion,
        server_url=vllm_endpoints(services.vllm_url())[0],  # one replica is enough to evaluate on
        server_key=services.settings.vllm_key,
        served_base="base",
        workdir=services.settings.home / "work",
    )
    m = report.metrics
    rows = []
    for split, comparisons in ({"test": report.comparisons} | report.split_comparisons).items():
        rows += [
            {
                "split": split,
                "model": role,
                "accuracy": round(m[split_metric(split, f"accuracy_{role}")], 4),
                "invented_identifiers": round(
                    m.get(split_metric(split, f"invented_identifiers_{role}"), float("nan")), 4
                ),
            }
            for role in ("base", "candidate", "champion")
            if split_metric(split, f"accuracy_{role}") in m
        ]
        rows += [
            {
                "split": split,
                "model": f"candidate − {name}",
                "accuracy": round(c.accuracy_diff, 4),
                "ci95": f"[{c.ci_low:+.3f}, {c.ci_high:+.3f}]",
            }
            for name, c in comparisons.items()
        ]
    create_table_artifact(rows, key="eval-comparison", description=f"report: {report.artifact.uri}")
    return report


@task(name="register", cache_key_fn=_inputs_key, persist_result=True, **IO_RETRIES, **PERSISTED)
def register_stage(
    cfg: RunConfig, adapter: AdapterRef, report: EvalReport, data: DatasetRef, services: Services
) -> tuple[ModelVersionRef, PromotionDecision]:
    from tasks.register import promote, register

    uri = services.settings.mlflow_tracking_uri
    version = register(
        cfg,
        adapter,
        report,
        data,
        store=services.store,
        tracker=services.tracker,
        flow_run_id=str(flow_run.get_id() or "none"),
    )
    approve = _ask_approval(cfg, version) if cfg.registry.require_approval else None
    decision = promote(cfg.registry.rules, version, report, tracking_uri=uri, approve=approve)
    verdict = "**promoted** to @champion" if decision.promoted else "**not promoted** (stays @challenger)"
    lines = [f"# Gate: {cfg.model_name} v{version.version} {verdict}", "", "| rule | passed | value |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if r.passed else 'no'} | {r.value} |" for name, r in decision.rules.items()]
    create_markdown_artifact("\n".join(lines), key="gate-decision")
    if decision.promoted:  # deploy-champion deployments trigger on this event (deployments/prefect.yaml)
        emit_event(
            event="tuneship.champion.promoted",
            resource={
                "prefect.resource.id": f"tuneship.model.{version.name}",
                "tuneship.model.name": version.name,
                "tuneship.model.version": version.version,
            },
        )
    return version, decision


class Approval(RunInput):
    """A person's answer to a promotion the gate allows (the Prefect UI shows this as the resume form)."""

    approve: bool = Field(description="true: make this version the champion; false: keep the current one")
    reason: str = Field(min_length=1, max_length=500, description="Why; kept on the model version")


def _ask_approval(cfg: RunConfig, version: ModelVersionRef) -> Callable[[dict[str, RuleResult]], RuleResult]:
    def ask(rules: dict[str, RuleResult]) -> RuleResult:
        lines = [f"# Approve {version.name} v{version.version} as @champion?", "", "| rule | value |", "|---|---|"]
        lines += [f"| {name} | {r.value} |" for name, r in rules.items()]
        lines += ["", "Resume this run with `approve` (true/false) and a `reason`."]
        create_markdown_artifact("\n".join(lines), key="approval-request")
        timeout = cfg.registry.approval_timeout_s
        try:
            answer = pause_flow_run(wait_for_input=Approval, timeout=timeout, poll_interval=2)
        except FlowPauseTimeout:
            return RuleResult(passed=False, value=f"no answer within {timeout} s")
        verdict = "approved" if answer.approve else "rejected"
        return RuleResult(passed=answer.approve, value=f"{verdict}: {answer.reason}")

    return ask


@task(name="deploy", cache_policy=NO_CACHE, **IO_RETRIES)
def deploy_stage(cfg: DeployConfig, name: str, version: str, services: Services) -> Deployment | None:
    from tasks.deploy import deploy, render_manifests

    settings = services.settings
    uri = settings.mlflow_tracking_uri
    if cfg.target == "manifests":
        dep = render_manifests(name, version, cfg, store=services.store, tracking_uri=uri)
    elif settings.vllm_url == "local" and not settings.gateway_url:
        get_run_logger().info(
            "no serving stack configured (TUNESHIP_VLLM_URL / TUNESHIP_GATEWAY_URL): "
            "`tuneship serve` will serve the new champion"
        )
        return None
    else:
        dep = deploy(
            name,
            version,
            cfg,
            store=services.store,
            tracking_uri=uri,
            vllm_url=services.vllm_url(),
            gateway_url=settings.gateway_url,
            admin_key=settings.admin_key,
            vllm_key=settings.vllm_key,
        )
        if dep.cleanup:
            get_run_logger().warning(f"deployed {name} v{dep.version}; {dep.cleanup}")
    where = dep.gateway_url or dep.vllm_url or str(Path(cfg.manifests_dir).resolve())
    create_link_artifact(where, link_text=f"{name} v{dep.version} → {dep.adapter_name}", key="deployment")
    return dep


# Placement: a stage run as its own deployment (e.g. on a GPU work pool). The stage's inputs go as JSON parameters,
# its result comes back through the artifact store; the two sides share nothing but the store and the registry.
Placeable = Literal["preprocess", "fine-tune", "evaluate", "deploy"]
COMPUTE_SECTION: dict[str, str] = {
    "preprocess": "preprocess",
    "fine-tune": "finetune",
    "evaluate": "evaluate",
    "deploy": "deploy",
}


class StageParams(BaseModel):
    stage: Placeable
    config: str = Field(description="The run config, as JSON.")
    base_revision: str = Field(description="The base model revision the caller resolved; the worker must match.")
    inputs: dict[str, Any] = Field(default_factory=dict, description="The stage's input refs, as JSON.")
    result_key: str = Field(description="Artifact-store key the stage's result is written to.")


def pool_type(deployment: str) -> str:
    """The type of the work pool deployment ``deployment`` (FLOW/NAME) runs on."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        if not dep.work_pool_name:
            return "process"
        return client.read_work_pool(dep.work_pool_name).type


def run_elsewhere(
    stage_name: Placeable, deployment: str, cfg: RunConfig, base: ResolvedModel, services: Services, **inputs: Any
) -> str:
    """Run ``stage_name`` as deployment ``deployment`` with ``inputs``, asking its pool for the stage's compute
    profile, and wait; returns the stage's result as JSON."""
    from prefect.deployments import run_deployment

    from infra.compute import job_variables

    key = f"placements/{flow_run.get_id() or uuid.uuid4().hex}/{stage_name}"
    profile = getattr(cfg.compute, COMPUTE_SECTION[stage_name])
    params = StageParams(
        stage=stage_name,
        config=cfg.model_dump_json(),
        base_revision=base.revision,
        inputs={k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in inputs.items()},
        result_key=key,
    )
    if deployment == "sagemaker":
        run_on_sagemaker(params, profile, services)
    else:
        child = run_deployment(
            deployment,
            parameters={"params": params.model_dump(mode="json")},
            job_variables=job_variables(profile, pool_type(deployment)),
            timeout=None,
        )
        if child.state is None or not child.state.is_completed():
            state = child.state.name if child.state else "unknown"
            raise StageFailed(f"deployment {deployment} ended {state}: {child.state.message if child.state else ''}")
    return (services.store.get_dir(key) / "result.json").read_text()


def run_on_sagemaker(params: StageParams, profile: Any, services: Services) -> dict[str, Any]:
    """Submit the stage as a SageMaker training job (flows/sagemaker.py) and wait for it; its description. The
    job's ``train`` command runs ``tuneship stage`` on the request, which writes the result to the store."""
    from flows import sagemaker

    request_key = f"{params.result_key}/request"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "params.json").write_text(params.model_dump_json())
        services.store.put_dir(Path(tmp), request_key)
    spec = sagemaker.job_spec(
        profile,
        settings=services.settings,
        store=services.store,
        request_key=request_key,
        job_name_prefix=f"tuneship-{params.stage}",
    )
    described = sagemaker.submit(spec, services.settings)
    print(f"SageMaker job {described['TrainingJobName']} ({spec['instance_type']}) submitted")
    return sagemaker.wait(described["TrainingJobName"], services.settings)


@flow(name="stage", log_prints=True, validate_parameters=True, **PERSISTED)
def stage_flow(params: StageParams) -> Any:
    """One stage on its own (a GPU worker): resolve the base, run the stage, store its result. An evaluate here
    starts its own vLLM (or uses TUNESHIP_VLLM_URL) and stops it when done."""
    settings = load_settings()
    services = Services(settings)
    cfg = RunConfig.model_validate_json(params.config)
    got = params.inputs
    try:
        with stage("resolve base model"):
            base = resolve_stage(cfg.base_model, services)
        services.base = base
        if base.revision != params.base_revision:
            raise StageFailed(
                f"base model {cfg.base_model} is revision {base.revision[:12]} here, "
                f"{params.base_revision[:12]} for the caller"
            )
        with stage(params.stage):
            result: BaseModel | None
            if params.stage == "preprocess":
                result = preprocess_stage(cfg.preprocess, cfg.data, cfg.name, base, services)
            elif params.stage == "fine-tune":
                init = AdapterRef.model_validate(got["init"]) if got.get("init") else None
                data = DatasetRef.model_validate(got["data"])
                result = finetune_stage(cfg.finetune, data, cfg.name, base, services, init)
            elif params.stage == "evaluate":
                champion = AdapterRef.model_validate(got["champion"]) if got.get("champion") else None
                adapter, data = AdapterRef.model_validate(got["adapter"]), DatasetRef.model_validate(got["data"])
                result = evaluate_stage(cfg.evaluate, adapter, data, base, champion, services)
            else:
                result = deploy_stage(cfg.deploy, got["name"], got["version"], services)
    finally:
        services.close()  # the vLLM server this stage started, if any
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "result.json").write_text(result.model_dump_json() if result is not None else "null")
        services.store.put_dir(Path(tmp), params.result_key, overwrite=True)
    return result


def record_training_cost(version: ModelVersionRef, seconds: float, settings: Settings) -> TrainingCost:
    """Price the fine-tune's wall-clock time on the configured instance and tag the model version with it —
    once: a re-run that took the adapter from the cache keeps the original run's cost."""
    from infra.registry import get_version, set_version_tags

    tags = get_version(version.name, version.version, tracking_uri=settings.mlflow_tracking_uri).tags
    if "tuneship.cost.training_usd" in tags:
        return TrainingCost(
            instance=tags["tuneship.cost.instance"],
            seconds=float(tags["tuneship.cost.training_s"]),
            usd=float(tags["tuneship.cost.training_usd"]),
        )
    cost = training_cost(load_prices(), settings.instance_type, seconds=seconds)
    set_version_tags(
        version.name,
        version.version,
        {
            "tuneship.cost.training_usd": f"{cost.usd:.6f}",
            "tuneship.cost.training_s": f"{cost.seconds:.1f}",
            "tuneship.cost.instance": cost.instance,
        },
        tracking_uri=settings.mlflow_tracking_uri,
    )
    return cost


@flow(name="retrain", log_prints=True, validate_parameters=True, **PERSISTED)
def retrain(params: RetrainParams) -> RetrainSummary:
    """Preprocess → fine-tune → evaluate (base vs fine-tuned vs champion) → register + gate → deploy."""
    from tasks.refs import champion_adapter

    settings = load_settings()
    overrides = list(params.overrides)
    if params.max_eval_examples:
        overrides.append(f"evaluate.max_examples={params.max_eval_examples}")
    services = Services(settings)
    try:
        with stage("load run config"):
            cfg = load_run_config(config_file(params.config, services.store), overrides)
        curated = None
        if params.curate:
            with stage("curate"):
                curated = curate_stage(cfg, services)
                overrides += curated_overrides(curated)
                cfg = load_run_config(config_file(params.config, services.store), overrides)
        with stage("resolve base model"):
            base = resolve_stage(cfg.base_model, services)
        services.base = base
        placed = params.placement
        with stage("preprocess"):
            if "preprocess" in placed:
                raw = run_elsewhere("preprocess", placed["preprocess"], cfg, base, services)
                data = DatasetRef.model_validate_json(raw)
            else:
                data = preprocess_stage(cfg.preprocess, cfg.data, cfg.name, base, services)
        with stage("look up the champion"):
            champion = champion_adapter(cfg.model_name, tracking_uri=settings.mlflow_tracking_uri, store=services.store)
        champion_base = (champion.base_model, champion.base_model_revision) if champion else None
        if champion_base and champion_base != (base.id, base.revision):
            # An adapter only means something on its own base weights: no head-to-head on this base, and nothing
            # to continue from. The gate then keeps the candidate as challenger and says why (tasks.register).
            print(
                f"the champion was trained on {champion_base[0]}@{champion_base[1][:12]}, the candidate on "
                f"{base.id}@{base.revision[:12]}: not compared"
            )
            champion = None
        init = champion if cfg.finetune.init_from == "champion" else None
        if cfg.finetune.init_from == "champion" and champion is None:
            print("finetune.init_from: champion, but there is no champion on this base: training a new LoRA")
        with stage("fine-tune"):
            started = time.perf_counter()
            if "fine-tune" in placed:
                raw = run_elsewhere("fine-tune", placed["fine-tune"], cfg, base, services, data=data, init=init)
                adapter = AdapterRef.model_validate_json(raw)
            else:
                adapter = finetune_stage(cfg.finetune, data, cfg.name, base, services, init)
            training_s = time.perf_counter() - started  # every attempt, retries included
        with stage("evaluate"):
            if champion is not None and champion.sha256 == adapter.sha256:
                champion = None  # unchanged inputs: the candidate is the champion already
            if "evaluate" in placed:
                raw = run_elsewhere(
                    "evaluate", placed["evaluate"], cfg, base, services, adapter=adapter, data=data, champion=champion
                )
                report = EvalReport.model_validate_json(raw)
            else:
                report = evaluate_stage(cfg.evaluate, adapter, data, base, champion, services)
        with stage("register"):
            version, decision = register_stage(cfg, adapter, report, data, services)
            cost = record_training_cost(version, training_s, settings)
        deployment = None
        if params.deploy and decision.promoted:
            with stage("deploy"):
                if "deploy" in placed:
                    raw = run_elsewhere(
                        "deploy", placed["deploy"], cfg, base, services, name=version.name, version=version.version
                    )
                    deployment = Deployment.model_validate_json(raw) if raw.strip() != "null" else None
                else:
                    deployment = deploy_stage(cfg.deploy, version.name, version.version, services)
    finally:
        services.close()
    return RetrainSummary(
        model_name=cfg.model_name,
        dataset=data.artifact.uri,
        adapter=adapter.artifact.uri,
        report=report.artifact.uri,
        version=version.version,
        promoted=decision.promoted,
        reasons=decision.reasons(),
        metrics=report.metrics,
        deployment=deployment,
        training_cost=cost,
        curated=curated,
    )


class DeployChampionParams(BaseModel):
    model_name: str = Field(default="retail-sql", description="Registered model whose champion to deploy.")
    alias: str = Field(default="champion", description="Gateway alias to switch.")


@flow(name="deploy-champion", log_prints=True, validate_parameters=True, **PERSISTED)
def deploy_champion(params: DeployChampionParams = DeployChampionParams()) -> Deployment | None:  # noqa: B008
    """Deploy the registry's current champion to the configured serving stack (on merge, or on a new champion)."""
    from infra.registry import get_version

    settings = load_settings()
    services = Services(settings)
    try:
        mv = get_version(params.model_name, "champion", tracking_uri=settings.mlflow_tracking_uri)
        services.base = resolve_base_model(
            mv.tags.get("tuneship.base_model", ""), store=services.store, cache_dir=settings.cache_dir
        )
        return deploy_stage(DeployConfig(alias=params.alias), params.model_name, str(mv.version), services)
    finally:
        services.close()
