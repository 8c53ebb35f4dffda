"""Deploy stage: ship a registered model version to vLLM with a zero-downtime swap, or render manifests.

    dep = deploy("retail-sql", "champion", cfg.deploy, store=store, tracking_uri=uri,
                 vllm_url="http://127.0.0.1:8000", gateway_url="http://127.0.0.1:8080,http://127.0.0.1:8081")

The gateways follow the registry (``serving.catalog``): ``NAME@ALIAS`` routes where MLflow's alias points. The
swap, in order — any failure before step 4 unloads what it loaded and leaves the old model serving:

1. fetch the version's adapter from the artifact store (through its lineage tag), refusing bytes whose
   sha256 differs from the one the version was registered with;
2. load it into every vLLM replica under its served id, ``<model>-v<version>`` (runtime LoRA); ``vllm_url`` is
   one URL, a comma-separated list, or ``dns+http://SERVICE:PORT`` (every pod of a headless Service);
3. smoke-test it on every replica: greedy outputs on the first evaluation prompts must equal the outputs recorded
   in the eval report the version was registered with (same engine, same prompts, temperature 0; the report is
   verified by its sha256 tag) — this catches a wrong base, template or adapter. One replica failing aborts the
   deploy: the adapter is unloaded from every replica and the champion is untouched everywhere. If the
   registry's alias already named this version (a promotion), the alias goes back to what the gateways serve;
4. move the registry's alias to the version (compare-and-set), then have every gateway replica re-read the
   registry at once (``POST /admin/refresh``), so all of them route the alias to the new version;
5. wait until no gateway replica has requests on the old adapter, then unload it from every vLLM replica (and let
   the gateways see that).

The deployment is recorded on the model version (``tuneship.deployment`` tag) and returned as a ref.
Target ``local`` starts the vLLM server first (``start_local_server``); target ``manifests`` writes
docker-compose, Kubernetes and Modal files from ``infra/templates`` and starts nothing.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import httpx

from infra.artifacts import ArtifactError, ArtifactStore
from infra.errors import UserError
from infra.registry import (
    CHAMPION,
    EVAL_REPORT,
    RegistryError,
    alias_version,
    client,
    decoding_of,
    get_version,
    move_alias,
    restore_alias,
    retry,
    served_id,
    set_version_tags,
    version_artifact,
)
from infra.services import ServiceError
from infra.vllm_server import complete, load_lora_adapter, unload_lora_adapter, vllm_endpoints
from tasks.config import DeployConfig
from tasks.refs import Deployment, adapter_of


class DeployError(UserError, RuntimeError):
    """The deploy did not happen; the message says why and what still serves."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def smoke_examples(mv: Any, store: ArtifactStore, count: int) -> tuple[list[str], list[str], int]:
    """The first ``count`` evaluation prompts of version ``mv``, the outputs its evaluation recorded, and the
    ``max_new_tokens`` they were generated with — from the report the version was registered with, verified."""
    report = store.get_dir(version_artifact(mv, store, EVAL_REPORT))
    max_new_tokens = int(json.loads((report / "metrics.json").read_text()).get("max_new_tokens", 128))
    prompts, outputs = [], []
    with (report / "examples.jsonl").open() as fh:
        for line, _ in zip(fh, range(count), strict=False):
            row = json.loads(line)
            prompts.append(row["prompt"])
            outputs.append(row["candidate"]["output"])
    return prompts, outputs, max_new_tokens


