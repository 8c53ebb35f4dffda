"""``tuneship serve``: the gateway (and a local vLLM server when ``TUNESHIP_VLLM_URL=local``) for the champion.

    with serving_stack(settings, "retail-sql") as stack:      # vLLM up, gateway up, champion deployed
        print(stack.gateway_url)

The champion (and the challenger, when there is one) go in through the same zero-downtime deploy a later
``tuneship deploy`` uses, so a server started here can be hot-swapped without a restart.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from infra.artifacts import ArtifactStore, open_store
from infra.errors import UserError
from infra.registry import RegistryError, get_version
from infra.services import ManagedProcess, free_port
from infra.settings import Settings
from infra.vllm_server import VllmLaunch, start_vllm
from serving.app import GatewayConfig, create_app
from serving.catalog import RegistrySource
from serving.request_log import RequestLog, RequestLogConfig
from serving.server import check_exposure, serve_in_thread
from serving.tenants import load_key_models
from serving.upstream import VllmUpstream
from tasks.base_model import resolve_base_model
from tasks.config import DeployConfig
from tasks.deploy import DeployError, Gateway, deploy
from tasks.refs import Deployment


@dataclass
class ServingStack:
    vllm_url: str
    gateway_url: str
    deployments: list[Deployment] = field(default_factory=list)


def start_gateway_process(
    workdir: Path, *, vllm_url: str, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[ManagedProcess, str]:
    """`tuneship serve --no-deploy` as its own process group (own GIL), healthy; returns it and its URL."""
    port = free_port()
    values = {
        "TUNESHIP_VLLM_URL": vllm_url,
        "TUNESHIP_GATEWAY_PORT": str(port),
        "TUNESHIP_HOME": str(workdir),
        **(env or {}),
    }
    server = ManagedProcess(
        name="gateway",
        argv=[sys.executable, "-m", "flows.cli", "serve", "--no-deploy"],
        health_url=f"http://127.0.0.1:{port}/health",
        log_path=workdir / f"gateway-{port}.log",
        env=values,
        cwd=Path(__file__).resolve().parents[1],
    )
    return server.start(timeout), f"http://127.0.0.1:{port}"


def _secret_list(keys: list) -> list[str]:
    return [k.get_secret_value() for k in keys]


@contextlib.contextmanager
def local_vllm(settings: Settings, base_path: Path, *, served_name: str = "base") -> Iterator[str]:
    """A vLLM server from the vLLM venv serving ``base_path`` (runtime LoRA on), or the configured URL."""
    if settings.vllm_url != "local":
        yield settings.vllm_url
        return
    launch = VllmLaunch(
        model=base_path,
        served_model_name=served_name,
        device=settings.vllm_device,
        api_key=settings.vllm_key,
        max_loras=settings.vllm_max_loras,
        max_cpu_loras=settings.vllm_max_cpu_loras,
        stream_interval=settings.vllm_stream_interval,
        keep_alive_s=settings.vllm_keep_alive_s,
    )
    workdir = settings.home / "services"
    python, uds = settings.vllm_python, settings.vllm_uds
    with start_vllm(launch, python=python, workdir=workdir, uds=uds, stop_with_parent=True) as server:
        yield server.base_url


def upstream(settings: Settings, vllm_url: str) -> VllmUpstream:
    """The gateway's client for the vLLM server at ``vllm_url`` (with its API key, when it has one). A gateway
    fronts one vLLM (its pod's, or a Service's); a list of replicas is for deploys, which load into each."""
    if "," in vllm_url or vllm_url.startswith("dns+"):
        raise UserError(
            f"TUNESHIP_VLLM_URL={vllm_url!r}: a gateway fronts one vLLM endpoint (a replica, or a Service in front of "
            "them); lists and dns+ names are for the deploy stage"
        )
    return VllmUpstream(vllm_url, api_key=settings.vllm_key, keep_alive_s=settings.vllm_keep_alive_s)


def request_log(settings: Settings, store: ArtifactStore) -> RequestLog | None:
    """The gateway's request log into ``store`` (None when ``TUNESHIP_REQUEST_LOG=off``)."""
    if settings.request_log == "off":
        return None
    config = RequestLogConfig(
        mode=settings.request_log,
        flush_records=settings.request_log_flush_records,
        flush_interval_s=settings.request_log_flush_s,
        max_pending=settings.request_log_max_pending,
        pii_patterns=settings.pii_patterns,
        pii_regions=settings.pii_phone_regions,
    )
    return RequestLog(store, config)


