"""Register stage: an MLflow model version with lineage, and the promotion gate — aliases, not stages.

    version = register(cfg, adapter, report, data, store=store, tracking_uri=uri)   # gets @challenger
    decision = promote(cfg.registry.rules, version, report, tracking_uri=uri)       # maybe @champion

Every version is a pyfunc (``tasks/mlflow_model.py``): the adapter and tokenizer as artifacts, the base model
as a reference, so ``mlflow.pyfunc.load_model("models:/<name>@champion")`` loads it offline. The gate writes
its decision and every rule's value as version tags, and a refusal is a normal outcome. Reading the registry,
moving aliases and rolling back are ``infra/registry.py``'s.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from infra.artifacts import ArtifactStore
from infra.registry import (
    CHALLENGER,
    SQL_SCHEMA_TAG,
    ChampionMoved,
    RegistryError,
    base_of,
    champion_version,
    get_version,
    make_champion,
    retry,
    wait_ready,
)
from infra.registry import (
    client as registry_client,
)
from infra.tracking import MlflowTracker
from tasks.config import PromotionRules, RunConfig
from tasks.refs import AdapterRef, Comparison, DatasetRef, EvalReport, ModelVersionRef, PromotionDecision, RuleResult


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def register(
    cfg: RunConfig,
    adapter: AdapterRef,
    report: EvalReport,
    data: DatasetRef,
    *,
    store: ArtifactStore,
    tracker: MlflowTracker,
    flow_run_id: str | None = None,
) -> ModelVersionRef:
    """Log the adapter as an MLflow pyfunc with params, metrics, the eval report and lineage (an MLflow run of
    stage ``register`` on ``tracker``); register it as a new version of ``cfg.model_name`` and give it the
    ``challenger`` alias. The registry is the tracker's server."""
    import mlflow

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
        "tuneship.eval_report_sha256": report.artifact.sha256,
        "tuneship.config_hash": config_hash(cfg),
        "tuneship.git_sha": git_sha(),
        "tuneship.flow_run_id": flow_run_id or "none",
        "tuneship.finetune_run_id": adapter.mlflow_run_id or "none",
    }
    if report.sql_schema:  # measured under the schema's grammar: the gateway serves it under the same one
        lineage[SQL_SCHEMA_TAG] = report.sql_schema
    mlflow_client = registry_client(tracker.tracking_uri)
    mlflow.set_registry_uri(tracker.tracking_uri)
    # A retry after a crash (the worker, or the MLflow server, died after the version was created) finishes the
    # version it created instead of registering the same adapter and report a second time.
    same = (
        f"name = '{name}' and tags.`tuneship.adapter_sha256` = '{adapter.sha256}' "
        f"and tags.`tuneship.eval_report_sha256` = '{report.artifact.sha256}'"
    )
    done = [v for v in mlflow_client.search_model_versions(same) if v.status != "FAILED_REGISTRATION"]
    if done:
        version_id, run_id = str(min(int(v.version) for v in done)), None
    else:
        version_id, run_id = _log_and_register(cfg, adapter, report, store, tracker, lineage)
    wait_ready(mlflow_client, name, version_id)
    for key, value in report.metrics.items():
        retry(mlflow_client.set_model_version_tag, name, version_id, f"tuneship.eval.{key}", f"{value:.6g}")
    retry(mlflow_client.set_registered_model_alias, name, CHALLENGER, version_id)
    return ModelVersionRef(
        name=name,
        version=version_id,
        uri=f"models:/{name}/{version_id}",
        run_id=run_id or mlflow_client.get_model_version(name, version_id).run_id,
        adapter_sha256=adapter.sha256,
        aliases=[CHALLENGER],
    )


def _log_and_register(
    cfg: RunConfig,
    adapter: AdapterRef,
    report: EvalReport,
    store: ArtifactStore,
    tracker: MlflowTracker,
    lineage: dict[str, str],
) -> tuple[str, str]:
    """Log the adapter as a pyfunc model in a register-stage run and create its model version."""
    import mlflow

    from tasks.mlflow_model import AdapterModel

    name = cfg.model_name
    with tracker.run(f"{adapter.run_id}-{report.artifact.sha256[:12]}", stage="register", tags=lineage) as run_id:
        tracker.log_params(cfg.model_dump(mode="json"))
        tracker.log_metrics(report.metrics)
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
    version = retry(mlflow.register_model, logged.model_uri, name, tags=lineage)
    return str(version.version), run_id


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "peft", "mlflow", "tuneship")]


