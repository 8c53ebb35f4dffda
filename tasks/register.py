"""Register stage: MLflow model versions with lineage, a promotion gate, and rollback — aliases, not stages.

    version = register(cfg, adapter, report, data, store=store, tracking_uri=uri)   # gets @challenger
    decision = promote(cfg, version, report, tracking_uri=uri)                     # maybe @champion
    rollback("retail-sql", tracking_uri=uri)                                         # @champion walks back

Every version is a pyfunc (``tasks/mlflow_model.py``): the adapter and tokenizer as artifacts, the base model
as a reference, so ``mlflow.pyfunc.load_model("models:/<name>@champion")`` loads it offline. The gate writes
its decision and every rule's value as version tags, and a refusal is a normal outcome. The champion history
(a registered-model tag) lets repeated rollbacks walk back. The alias only ever moves to a version that is
READY and fully tagged.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from infra.artifacts import ArtifactStore
from infra.errors import UserError
from tasks.config import RunConfig
from tasks.refs import AdapterRef, DatasetRef, EvalReport, ModelVersionRef, PromotionDecision, RuleResult

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "tuneship.champion_history"


class RegistryError(UserError, RuntimeError):
    """A registry operation cannot be done (no such model, nothing to roll back to)."""


def _client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _retry(fn: Any, *args: Any, attempts: int = 5, **kwargs: Any) -> Any:
    """Retry a registry write that lost a race on the backend store (e.g. SQLite's 'database is locked')."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            if attempt == attempts - 1 or "locked" not in str(exc).lower():
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _wait_ready(client: Any, name: str, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (status := client.get_model_version(name, version).status) != "READY":
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RegistryError(f"model version {name}/{version} is {status}, not READY")
        time.sleep(0.5)


def register(
    cfg: RunConfig,
    adapter: AdapterRef,
    report: EvalReport,
    data: DatasetRef,
    *,
    store: ArtifactStore,
    tracking_uri: str,
    flow_run_id: str | None = None,
) -> ModelVersionRef:
    """Log the adapter as an MLflow pyfunc with params, metrics, the eval report and lineage; register it
    as a new version of ``cfg.model_name`` and give it the ``challenger`` alias."""
    import mlflow

    from tasks.mlflow_model import AdapterModel

    if report.candidate_sha256 != adapter.sha256:
        raise RegistryError(f"the eval report is for adapter {report.candidate_sha256[:12]}, not {adapter.sha256[:12]}")
    name = cfg.model_name
    lineage = {
        "tuneship.dataset_fingerprint": data.fingerprint,
        "tuneship.base_model": adapter.base_model,
        "tuneship.base_revision": adapter.base_model_revision,
        "tuneship.adapter_sha256": adapter.sha256,
        "tuneship.adapter_uri": adapter.artifact.uri,
        "tuneship.eval_report_uri": report.artifact.uri,
        "tuneship.config_hash": config_hash(cfg),
        "tuneship.git_sha": git_sha(),
        "tuneship.flow_run_id": flow_run_id or "none",
        "tuneship.finetune_run_id": adapter.mlflow_run_id or "none",
    }
    client = _client(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    experiment = mlflow.set_experiment("tuneship")
    with mlflow.start_run(
        experiment_id=experiment.experiment_id, run_name=f"register-{adapter.run_id}", tags=lineage
    ) as run:
        mlflow.log_params({k: str(v)[:6000] for k, v in _flat(cfg.model_dump(mode="json")).items()})
        mlflow.log_metrics({k: float(v) for k, v in report.metrics.items()})
        mlflow.log_artifacts(str(store.get_dir(report.artifact)), artifact_path="eval")
        logged = mlflow.pyfunc.log_model(
            name="model",
            python_model=AdapterModel(),
            artifacts={"adapter": str(store.get_dir(adapter.artifact))},
            model_config={
                "base_model": adapter.base_model,
                "base_revision": adapter.base_model_revision,
                "max_new_tokens": cfg.evaluate.max_new_tokens,
            },
            pip_requirements=_requirements(),
        )
    # register_model creates the registered model if needed (tolerating a concurrent creator) and waits for READY.
    version = _retry(mlflow.register_model, logged.model_uri, name, tags=lineage)
    version_id = str(version.version)
    _wait_ready(client, name, version_id)
    for key, value in report.metrics.items():
        _retry(client.set_model_version_tag, name, version_id, f"tuneship.eval.{key}", f"{value:.6g}")
    _retry(client.set_registered_model_alias, name, CHALLENGER, version_id)
    return ModelVersionRef(
        name=name,
        version=version_id,
        uri=f"models:/{name}/{version_id}",
        run_id=run.info.run_id,
        adapter_sha256=adapter.sha256,
        aliases=[CHALLENGER],
    )


def champion_adapter(name: str, *, tracking_uri: str, store: ArtifactStore) -> AdapterRef | None:
    """The current champion's adapter ref (from its lineage tags and the artifact store), or None."""
    from mlflow.exceptions import MlflowException

    try:
        champion = _champion(_client(tracking_uri), name)
    except MlflowException:
        return None
    return None if champion is None else adapter_of(champion, store)


def get_version(name: str, ref: str, *, tracking_uri: str) -> Any:
    """The model version ``ref`` of ``name``: a version number or an alias (``champion``, ``challenger``)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        if str(ref).isdigit():
            return client.get_model_version(name, str(ref))
        return client.get_model_version_by_alias(name, ref)
    except MlflowException:
        raise RegistryError(f"{name}: no version or alias {ref!r} at {tracking_uri}") from None


def stored_key(uri: str, store: ArtifactStore, what: str) -> str:
    """The store key of ``uri``, which must live in ``store``."""
    prefix = store.root_uri.rstrip("/") + "/"
    if not uri.startswith(prefix):
        raise RegistryError(f"{what}: {uri or '(no uri)'} is not in this artifact store ({store.root_uri})")
    return uri[len(prefix) :]


def adapter_of(mv: Any, store: ArtifactStore) -> AdapterRef:
    """The adapter ref of model version ``mv``, read back from the artifact store through its lineage tag."""
    key = stored_key(mv.tags.get("tuneship.adapter_uri", ""), store, f"{mv.name} v{mv.version} adapter")
    saved = json.loads((store.get_dir(key) / "tuneship_adapter.json").read_text())
    return AdapterRef(artifact=store.ref(key), **saved)


def set_version_tags(name: str, version: str, tags: dict[str, str], *, tracking_uri: str) -> None:
    client = _client(tracking_uri)
    for key, value in tags.items():
        _retry(client.set_model_version_tag, name, str(version), key, value)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    from infra.tracking import flatten

    return flatten(tree, prefix)


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "peft", "mlflow", "tuneship")]


BASE_TAGS = ("tuneship.base_model", "tuneship.base_revision")


def base_of(mv: Any) -> tuple[str | None, ...]:
    """(base model id, revision) a registered version's adapter was trained on, from its lineage tags."""
    return tuple(mv.tags.get(k) for k in BASE_TAGS)


def _champion(client: Any, name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _history(client: Any, name: str) -> list[str]:
    return json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))


def promote(cfg: RunConfig, version: ModelVersionRef, report: EvalReport, *, tracking_uri: str) -> PromotionDecision:
    """Move ``champion`` to ``version`` if every rule holds; tag the version with the decision either way."""
    rules_cfg = cfg.registry.rules
    client = _client(tracking_uri)
    champion = _champion(client, version.name)
    m = report.metrics
    rules: dict[str, RuleResult] = {}

    vs_base = report.comparisons.get("base")
    rules["beats_base"] = RuleResult(
        passed=vs_base is not None and vs_base.ci_low > rules_cfg.ci_margin,
        value=f"CI low {vs_base.ci_low:+.4f} vs margin {rules_cfg.ci_margin}"
        if vs_base
        else "no comparison with the base",
    )
    if champion is None:
        rules["beats_champion"] = RuleResult(passed=True, value="no champion yet")
    elif str(champion.version) == version.version:
        rules["beats_champion"] = RuleResult(passed=False, value=f"version {version.version} is already the champion")
    else:
        vs = report.comparisons.get("champion")
        champion_sha = champion.tags.get("tuneship.adapter_sha256")
        if vs is None or report.champion_sha256 != champion_sha:
            why = f"the report does not compare against the current champion (v{champion.version})"
            theirs = base_of(champion)
            if theirs != base_of(client.get_model_version(version.name, version.version)):
                why = (
                    f"the champion (v{champion.version}) was trained on another base ({theirs[0]}@"
                    f"{(theirs[1] or '?')[:12]}), so no evaluation compares the two; `tuneship promote` it by hand "
                    "if intended"
                )
            rules["beats_champion"] = RuleResult(passed=False, value=why)
        else:
            rules["beats_champion"] = RuleResult(
                passed=vs.ci_low > rules_cfg.ci_margin,
                value=f"diff {vs.accuracy_diff:+.4f}, CI [{vs.ci_low:+.4f}, {vs.ci_high:+.4f}] "
                f"vs margin {rules_cfg.ci_margin}",
            )
        champion_ppl = champion.tags.get("tuneship.eval.perplexity_candidate")
        if champion_ppl is not None:
            limit = float(champion_ppl) * (1 + rules_cfg.max_perplexity_increase)
            rules["perplexity"] = RuleResult(
                passed=m["perplexity_candidate"] <= limit,
                value=f"{m['perplexity_candidate']:.4g} vs champion {float(champion_ppl):.4g} (limit {limit:.4g})",
            )
    rules["parity"] = RuleResult(
        passed=m["parity_agreement"] >= rules_cfg.min_parity,
        value=f"{m['parity_agreement']:.4f} vs minimum {rules_cfg.min_parity}",
    )
    rules["error_rate"] = RuleResult(
        passed=m["error_rate_candidate"] <= rules_cfg.max_error_rate,
        value=f"{m['error_rate_candidate']:.4f} vs maximum {rules_cfg.max_error_rate}",
    )
    promoted = all(r.passed for r in rules.values())
    decision = PromotionDecision(
        name=version.name,
        version=version.version,
        promoted=promoted,
        previous_champion=str(champion.version) if champion else None,
        rules=rules,
    )
    for key, result in rules.items():
        _retry(client.set_model_version_tag, version.name, version.version, f"tuneship.gate.{key}",
               f"{'pass' if result.passed else 'fail'}: {result.value}")  # fmt: skip
    _retry(client.set_model_version_tag, version.name, version.version, "tuneship.gate.decision",
           "promoted" if promoted else "refused")  # fmt: skip
    if promoted:
        _make_champion(client, version.name, version.version)
    return decision


def _make_champion(client: Any, name: str, version: str) -> None:
    history = _history(client, name)
    _retry(client.set_registered_model_tag, name, HISTORY_TAG, json.dumps([*history, version]))
    _retry(client.set_registered_model_alias, name, CHAMPION, version)


def promote_by_hand(name: str, version: str, *, reason: str, tracking_uri: str) -> str | None:
    """Make ``version`` the champion without the gate (e.g. the first model on a new base); return the old one."""
    client = _client(tracking_uri)
    if not reason.strip():
        raise RegistryError("a promotion by hand needs a reason; it is kept on the version")
    target = get_version(name, version, tracking_uri=tracking_uri)
    current = _champion(client, name)
    if current is not None and str(current.version) == str(target.version):
        raise RegistryError(f"{name}: version {target.version} is already the champion")
    _wait_ready(client, name, str(target.version))
    _retry(
        client.set_model_version_tag, name, str(target.version), "tuneship.gate.decision", f"promoted by hand: {reason}"
    )
    _make_champion(client, name, str(target.version))
    return str(current.version) if current else None


def rollback(name: str, *, tracking_uri: str) -> str:
    """Move ``champion`` back to the previous champion; return the version now serving."""
    client = _client(tracking_uri)
    history = _history(client, name)
    current = _champion(client, name)
    if current is None:
        raise RegistryError(f"{name} has no champion to roll back from")
    if history and history[-1] == str(current.version):
        history = history[:-1]
    if not history:
        raise RegistryError(f"{name}: no earlier champion than version {current.version} to roll back to")
    target = history[-1]
    _wait_ready(client, name, target)
    _retry(client.set_registered_model_tag, name, HISTORY_TAG, json.dumps(history))
    _retry(client.set_registered_model_alias, name, CHAMPION, target)
    _retry(
        client.set_model_version_tag,
        name,
        str(current.version),
        "tuneship.rolled_back",
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    return target


def list_versions(name: str, *, tracking_uri: str) -> list[dict[str, Any]]:
    """Every version of ``name``: aliases, key metrics and lineage, newest first."""
    client = _client(tracking_uri)
    try:
        model = client.get_registered_model(name)
    except Exception as exc:
        raise RegistryError(f"no registered model {name!r} at {tracking_uri}") from exc
    aliases: dict[str, list[str]] = {}
    for alias, number in (model.aliases or {}).items():
        aliases.setdefault(str(number), []).append(alias)
    rows = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        tags = mv.tags
        rows.append(
            {
                "version": str(mv.version),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "accuracy": tags.get("tuneship.eval.accuracy_candidate"),
                "perplexity": tags.get("tuneship.eval.perplexity_candidate"),
                "gate": tags.get("tuneship.gate.decision", "not gated"),
                "adapter_sha256": tags.get("tuneship.adapter_sha256", "")[:12],
                "dataset": tags.get("tuneship.dataset_fingerprint", "")[:12],
                "base_model": tags.get("tuneship.base_model"),
                "git_sha": tags.get("tuneship.git_sha", "")[:12],
                "created": mv.creation_timestamp,
                "tags": dict(tags),
            }
        )
    return sorted(rows, key=lambda r: -int(r["version"]))
