"""Run configs: *what* a run does (model, data, LoRA/QLoRA, training), as YAML validated by pydantic.

Where things are (buckets, URIs, credentials) is environment settings (``infra/settings.py``), not here.
Every shipped preset in ``deployments/configs/`` is validated by a test. Overrides use dotted keys:

    cfg = load_run_config("deployments/configs/tiny-cpu.yaml", ["finetune.train.learning_rate=1e-3"])

Validation errors name the file and the dotted key, e.g.
``deployments/configs/x.yaml: finetune.lora.r: Input should be greater than 0``.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infra.compute import ComputeConfig
from infra.errors import UserError
from infra.registry import check_model_name
from infra.vllm_server import VLLM_LORA_RANKS
from tasks.base_model import check_base_model


class ConfigError(UserError, ValueError):
    """A run config is missing, malformed or invalid; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Strict):
    """Where the training data comes from and how its rows map to prompt and response."""

    source: str = Field(description="A JSONL/CSV/Parquet file, a saved HF dataset directory, or artifact://KEY[/PATH].")
    test_file: str | None = Field(default=None, description="An explicit test set; else the test split is hashed off.")
    extra_test: dict[str, str] = Field(
        default_factory=dict,
        description="More test sets by split name (e.g. paraphrase: FILE): evaluate scores each one beside the test "
        "split, with its own CI. A row that repeats a training row is rejected as a duplicate, so none leaks.",
    )
    format: Literal["auto", "jsonl", "csv", "parquet", "hf"] = "auto"
    instruction_field: str = "instruction"
    input_field: str | None = Field(default="input", description="Optional context field, appended when present.")
    response_field: str = "response"
    messages_field: str = Field(default="messages", description="Chat rows: a list of {role, content}.")
    template: Literal["alpaca", "chat"] = Field(
        default="alpaca", description="alpaca: '### Instruction:/### Response:' + EOS; chat: the tokenizer's template."
    )

    @field_validator("extra_test")
    @classmethod
    def _split_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name) or name in ("train", "eval", "test"):
                raise ValueError(
                    f"{name!r}: a split name is lower-case letters, digits and '_' (≤ 32), other than train/eval/test"
                )
        return value


class PreprocessConfig(_Strict):
    max_seq_len: int = Field(default=256, gt=8, description="Rows longer than this (in tokens) are rejected.")
    eval_fraction: float = Field(default=0.05, ge=0, lt=1)
    test_fraction: float = Field(default=0.1, ge=0, lt=1, description="Ignored when data.test_file is given.")
    max_reject_rate: float = Field(default=0.1, ge=0, le=1, description="Fail the stage above this share of rejects.")

    @model_validator(mode="after")
    def _fractions(self) -> PreprocessConfig:
        if self.eval_fraction + self.test_fraction >= 0.9:
            raise ValueError("eval_fraction + test_fraction must leave at least 10 % for training")
        return self


class LoraSettings(_Strict):
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)

    @model_validator(mode="after")
    def _servable(self) -> LoraSettings:
        if self.r not in VLLM_LORA_RANKS:
            raise ValueError(f"r={self.r}: vLLM serves LoRA ranks {VLLM_LORA_RANKS}; pick one of them")
        return self