class Gateway:
    """One gateway replica's admin API: read the routes, re-read the registry, wait for a target to drain."""

    def __init__(self, url: str, admin_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def _call(self, method: str, path: str) -> dict[str, Any]:
        try:
            response = self.client.request(method, path)
        except httpx.HTTPError as exc:
            raise DeployError(f"gateway {self.url} is unreachable ({exc.__class__.__name__})") from None
        if response.status_code != 200:
            raise DeployError(f"gateway {self.url} refused {path}: {response.status_code} {response.text}")
        return response.json()

    def routes(self) -> dict[str, Any]:
        return self._call("GET", "/admin/routes")

    def refresh(self) -> dict[str, Any]:
        """Re-read the registry now; the routes it gave."""
        return self._call("POST", "/admin/refresh")

    def wait_drained(self, target: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.routes()["in_flight"].get(target, 0):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True


def gateways(urls: str | None, admin_key: str | None) -> list[Gateway]:
    """The replicas named in ``urls`` (comma-separated)."""
    return [Gateway(url.strip(), admin_key) for url in (urls or "").split(",") if url.strip()]


def deploy(
    model_name: str,
    version: str,
    cfg: DeployConfig,
    *,
    store: ArtifactStore,
    tracking_uri: str,
    vllm_url: str,
    gateway_url: str | None = None,
    admin_key: str | None = None,
    vllm_key: str | None = None,
) -> Deployment:
    """Hot-swap ``model_name`` version ``version`` (a number or an alias) into every vLLM replica ``vllm_url`` names
    (``vllm_key``: their API key, when they have one) and every gateway in ``gateway_url`` (comma-separated)."""
    started = time.perf_counter()
    try:
        servers = vllm_endpoints(vllm_url)
    except ServiceError as exc:
        raise DeployError(f"{model_name} v{version} not deployed: {exc}") from None
    mv = get_version(model_name, version, tracking_uri=tracking_uri)
    number = str(mv.version)
    name = served_id(model_name, number)
    key = f"{model_name}@{cfg.alias}"
    replicas = gateways(gateway_url, admin_key)
    registry = client(tracking_uri)
    registered = alias_version(registry, model_name, cfg.alias)
    if replicas:
        previous = replicas[0].routes()["aliases"].get(key)
    else:
        previous = served_id(model_name, registered) if registered else None
    serving = f"{key} still serves {previous!r}" if replicas else "nothing was switched"

    loaded: list[str] = []
    try:
        adapter = adapter_of(mv, store)  # the bytes the version was registered with, or an error
        for server in servers:
            load_lora_adapter(server, name, store.get_dir(adapter.artifact), api_key=vllm_key)
            loaded.append(server)
    except (RegistryError, ArtifactError, ServiceError) as exc:
        if previous != name:
            for server in loaded:
                with contextlib.suppress(ServiceError, httpx.HTTPError):
                    unload_lora_adapter(server, name, api_key=vllm_key)
        raise DeployError(f"{model_name} v{number} not deployed: {exc}; {serving}") from None
    try:
        checked = 0
        for server in servers:  # every replica answers as the evaluation recorded, or none serves it
            checked = _smoke_test(mv, store, server, name, cfg.smoke_examples, vllm_key, several=len(servers) > 1)
        if registered != number:
            move_alias(registry, model_name, cfg.alias, number, expect=registered)
    except (DeployError, RegistryError, ArtifactError, ServiceError) as exc:
        reverted = ""
        if registered == number:  # a promotion named it already: the alias must not keep naming a failed version
            reverted = _revert(registry, model_name, cfg.alias, number, previous, exc)
            for replica in replicas:
                with contextlib.suppress(DeployError):
                    replica.refresh()
        if (previous != name or reverted) and replicas:  # its bytes failed somewhere: off every replica
            _retire(replicas, name, servers, cfg.drain_timeout_s, vllm_key, even_if_routed=True)
        elif previous != name:
            for server in servers:
                unload_lora_adapter(server, name, api_key=vllm_key)
        raise DeployError(f"{model_name} v{number} not deployed: {exc}; {serving}{reverted}") from None

    # The registry names the version: every replica re-reads it now (each would within its refresh interval).
    unreached = []
    for replica in replicas:
        try:
            routed = replica.refresh()["aliases"].get(key)
        except DeployError as exc:
            unreached.append(str(exc))
            continue
        if routed != name:
            unreached.append(f"gateway {replica.url} routes {key} to {routed!r}, not {name!r} (the registry moved?)")

    # Unload the adapter the alias served before, once idle on every replica — only one this model's deploys
    # loaded and no replica still routes to. A failure here (a replica or vLLM gone after the switch) leaves it
    # loaded, which is reported on the deployment, not as a failed deploy.
    ours = bool(previous) and previous != name and _version_of(model_name, previous) is not None
    cleanup = None
    if unreached:
        cleanup = f"switched, but {previous} was not unloaded: " + "; ".join(unreached)
    elif ours and replicas:
        cleanup = _retire(replicas, previous or "", servers, cfg.drain_timeout_s, vllm_key)
    dep = Deployment(
        model_name=model_name,
        version=number,
        target=cfg.target,
        adapter_name=name,
        vllm_url=vllm_url,
        gateway_url=gateway_url,
        alias=cfg.alias if replicas else None,
        previous=previous,
        deployed_at=_now(),
        swap_s=time.perf_counter() - started,
        smoke_checked=checked,
        cleanup=cleanup,
    )
    tags = {"tuneship.deployment": dep.model_dump_json(), "tuneship.deployed_at": dep.deployed_at}
    set_version_tags(model_name, number, tags, tracking_uri=tracking_uri)
    return dep


def _revert(registry: Any, model_name: str, alias: str, number: str, previous: str | None, why: Exception) -> str:
    """Move ``alias`` off version ``number``, which failed its deploy; returns what was done. Back to the version the
    gateways serve (``previous``) when that is another; a non-champion alias is removed otherwise. A champion the
    gateways already serve stays: a failed re-deploy changes nothing."""
    before = _version_of(model_name, previous)
    if before == number:
        before = None
    if before is None and alias == CHAMPION:
        return ""
    retry(registry.set_model_version_tag, model_name, number, "tuneship.deploy_failed", str(why)[:5000])
    if before is not None:
        restore_alias(registry, model_name, alias, before, failed=number)
        return f"; {model_name}@{alias} points back at v{before}"
    retry(registry.delete_registered_model_alias, model_name, alias)
    return f"; {model_name}@{alias} removed"


def _version_of(model_name: str, served: str | None) -> str | None:
    """The version number in served id ``served`` of ``model_name`` (None: another model's, or base)."""
    prefix = served_id(model_name, "")
    number = served[len(prefix) :] if served and served.startswith(prefix) else ""
    return number if number.isdigit() else None


def _retire(
    replicas: list[Gateway],
    previous: str,
    servers: list[str],
    timeout: float,
    key: str | None,
    *,
    even_if_routed: bool = False,
) -> str | None:
    """Unload ``previous`` from every vLLM replica once no gateway replica routes to it (unless ``even_if_routed``:
    a gateway loads a routed version again, sha256-checked, on its next request) or has requests on it; what was
    left undone, if anything."""
    try:
        if not even_if_routed and any(previous in replica.routes()["aliases"].values() for replica in replicas):
            return None  # another alias still serves it
        if not all(replica.wait_drained(previous, timeout) for replica in replicas):
            return f"{previous} still had requests after {timeout:g} s: left loaded"
        for server in servers:
            unload_lora_adapter(server, previous, api_key=key)
        for replica in replicas:
            replica.refresh()  # each replica's adapter cache sees it gone
    except (DeployError, ServiceError, httpx.HTTPError) as exc:
        return f"switched, but {previous} was not unloaded: {exc}"
    return None


def _smoke_test(
    mv: Any, store: ArtifactStore, vllm_url: str, name: str, count: int, key: str | None, *, several: bool = False
) -> int:
    if count == 0:
        return 0
    prompts, expected, max_new_tokens = smoke_examples(mv, store, count)
    # Under the grammar the version was evaluated (and is served by the gateway) under, if any.
    got = complete(vllm_url, name, prompts, max_tokens=max_new_tokens, api_key=key, extra=decoding_of(mv))
    where = f" on vLLM replica {vllm_url}" if several else ""
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        if want != have:
            raise DeployError(
                f"smoke test failed{where} on evaluation prompt {i}: served output {have[:120]!r} differs from the "
                f"evaluated output {want[:120]!r} (wrong base model, template or adapter?)"
            )
    return len(prompts)


def render_manifests(
    model_name: str,
    version: str,
    cfg: DeployConfig,
    *,
    store: ArtifactStore,
    tracking_uri: str,
    out_dir: Path | None = None,
) -> Deployment:
    """Write docker-compose, Kubernetes and Modal files that serve this version; start nothing."""
    from infra.manifests import ManifestSpec, render_all
    from tasks.base_model import stored_base_uri

    mv = get_version(model_name, version, tracking_uri=tracking_uri)
    number = str(mv.version)
    adapter = adapter_of(mv, store)
    base = mv.tags.get("tuneship.base_model", "")
    spec = ManifestSpec(
        model_name=model_name,
        version=number,
        adapter_name=served_id(model_name, number),
        adapter_uri=adapter.artifact.uri,
        base_model=base,
        base_model_uri=stored_base_uri(base, store),
        vllm_image=cfg.vllm_image,
        gateway_image=cfg.gateway_image,
        gpus=cfg.gpus,
        tensor_parallel_size=cfg.tensor_parallel_size or max(cfg.gpus, 1),
        max_lora_rank=adapter.rank,
        stream_interval=cfg.stream_interval,
    )
    files = render_all(spec, out_dir or Path(cfg.manifests_dir))
    dep = Deployment(
        model_name=model_name,
        version=number,
        target="manifests",
        adapter_name=spec.adapter_name,
        deployed_at=_now(),
        manifests=[str(f) for f in files],
    )
    set_version_tags(model_name, number, {"tuneship.manifests": dep.model_dump_json()}, tracking_uri=tracking_uri)
    return dep
