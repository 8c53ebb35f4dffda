"""Deployment files for a GPU host or cluster, rendered from ``infra/templates``: docker-compose, Kubernetes
(ConfigMap, Deployments, Services; the adapter pulled from S3 by an init container) and a Modal app.

    files = render_all(ManifestSpec(model_name="retail-sql", version="3", ...), Path("deploy"))

vLLM serves the base with the adapter registered at start (``--lora-modules``) and runtime updating on, so a
later ``tuneship deploy`` can still hot-swap into it; the gateway starts with the alias map pointing at it.

Nothing reaches vLLM but the gateway: vLLM requires an API key (``VLLM_API_KEY``, from a secret the gateway
reads too), compose does not publish its port, and a Kubernetes NetworkPolicy admits only the gateway's pods.
Every name is checked against one pattern, every shell argument is quoted, and every value goes into YAML
through a serializer (``tojson``: JSON is YAML), so no field can inject a command or a key.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from infra.errors import UserError
from infra.registry import check_model_name
from infra.settings import VLLM_KEEP_ALIVE_S

TEMPLATES = Path(__file__).parent / "templates"
FILES = {
    "docker-compose.yaml.j2": "docker-compose.yaml",
    "kubernetes.yaml.j2": "kubernetes.yaml",
    "modal_app.py.j2": "modal_app.py",
}
OFFLINE_PREFIX = "tuneship/"
S3_URI = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,62}(/[A-Za-z0-9._=+-]+)*/?")
IMAGE = re.compile(r"[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9._-]+)?(@sha256:[0-9a-f]{64})?")
# tuneship/<recipe>, or a hub id pinned to a commit (tasks/base_model.py): org/model@<40 hex>
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+(@[0-9a-f]{40})?")
GPU = re.compile(r"[A-Za-z0-9-]+(:[0-9]+)?")


class ManifestError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class ManifestSpec:
    model_name: str
    version: str
    adapter_name: str
    adapter_uri: str = field(metadata={"doc": "s3:// URI of the adapter directory"})
    base_model: str = field(metadata={"doc": "a hub id, or tuneship/<recipe> with base_model_uri set"})
    vllm_image: str
    gateway_image: str
    base_model_uri: str | None = None
    gpus: int = 1
    tensor_parallel_size: int = 1  # vLLM splits the base across this many GPUs (70B: 4 × 80 GB)
    max_lora_rank: int = 16
    max_model_len: int = 4096
    fetch_image: str = "amazon/aws-cli:2.31.0"
    vllm_port: int = 8000
    vllm_keep_alive_s: int = VLLM_KEEP_ALIVE_S  # vLLM keeps idle connections this long; the gateway is told
    stream_interval: int = 1  # vLLM --stream-interval: tokens per streamed chunk after the first
    gateway_port: int = 8080
    modal_gpu: str = "A10G"

    def __post_init__(self) -> None:
        try:
            for what in ("model_name", "version", "adapter_name"):
                check_model_name(getattr(self, what), what=what)
        except ValueError as exc:
            raise ManifestError(str(exc)) from None
        checks = [
            ("vllm_image", IMAGE),
            ("gateway_image", IMAGE),
            ("fetch_image", IMAGE),
            ("base_model", HUB_ID),
            ("modal_gpu", GPU),
        ]
        for what, pattern in checks:
            if not pattern.fullmatch(getattr(self, what)):
                raise ManifestError(f"{what} {getattr(self, what)!r} does not look like a {what.replace('_', ' ')}")
        for what in ("adapter_uri", "base_model_uri"):
            value = getattr(self, what)
            dots = value is not None and {".", ".."} & set(value.removeprefix("s3://").split("/"))
            if value is not None and value.startswith("s3://") and (dots or not S3_URI.fullmatch(value)):
                raise ManifestError(f"{what} {value!r}: not a plain s3://bucket/key URI")
        if self.tensor_parallel_size > max(self.gpus, 1):
            raise ManifestError(f"tensor_parallel_size {self.tensor_parallel_size} > gpus {self.gpus}")
        if not self.adapter_uri.startswith("s3://"):
            raise ManifestError(
                f"adapter {self.adapter_uri}: manifests pull adapters from S3, so the artifact store must be "
                "S3 (TUNESHIP_ARTIFACT_ROOT=s3://bucket/prefix)"
            )
        if self.base_model.startswith(OFFLINE_PREFIX) and not (self.base_model_uri or "").startswith("s3://"):
            raise ManifestError(f"base model {self.base_model}: an offline base needs its s3:// URI (base_model_uri)")

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9-]+", "-", self.model_name.lower()).strip("-")[:40] or "tuneship"

    @property
    def labels(self) -> dict[str, str]:
        return {"app.kubernetes.io/part-of": "tuneship", "tuneship/model": self.slug, "tuneship/version": self.version}

    @property
    def fetches(self) -> list[tuple[str, str]]:
        pulls = [(self.adapter_uri.rstrip("/") + "/", f"/models/{self.adapter_name}")]
        if self.base_model_uri:
            pulls.append((self.base_model_uri.rstrip("/") + "/", "/models/base"))
        return pulls

    @property
    def fetch_script(self) -> str:
        """The init step's shell command, every argument quoted."""
        return " && ".join(
            shlex.join(["aws", "s3", "cp", "--recursive", "--only-show-errors", src, dst]) for src, dst in self.fetches
        )

    @property
    def vllm_secret(self) -> str:
        """The secret holding ``VLLM_API_KEY``, read by vLLM and by the gateway (as ``TUNESHIP_VLLM_API_KEY``)."""
        return f"{self.slug}-vllm"

    @property
    def model_arg(self) -> str:
        return "/models/base" if self.base_model_uri else self.base_model.partition("@")[0]

    @property
    def revision_args(self) -> list[str]:
        """A hub base is served at the commit it was trained on (weights and tokenizer)."""
        _, _, commit = self.base_model.partition("@")
        return ["--revision", commit, "--tokenizer-revision", commit] if commit and not self.base_model_uri else []

    @property
    def vllm_args(self) -> list[str]:
        """Arguments of ``vllm serve`` (the templates set the command itself)."""
        return [
            self.model_arg,
            *self.revision_args,
            "--served-model-name",
            "base",
            "--host",
            "0.0.0.0",
            "--port",
            str(self.vllm_port),
            "--max-model-len",
            str(self.max_model_len),
            "--enable-lora",
            "--max-lora-rank",
            str(self.max_lora_rank),
            "--lora-modules",
            f"{self.adapter_name}=/models/{self.adapter_name}",
            *(["--tensor-parallel-size", str(self.tensor_parallel_size)] if self.tensor_parallel_size > 1 else []),
            *(["--stream-interval", str(self.stream_interval)] if self.stream_interval > 1 else []),
        ]

    @property
    def modal_gpu_spec(self) -> str:
        """Modal's ``gpu=``: the type, and the count when the base is split across several."""
        return f"{self.modal_gpu}:{self.gpus}" if self.gpus > 1 else self.modal_gpu

    @property
    def vllm_limits(self) -> dict[str, str]:
        return {"nvidia.com/gpu": str(self.gpus), "memory": "32Gi"} if self.gpus else {"memory": "32Gi"}

    def gateway_env(self, vllm_url: str) -> dict[str, str]:
        return {
            "TUNESHIP_VLLM_URL": vllm_url,
            # The rendered gateway serves this version under a fixed alias: it loads no adapters itself (vLLM's
            # init container fetched this one), so it does not follow the registry (docs/multi-adapter.md).
            "TUNESHIP_GATEWAY_REGISTRY": "false",
            "TUNESHIP_GATEWAY_ALIASES": json.dumps({"champion": self.adapter_name}),
            "TUNESHIP_GATEWAY_HOST": "0.0.0.0",
            "TUNESHIP_GATEWAY_PORT": str(self.gateway_port),
            "TUNESHIP_VLLM_KEEP_ALIVE_S": str(self.vllm_keep_alive_s),
        }


def render_all(spec: ManifestSpec, out_dir: Path) -> list[Path]:
    """Render every template for ``spec`` into ``out_dir``; return the written files."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for template, name in FILES.items():
        path = out_dir / name
        path.write_text(env.get_template(template).render(spec=spec))
        written.append(path)
    return written