def registry_source(settings: Settings, store: ArtifactStore, model_name: str | None) -> RegistrySource | None:
    """What the gateway follows (``TUNESHIP_GATEWAY_REGISTRY``): the registry, routing only versions trained on the
    base of ``model_name``'s champion (the base vLLM serves), read with the registry in the background."""
    if not settings.gateway_registry:
        return None
    return RegistrySource(settings.mlflow_tracking_uri, store, base_from=model_name)


def gateway_config(settings: Settings, **overrides: object) -> GatewayConfig:
    values = {
        "api_keys": _secret_list(settings.api_keys),
        "key_models": load_key_models(settings.api_keys_file) if settings.api_keys_file else {},
        "max_adapters": settings.gateway_max_adapters,
        "registry_refresh_s": settings.gateway_registry_refresh_s,
        "admin_keys": _secret_list(settings.admin_keys),
        "aliases": {"base": "base", **settings.gateway_aliases},
        "canary_share": settings.canary_share,
        "max_in_flight": settings.gateway_max_in_flight,
        "max_queue": settings.gateway_max_queue,
        "local_admin": settings.gateway_local_admin,
        "key_rate": settings.gateway_key_rate,
        "key_burst": settings.gateway_key_burst,
        "direct_relay": settings.gateway_direct_relay,
        "fast_lane": settings.gateway_fast_lane,
    }
    return GatewayConfig(**{**values, **overrides})


@contextlib.contextmanager
def serving_stack(
    settings: Settings,
    model_name: str,
    *,
    store: ArtifactStore | None = None,
    port: int | None = None,
    aliases: tuple[str, ...] = ("champion", "challenger"),
    say: Callable[[str], None] = print,
) -> Iterator[ServingStack]:
    """vLLM + gateway, with each of ``aliases`` that the registry has deployed into them."""
    store = store or open_store(settings)
    uri = settings.mlflow_tracking_uri
    champion = get_version(model_name, "champion", tracking_uri=uri)
    base = resolve_base_model(
        champion.tags.get("tuneship.base_model", ""), store=store, cache_dir=settings.cache_dir, log=say
    )
    admin_key = settings.admin_key
    if admin_key is None:  # /admin stays closed to others; this process deploys with a key of its own
        admin_key = secrets.token_urlsafe(24)
        say("admin routes: no TUNESHIP_ADMIN_KEYS, so only this process can switch aliases")
    config = gateway_config(
        settings, admin_keys=_secret_list(settings.admin_keys) or [admin_key], default_model=model_name
    )
    check_exposure(config, settings.gateway_host)  # before a vLLM server is started for nothing
    with local_vllm(settings, Path(base.path)) as vllm_url:
        say(f"vLLM: {vllm_url} serving {base.id}")
        registry = registry_source(settings, store, model_name)
        app = create_app(config, upstream(settings, vllm_url), request_log(settings, store), registry)
        gw_port = port if port is not None else settings.gateway_port
        grace = settings.gateway_shutdown_grace_s
        keep_alive = settings.gateway_keep_alive_s
        with serve_in_thread(
            app, host=settings.gateway_host, port=gw_port, grace_s=grace, keep_alive_s=keep_alive
        ) as gateway_url:
            local_url = gateway_url.replace("0.0.0.0", "127.0.0.1")
            stack = ServingStack(vllm_url=vllm_url, gateway_url=local_url)
            # The gateway reads the registry once before anything is deployed into it (the champion loads).
            Gateway(local_url, admin_key).refresh()
            for alias in aliases:
                try:
                    get_version(model_name, alias, tracking_uri=uri)
                except RegistryError:
                    continue
                try:
                    dep = deploy(
                        model_name,
                        alias,
                        DeployConfig(alias=alias),
                        store=store,
                        tracking_uri=uri,
                        vllm_url=vllm_url,
                        gateway_url=local_url,
                        admin_key=admin_key,
                        vllm_key=settings.vllm_key,
                    )
                except DeployError as exc:
                    if alias == "champion":
                        raise
                    say(f"not serving {alias}: {exc}")  # the champion serves on; a broken challenger stays out
                    continue
                say(f"deployed {model_name} v{dep.version} as {alias} ({dep.adapter_name}, {dep.swap_s:.1f} s)")
                stack.deployments.append(dep)
            yield stack
