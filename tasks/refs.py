"""The small frozen refs that travel between stages: a URI and a sha256 plus what the next stage needs.

Bytes stay in the artifact store; refs are cheap to pass through Prefect, log to MLflow and compare.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from infra.artifacts import ArtifactRef, ArtifactStore
from infra.registry import ADAPTER, champion_version, client, version_artifact


class _Ref(BaseModel):
    model_config = ConfigDict(frozen=True)


class DatasetStats(_Ref):
    rows_in: int
    kept: int
    rejected: int
    reject_reasons: dict[str, int] = Field(default_factory=dict)
    splits: dict[str, int] = Field(default_factory=dict)
    token_length: dict[str, float] = Field(default_factory=dict, description="p50, p90, p99, max, mean (tokens/row)")


class DatasetRef(_Ref):
    """A tokenised dataset (train/eval/test) in the artifact store, with its rejects and statistics."""

    artifact: ArtifactRef
    fingerprint: str = Field(description="sha256 over every tokenised row of every split")
    base_model: str = Field(description="whose tokenizer made the token ids")
    template: str
    max_seq_len: int
    stats: DatasetStats


class CuratedRef(_Ref):
    """A curated dataset version: the training rows (previous + from feedback) and the feedback holdout."""

    key: str
    version: int
    train: str = Field(description="artifact://… of train.jsonl, for data.source")
    holdout: str = Field(description="artifact://… of feedback_holdout.jsonl, for data.extra_test.feedback")
    needs_labels: str
    fingerprint: str = Field(description="sha256 of train.jsonl")
    previous_fingerprint: str
    counts: dict[str, int]
    reasons: dict[str, int]


class AdapterRef(_Ref):
    """A LoRA adapter (PEFT ``save_pretrained`` + tokenizer) in the artifact store."""

    artifact: ArtifactRef
    base_model: str
    base_model_revision: str
    rank: int
    alpha: int
    target_modules: list[str]
    quantization: str
    dataset_fingerprint: str
    run_id: str
    mlflow_run_id: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    init_sha256: str | None = Field(default=None, description="the adapter training continued from, if any")

    @property
    def sha256(self) -> str:
        return self.artifact.sha256


class Comparison(_Ref):
    """Paired comparison of the candidate against another model on the same examples."""

    against: str
    accuracy_diff: float
    ci_low: float
    ci_high: float
    regressions: list[int] = Field(default_factory=list, description="indices right before, wrong now")
    fixes: list[int] = Field(default_factory=list, description="indices wrong before, right now")


def split_metric(split: str, metric: str) -> str:
    """The name an evaluation gives ``metric`` on test split ``split``: the test split's metrics keep their names
    (``accuracy_candidate``), an extra split's carry its name (``paraphrase_accuracy_candidate``)."""
    return metric if split == "test" else f"{split}_{metric}"


class EvalReport(_Ref):
    """The evaluation of a candidate adapter against the base (and the champion, when there is one)."""

    artifact: ArtifactRef
    candidate_sha256: str
    champion_sha256: str | None = None
    base_model: str
    n_examples: int
    metrics: dict[str, float] = Field(
        description="the test split's under their names (accuracy_candidate, …); an extra test split's prefixed "
        "with its name (paraphrase_accuracy_candidate, …)"
    )
    comparisons: dict[str, Comparison] = Field(description="the candidate vs base/champion on the test split")
    split_comparisons: dict[str, dict[str, Comparison]] = Field(
        default_factory=dict, description="the same for each extra test split (data.extra_test), by split name"
    )
    sql_schema: str | None = Field(
        default=None,
        description="with evaluate.decoding sql_schema: the schema (infra.sql_grammar.schema_json) whose grammar "
        "every answer was generated under; the registered version carries it to the gateway",
    )


class ModelVersionRef(_Ref):
    """A registered model version: load it with ``mlflow.pyfunc.load_model(uri)``."""

    name: str
    version: str
    uri: str = Field(description="models:/<name>/<version>")
    run_id: str
    adapter_sha256: str
    aliases: list[str] = Field(default_factory=list)


class RuleResult(_Ref):
    passed: bool
    value: str


class PromotionDecision(_Ref):
    name: str
    version: str
    promoted: bool
    previous_champion: str | None
    rules: dict[str, RuleResult]

    def reasons(self) -> str:
        return "; ".join(f"{k}: {'pass' if r.passed else 'FAIL'} ({r.value})" for k, r in self.rules.items())


class Deployment(_Ref):
    """A model version shipped to a vLLM server (and switched in the gateway), or rendered as manifests."""

    model_name: str
    version: str
    target: str = Field(description="local, existing or manifests")
    adapter_name: str = Field(description="the name vLLM serves the adapter under")
    vllm_url: str | None = None
    gateway_url: str | None = None
    alias: str | None = None
    previous: str | None = Field(default=None, description="what the alias served before")
    deployed_at: str
    swap_s: float | None = Field(default=None, description="load + smoke test + switch + drain, seconds")
    smoke_checked: int = 0
    cleanup: str | None = Field(default=None, description="why the previous adapter is still loaded, if it is")
    manifests: list[str] = Field(default_factory=list)


def adapter_of(mv: Any, store: ArtifactStore) -> AdapterRef:
    """The adapter ref of model version ``mv``, read back from the artifact store through its lineage tags and
    verified against the sha256 it was registered with."""
    ref = version_artifact(mv, store, ADAPTER)
    saved = json.loads((store.get_dir(ref) / "tuneship_adapter.json").read_text())
    return AdapterRef(artifact=ref, **saved)


def champion_adapter(name: str, *, tracking_uri: str, store: ArtifactStore) -> AdapterRef | None:
    """The current champion's adapter ref, or None when ``name`` has no champion (or is not registered)."""
    champion = champion_version(client(tracking_uri), name)
    return None if champion is None else adapter_of(champion, store)