class TrainSettings(_Strict):
    epochs: float = Field(default=3, gt=0)
    max_steps: int = Field(default=-1, description="If > 0, stop after this many optimizer steps (overrides epochs).")
    micro_batch_size: int = Field(default=4, gt=0)
    gradient_accumulation_steps: int = Field(default=4, gt=0)
    learning_rate: float = Field(default=2e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    logging_steps: int = Field(default=10, gt=0)
    save_strategy: Literal["epoch", "steps"] = "epoch"
    save_steps: int = Field(default=100, gt=0, description="Used when save_strategy is 'steps'.")
    eval_steps: int | None = Field(default=None, description="Evaluate every N steps; default: at each save.")
    batching: Literal["group_by_length", "padded"] = Field(
        default="group_by_length", description="group_by_length: similar lengths per batch, dynamic padding."
    )
    seed: int = 42
    max_oom_retries: int = Field(default=2, ge=0, description="CUDA OOM: halve the micro-batch, double accumulation.")


class FinetuneConfig(_Strict):
    quantization: Literal["none", "nf4", "int8"] = Field(
        default="none", description="QLoRA: nf4 (double quant) or int8."
    )
    init_from: Literal["base", "champion"] = Field(
        default="base",
        description="base: a new LoRA; champion: continue training the registry's champion adapter (same base, "
        "rank and target modules), e.g. a retrain on feedback that keeps what the champion knew.",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    gradient_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    memory_limit_gib: float | None = Field(
        default=None, gt=0, description="Override the device memory for the estimate."
    )
    processes: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Data-parallel training processes (`accelerate launch`, one per GPU; gloo on CPU). The global "
        "batch stays micro_batch_size × gradient_accumulation_steps: each process takes its share.",
    )
    accelerate_config: str | None = Field(
        default=None,
        description="An accelerate config file (deployments/accelerate/*.yaml: FSDP or DeepSpeed ZeRO-3 for a "
        "model one GPU cannot hold); its num_processes gives way to `processes`.",
    )

    @model_validator(mode="after")
    def _global_batch_splits(self) -> FinetuneConfig:
        n, t = self.processes, self.train
        if n > 1 and t.gradient_accumulation_steps % n and (t.micro_batch_size * t.gradient_accumulation_steps) % n:
            raise ValueError(
                f"finetune.processes={n} cannot share the global batch of {t.micro_batch_size} × "
                f"{t.gradient_accumulation_steps}: make the accumulation steps or the global batch a multiple of it"
            )
        return self


BUILTIN_SCORERS = ("sql_execution", "exact_match", "regex")
SCORER_GROUP = "tuneship.scorers"


def registered_scorers() -> dict[str, Any]:
    """Scorers that installed packages register (``[project.entry-points."tuneship.scorers"]``), by name."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=SCORER_GROUP)}


class EvalConfig(_Strict):
    """How the evaluate stage scores a model on the test split."""

    scorer: str = Field(
        default="sql_execution",
        description="sql_execution, exact_match, regex, or a scorer registered under the 'tuneship.scorers' entry "
        "point group (a package's (prediction, reference) -> bool); never an import path from the run's parameters.",
    )
    database: str | None = Field(default=None, description="SQLite file the sql_execution scorer runs queries on.")
    regex: str | None = Field(default=None, description="For scorer 'regex': the prediction must match it (fullmatch).")
    max_new_tokens: int = Field(default=128, gt=0)
    max_examples: int | None = Field(default=None, gt=0, description="Score only the first N test examples.")
    sql_timeout_s: float = Field(default=2.0, gt=0, description="Time limit for each generated query.")
    bootstrap_samples: int = Field(default=2000, ge=100)
    parity_sample: int = Field(default=64, ge=1, description="Test prompts compared between PEFT and vLLM.")
    perplexity_on: Literal["response", "all"] = Field(default="response", description="Which tokens perplexity scores.")
    perplexity_stride: int | None = Field(
        default=None, gt=0, description="Sliding-window stride; default: half the window."
    )
    decoding: Literal["free", "sql_schema"] = Field(
        default="free",
        description="free: the model writes any text. sql_schema: every answer is generated under a grammar built "
        "from evaluate.database, which admits only queries over its own tables and columns (infra/sql_grammar.py); "
        "the registered version carries the schema and the gateway serves it under the same grammar.",
    )

    @model_validator(mode="after")
    def _scorer_inputs(self) -> EvalConfig:
        if self.scorer == "sql_execution" and not self.database:
            raise ValueError("scorer 'sql_execution' needs evaluate.database (a SQLite file)")
        if self.decoding == "sql_schema" and not self.database:
            raise ValueError("evaluate.decoding 'sql_schema' needs evaluate.database (the SQLite file to constrain to)")
        if self.scorer == "regex" and not self.regex:
            raise ValueError("scorer 'regex' needs evaluate.regex")
        if self.scorer not in BUILTIN_SCORERS and self.scorer not in registered_scorers():
            known = sorted({*BUILTIN_SCORERS, *registered_scorers()})
            raise ValueError(
                f"scorer {self.scorer!r} is not a known scorer: use one of {known}, or register yours under the "
                f"{SCORER_GROUP!r} entry point group of an installed package"
            )
        return self


class PromotionRules(_Strict):
    """What a challenger must show before it becomes the champion."""

    ci_margin: float = Field(default=0.0, description="The accuracy-difference CI lower bound must exceed this.")
    improve_on: str = Field(
        default="test",
        description="The split on which the candidate must beat the champion: 'test', or an extra test split (e.g. "
        "'feedback', the curated feedback holdout). For another split, the test split must also not regress.",
    )
    max_regression: float = Field(
        default=0.03,
        ge=0,
        le=1,
        description="With improve_on another split: the test split's CI lower bound vs the champion must stay at "
        "or above -max_regression (0.03: three points).",
    )
    max_perplexity_increase: float = Field(default=0.05, ge=0, description="Relative to the champion's perplexity.")
    min_parity: float = Field(default=0.99, ge=0, le=1, description="PEFT/vLLM greedy agreement.")
    max_error_rate: float = Field(default=0.25, ge=0, le=1, description="Share of outputs that failed to score.")


class RegisterConfig(_Strict):
    model_name: str | None = Field(default=None, description="Registered model name; default: the run name.")
    rules: PromotionRules = Field(default_factory=PromotionRules)
    require_approval: bool = Field(
        default=False,
        description="A person approves (or rejects, with a reason) each promotion the gate allows, from the Prefect "
        "UI or API, before the champion alias moves; the run waits paused.",
    )
    approval_timeout_s: int = Field(
        default=86_400, gt=0, description="With no answer this long, the promotion is refused (and the run ends)."
    )

    @field_validator("model_name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        return value if value is None else check_model_name(value)


class DeployConfig(_Strict):
    """How the deploy stage ships a registered version (see tasks/deploy.py)."""

    target: Literal["local", "existing", "manifests"] = Field(
        default="existing",
        description="local: start a vLLM server from the vLLM venv; existing: hot-load into TUNESHIP_VLLM_URL; "
        "manifests: render compose / Kubernetes / Modal files (nothing is started).",
    )
    alias: str = Field(default="champion", description="The gateway alias switched to the new version.")
    smoke_examples: int = Field(default=4, ge=0, description="Eval prompts whose greedy output must match the eval's.")
    drain_timeout_s: float = Field(default=60, gt=0, description="Wait this long for the old adapter to go idle.")
    manifests_dir: str = Field(default="deploy", description="Where target 'manifests' writes its files.")
    vllm_image: str = "vllm/vllm-openai:v0.33.0"
    gateway_image: str = "ghcr.io/tuneship/gateway:latest"
    gpus: int = Field(default=1, ge=0, description="GPUs requested for the vLLM container (manifests).")
    tensor_parallel_size: int | None = Field(
        default=None,
        ge=1,
        description="vLLM --tensor-parallel-size (manifests): the base split across this many of the GPUs. "
        "Default: all of them.",
    )
    stream_interval: int = Field(
        default=1,
        ge=1,
        le=64,
        description="vLLM --stream-interval (manifests): tokens per streamed chunk after the first (as "
        "TUNESHIP_VLLM_STREAM_INTERVAL for a vLLM tuneship starts).",
    )

    @model_validator(mode="after")
    def _parallel_fits(self) -> DeployConfig:
        if self.tensor_parallel_size and self.tensor_parallel_size > max(self.gpus, 1):
            raise ValueError(f"deploy.tensor_parallel_size {self.tensor_parallel_size} > deploy.gpus {self.gpus}")
        return self


class CurateConfig(_Strict):
    """How production feedback becomes training rows (``tuneship curate``, the retrain flow's curate stage)."""

    keep_thumbs_up: bool = Field(default=False, description="Keep answers rated up (validated) as training rows.")
    holdout_share: float = Field(
        default=0.3, ge=0, lt=1, description="Share of corrected rows held out as the feedback test split."
    )
    near_duplicate: float = Field(
        default=0.8, gt=0, le=1, description="Questions this similar (Jaccard of character 5-grams) are duplicates."
    )
    min_new_rows: int = Field(default=20, ge=1, description="A curation adding this many rows starts a retrain.")
    max_correction_chars: int = Field(default=4000, gt=0, description="Longer corrections are rejected.")
    trigger_down_rate: float = Field(
        default=0.4, gt=0, le=1, description="A champion's thumbs-down share at or above this requests a retrain."
    )
    trigger_min_feedback: int = Field(
        default=20, ge=1, description="… once it has this many ratings in the window (fewer say little)."
    )
    trigger_window_s: float = Field(default=3600, gt=0, description="The window the thumbs-down share is taken over.")
    cooldown_s: float = Field(
        default=3600, ge=0, description="No second retrain request this soon after one: a burst starts one retrain."
    )


class RunConfig(_Strict):
    """One training run: the base model, the data, and what each stage does."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="Run/model name (lowercase, digits, . _ -).")
    base_model: str = Field(description="tuneship/<recipe> (offline base), a local HF directory, or a hub id.")
    data: DataConfig
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvalConfig = Field(default_factory=lambda: EvalConfig(scorer="exact_match"))
    registry: RegisterConfig = Field(default_factory=RegisterConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    compute: ComputeConfig = Field(
        default_factory=ComputeConfig,
        description="Per stage: what a placed stage asks of its work pool (GPUs, CPU, memory, disk, spot).",
    )

    @field_validator("base_model")
    @classmethod
    def _known_offline_recipe(cls, value: str) -> str:
        check_base_model(value)  # an unknown tuneship/<recipe> fails here, when the config loads
        return value

    @property
    def model_name(self) -> str:
        return self.registry.model_name or self.name


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
    node[leaf] = value


def _format_errors(exc: ValidationError, where: str) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{key}: {err['msg'].removeprefix('Value error, ')}")
    return f"{where}: " + "; ".join(parts)


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None, **base: Any) -> RunConfig:
    """Read a YAML run config (or start from ``base``), apply ``key.path=value`` overrides, validate."""
    tree: dict[str, Any] = dict(base)
    where = "run config"
    if path is not None:
        where = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such run config") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        tree.update(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, where)) from None