def _champion_rules(rules_cfg: PromotionRules, report: EvalReport, vs: Comparison) -> dict[str, RuleResult]:
    """Head to head with the champion: better on ``improve_on`` (CI low above the margin), and, when that is another
    split than the test split, no regression on the test split beyond ``max_regression`` (CI low)."""

    def shown(c: Comparison) -> str:
        return f"diff {c.accuracy_diff:+.4f}, CI [{c.ci_low:+.4f}, {c.ci_high:+.4f}]"

    split = rules_cfg.improve_on
    if split == "test":
        return {
            "beats_champion": RuleResult(
                passed=vs.ci_low > rules_cfg.ci_margin, value=f"{shown(vs)} vs margin {rules_cfg.ci_margin}"
            )
        }
    on_split = report.split_comparisons.get(split, {}).get("champion")
    better = RuleResult(
        passed=on_split is not None and on_split.ci_low > rules_cfg.ci_margin,
        value=f"{shown(on_split)} vs margin {rules_cfg.ci_margin}" if on_split else f"no {split!r} split was evaluated",
    )
    floor = -rules_cfg.max_regression
    kept = RuleResult(passed=vs.ci_low >= floor, value=f"test split: {shown(vs)} vs floor {floor:+.4f}")
    return {f"beats_champion_on_{split}": better, "no_regression_on_test": kept}


def promote(
    rules_cfg: PromotionRules,
    version: ModelVersionRef,
    report: EvalReport,
    *,
    tracking_uri: str,
    approve: Callable[[dict[str, RuleResult]], RuleResult] | None = None,
) -> PromotionDecision:
    """Move ``champion`` to ``version`` if every rule holds (and ``approve``, when given, says yes once they do);
    tag the version with the decision either way."""
    mlflow_client = registry_client(tracking_uri)
    champion = champion_version(mlflow_client, version.name)
    previous = str(champion.version) if champion else None
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
            if theirs != base_of(mlflow_client.get_model_version(version.name, version.version)):
                why = (
                    f"the champion (v{champion.version}) was trained on another base ({theirs[0]}@"
                    f"{(theirs[1] or '?')[:12]}), so no evaluation compares the two; `tuneship promote` it by hand "
                    "if intended"
                )
            rules["beats_champion"] = RuleResult(passed=False, value=why)
        else:
            rules.update(_champion_rules(rules_cfg, report, vs))
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
    if promoted and approve is not None:
        rules["human_approval"] = approve(rules)
        promoted = rules["human_approval"].passed
    if promoted:  # before any tag says so: the champion may have moved while this run was judging
        try:
            make_champion(mlflow_client, version.name, version.version, expect=previous)
        except ChampionMoved as exc:
            rules["champion_unchanged"] = RuleResult(passed=False, value=str(exc))
            promoted = False
    decision = PromotionDecision(
        name=version.name,
        version=version.version,
        promoted=promoted,
        previous_champion=previous,
        rules=rules,
    )
    for key, result in rules.items():
        retry(
            mlflow_client.set_model_version_tag,
            version.name,
            version.version,
            f"tuneship.gate.{key}",
            f"{'pass' if result.passed else 'fail'}: {result.value}",
        )
    retry(
        mlflow_client.set_model_version_tag,
        version.name,
        version.version,
        "tuneship.gate.decision",
        "promoted" if promoted else "refused",
    )
    return decision


def promote_by_hand(name: str, version: str, *, reason: str, tracking_uri: str) -> str | None:
    """Make ``version`` the champion without the gate (e.g. the first model on a new base); return the old one."""
    mlflow_client = registry_client(tracking_uri)
    if not reason.strip():
        raise RegistryError("a promotion by hand needs a reason; it is kept on the version")
    target = get_version(name, version, tracking_uri=tracking_uri)
    current = champion_version(mlflow_client, name)
    if current is not None and str(current.version) == str(target.version):
        raise RegistryError(f"{name}: version {target.version} is already the champion")
    wait_ready(mlflow_client, name, str(target.version))
    decision = f"promoted by hand: {reason}"
    retry(mlflow_client.set_model_version_tag, name, str(target.version), "tuneship.gate.decision", decision)
    previous = str(current.version) if current else None
    make_champion(mlflow_client, name, str(target.version), expect=previous)
    return previous
