"""What every route of the gateway shares: its configuration, its state, and one way to take a slot upstream.

A :class:`Gateway` lives on ``app.state.gateway`` (built by :func:`serving.app.create_app`); routes reach it with
the ``GatewayDep`` dependency. Each refusal is a :class:`GatewayError` (status, message, headers) counted in the
metrics once, where it is raised; the app answers it in the route's error shape (``serving.contract``).
``Gateway.slot`` is the one place that admits a request upstream and maps the upstream's failures: too many
requests → 429, a request the engine refuses (its 4xx) → 422, its 5xx or no answer → 503.

Keys: API keys guard the generating routes, each key (or, on an open loopback gateway, each client address)
with its own token bucket when ``key_rate`` is set; a key listed in ``key_models`` may call only those models
(403 for another), every other key any model. The admin routes need admin keys and are closed when none are
configured, unless ``local_admin`` opens them to loopback clients.

Models: with a :class:`~serving.catalog.RegistrySource` the gateway follows the MLflow registry (names as in
``serving.catalog``; :meth:`Gateway.refresh` re-reads it, periodically and when a deploy asks) and loads each
version's adapter into vLLM on its first request (``serving.adapters``). Without one, it routes a fixed alias
map to models vLLM serves.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import time
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from infra.registry import SQL_SCHEMA_TAG, served_id
from infra.segments import new_request_id
from infra.sql_grammar import SchemaGrammarError, tagged_decoding
from serving.adapters import AdapterCache, AdapterLoadError
from serving.catalog import Catalog, Name, RegistrySource
from serving.metrics import GatewayMetrics
from serving.request_log import RequestLog
from serving.routes import RouteTable
from serving.upstream import Upstream, UpstreamError

log = logging.getLogger("tuneship.gateway")


class GatewayConfig(BaseModel):
    """What the gateway enforces. Built from environment settings at the edge (``tuneship serve``)."""

    model_config = ConfigDict(frozen=True)

    api_keys: list[str] = Field(default_factory=list, description="Bearer keys; empty: open (loopback only).")
    admin_keys: list[str] = Field(default_factory=list, description="Keys for /admin; empty: /admin is closed.")
    local_admin: bool = Field(default=False, description="with no admin keys, open /admin to loopback clients")
    key_rate: float = Field(default=0.0, ge=0, description="requests/s per key (token bucket); 0: no limit")
    key_burst: int = Field(default=32, ge=1, description="token bucket size per key")
    key_models: dict[str, list[str]] = Field(
        default_factory=dict, description="API key → the models it may call (registered names, 'base'); others: all"
    )
    aliases: dict[str, str] = Field(default_factory=dict, description="alias (champion, challenger) → served model")
    default_model: str | None = Field(default=None, description="registered model that bare champion/challenger name")
    max_adapters: int = Field(default=8, ge=1, description="adapters kept loaded in vLLM (pinned champions count)")
    registry_refresh_s: float = Field(default=15.0, gt=0, description="how often the registry is re-read")
    canary_share: float = Field(default=0.0, ge=0, le=1, description="share of champion traffic sent to challenger")
    max_prompt_chars: int = Field(default=8000, gt=0, description="per prompt; for chat, all messages together")
    max_tokens_cap: int = Field(default=512, gt=0)
    default_max_tokens: int = Field(default=128, gt=0, description="when a request gives no max_tokens")
    max_n: int = Field(default=4, ge=1, description="completions per prompt (OpenAI's n)")
    max_batch: int = Field(default=64, gt=0, description="prompts in /generate/batch or a list prompt")
    max_body_bytes: int = Field(default=1 << 20, gt=0, description="request body size limit (413 beyond)")
    max_in_flight: int = 64
    max_queue: int = 256
    batch_concurrency: int = 16
    direct_relay: bool = Field(default=True, description="streamed OpenAI answers written to the client's socket")
    fast_lane: bool = Field(default=True, description="the generating routes served without FastAPI's machinery")

    @model_validator(mode="after")
    def _tenant_keys_are_keys(self) -> GatewayConfig:
        """A key given only in ``key_models`` is an API key as well."""
        extra = [key for key in self.key_models if key not in self.api_keys]
        if extra:
            object.__setattr__(self, "api_keys", [*self.api_keys, *extra])
        return self


class GatewayError(Exception):
    """A request the gateway refuses or cannot serve: answered with ``status`` in the route's error shape."""

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.param = status, message, headers, param


class KeyBuckets:
    """A token bucket per key: ``rate`` requests/s on average, bursts of up to ``burst``."""

    MAX_KEYS = 100_000  # an open gateway keys by client address; forget idle ones beyond this

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, when)

    def take(self, key: str) -> float:
        """Take a token; returns 0, or the seconds until one is there (nothing taken)."""
        now = time.monotonic()
        tokens, when = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        if tokens < 1:
            self.buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        if len(self.buckets) >= self.MAX_KEYS and key not in self.buckets:
            self.buckets.clear()
        self.buckets[key] = (tokens - 1, now)
        return 0.0


def is_loopback(host: str | None, *, names: bool = True) -> bool:
    """A loopback address (or, with ``names``, ``localhost``: for where to listen, never for who is calling)."""
    if names and host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class Limiter:
    """At most ``max_in_flight`` requests upstream and ``max_queue`` waiting; beyond that, refuse at once."""

    def __init__(self, max_in_flight: int, max_queue: int, metrics: GatewayMetrics) -> None:
        self.slots = asyncio.Semaphore(max_in_flight)
        self.capacity = max_in_flight + max_queue
        self.admitted = 0
        self.metrics = metrics

    @property
    def full(self) -> bool:
        return self.admitted >= self.capacity

    async def acquire(self) -> bool:
        """Wait for a slot and take it; False at once (nothing taken) when the queue is full. Cancelled while
        waiting, it takes nothing."""
        if self.full:
            return False
        self.admitted += 1
        self.metrics.queue_depth.inc()
        try:
            await self.slots.acquire()
        except BaseException:
            self.admitted -= 1
            raise
        finally:
            self.metrics.queue_depth.dec()
        self.metrics.in_flight.inc()
        return True

    def release(self) -> None:
        self.metrics.in_flight.dec()
        self.slots.release()
        self.admitted -= 1


class Slot:
    """``async with gateway.slot(model)``: a slot upstream held for ``model`` (counted in the route table's in-flight
    counts, so a deploy can drain it), the upstream's failures mapped to :class:`GatewayError`. One plain class,
    not nested generator-based context managers: it is entered once per request."""

    __slots__ = ("gateway", "model")

    def __init__(self, gateway: Gateway, model: str) -> None:
        self.gateway, self.model = gateway, model

    async def __aenter__(self) -> None:
        gateway = self.gateway
        if not await gateway.limiter.acquire():
            raise gateway.overloaded()
        gateway.routes.enter(self.model)

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        gateway = self.gateway
        gateway.routes.leave(self.model)
        gateway.limiter.release()
        if isinstance(exc, UpstreamError):
            raise gateway.upstream_failed(exc) from None


class Gateway:
    """The gateway's state and the checks every route applies: keys, model names, limits, slots."""

    def __init__(
        self,
        config: GatewayConfig,
        upstream: Upstream,
        request_log: RequestLog | None = None,
        registry: RegistrySource | None = None,
    ) -> None:
        self.config = config
        self.upstream = upstream
        self.metrics = GatewayMetrics()
        self.log = request_log
        if request_log is not None:
            request_log.metrics = self.metrics
        self.limiter = Limiter(config.max_in_flight, config.max_queue, self.metrics)
        # Following a registry, ``base`` is always the model vLLM serves as ``base`` (unless the aliases say otherwise).
        aliases = {"base": "base", **config.aliases} if registry is not None else config.aliases
        self.routes = RouteTable(aliases, canary_share=config.canary_share)
        self.metrics.track_routes(self.routes)
        self.buckets = KeyBuckets(config.key_rate, config.key_burst) if config.key_rate else None
        self.registry = registry
        self.catalog: Catalog | None = None  # None until the registry is first read (or without a registry)
        self.adapters: AdapterCache | None = None
        if registry is not None:
            self.adapters = AdapterCache(
                upstream,
                registry.fetch,
                capacity=config.max_adapters,
                metrics=self.metrics,
                in_flight=self.routes.in_flight,
            )
        self._refreshing: asyncio.Lock | None = None

    def refuse(
        self, status: int, message: str, headers: dict[str, str] | None = None, *, param: str | None = None
    ) -> GatewayError:
        """Count a refusal and return it, to raise."""
        self.metrics.errors.labels(status=str(status)).inc()
        return GatewayError(status, message, headers, param)

    def overloaded(self) -> GatewayError:
        return self.refuse(429, "overloaded: too many requests in flight", {"Retry-After": "1"})

    def upstream_failed(self, exc: UpstreamError) -> GatewayError:
        if exc.status < 500:
            return self.refuse(422, f"the engine refused the request: {exc}")
        return self.refuse(503, str(exc))

    @staticmethod
    def bearer(request: Request) -> str:
        header = request.headers.get("authorization", "")
        return header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""

    def check_key(self, request: Request, keys: list[str]) -> str:
        """The caller's key, if it is one of ``keys``; 401 otherwise."""
        token = self.bearer(request).encode()
        # Compare against every key, in constant time, so timing tells nothing about which prefix matched.
        matches = [hmac.compare_digest(token, key.encode()) for key in keys]
        if not any(matches):
            raise self.refuse(401, "missing or invalid API key", {"WWW-Authenticate": "Bearer"})
        return keys[matches.index(True)]

    def check_model(self, request: Request, model: str) -> None:
        """403 unless the caller's key may call ``model`` (a registered name, or a static alias such as base)."""
        allowed = getattr(request.state, "models", None)
        if allowed is not None and model not in allowed:
            raise self.refuse(403, f"this API key may not call {model[:128]!r}", param="model")

    def callable_models(self, request: Request) -> list[str]:
        """The names ``/v1/models`` lists for this caller: base, then each registered model it may call with its
        aliases and versions (with a registry), or the static aliases and what vLLM serves (without)."""
        allowed = getattr(request.state, "models", None)
        names: list[str] = [a for a in self.routes.aliases if "@" not in a]
        if self.catalog is not None:
            for model in sorted(self.catalog.models):
                aliases = sorted(self.catalog.aliases.get(model, {}))
                numbers = sorted((v.version for v in self.catalog.versions.values() if v.name == model), key=int)
                names += [model, *(f"{model}@{a}" for a in aliases), *(f"{model}/{n}" for n in numbers)]
        return [n for n in names if allowed is None or Name.parse(n).model in allowed or n in allowed]

    def check_rate(self, request: Request) -> None:
        if self.buckets is None:
            return
        key = self.bearer(request) if self.config.api_keys else (request.client.host if request.client else "-")
        if wait := self.buckets.take(key):
            message = f"over this key's rate of {self.config.key_rate:g} requests/s"
            raise self.refuse(429, message, {"Retry-After": str(math.ceil(wait))})

    def check_admin(self, request: Request) -> None:
        caller = request.client.host if request.client else None
        if self.config.admin_keys:
            self.check_key(request, self.config.admin_keys)
        elif not (self.config.local_admin and is_loopback(caller, names=False)):
            raise self.refuse(403, "admin routes are closed: no admin keys are configured (TUNESHIP_ADMIN_KEYS)")

    def check_prompts(self, prompts: list[str], *, param: str = "prompt") -> None:
        limit = self.config.max_prompt_chars
        if len(prompts) > self.config.max_batch:
            raise self.refuse(422, f"{len(prompts)} prompts; the limit is {self.config.max_batch}", param=param)
        for prompt in prompts:
            if len(prompt) > limit:
                raise self.refuse(422, f"prompt is {len(prompt)} characters; the limit is {limit}", param=param)

    def max_tokens(self, asked: int | None, *, n: int = 1) -> int:
        """The request's ``max_tokens`` (the configured default when absent), refused over the caps."""
        if n > self.config.max_n:
            raise self.refuse(422, f"n {n} is over the cap of {self.config.max_n}", param="n")
        if asked is None:
            return min(self.config.default_max_tokens, self.config.max_tokens_cap)
        if asked > self.config.max_tokens_cap:
            cap = self.config.max_tokens_cap
            raise self.refuse(422, f"max_tokens {asked} is over the cap of {cap}", param="max_tokens")
        return asked

    async def upstream_models(self) -> set[str]:
        try:
            return {m["id"] for m in await self.upstream.models()}
        except UpstreamError as exc:
            raise self.upstream_failed(exc) from None

    async def served(self, request: Request, name: str) -> str:
        """The upstream model behind the request's ``model``, loaded; 403 if the caller's key may not call it."""
        if self.registry is None or ("@" not in name and "/" not in name and name in self.routes.aliases):
            return await self._served_static(request, name)  # fixed aliases (base) come first
        if self.catalog is None:
            raise self.refuse(503, "the model registry has not been read yet; try again shortly", {"Retry-After": "5"})
        catalog = self.catalog
        parsed = Name.parse(name, self.config.default_model).routed(catalog)
        self.check_model(request, parsed.model or name)
        if parsed.version is not None:
            target: str | None = served_id(parsed.model or "", parsed.version)
        else:
            target = self.routes.resolve(parsed.key or "")
        version = catalog.versions.get(target or "")
        if version is None:
            if target is not None and parsed.model is None:
                return target  # a static alias: base
            hint = "base, NAME, NAME@ALIAS or NAME/VERSION of a registered model"
            raise self.refuse(422, f"unknown model {name[:256]!r}: use {hint} (GET /v1/models)", param="model")
        if self.adapters is not None:
            try:
                await self.adapters.ensure(version)
            except AdapterLoadError as exc:
                raise self.refuse(503, str(exc)) from None
        return version.served

    def decoding(self, served: str) -> dict[str, Any]:
        """Upstream request fields the served model is answered under: a version registered with a schema
        (evaluate.decoding: sql_schema) is served under the grammar it was evaluated under, whatever the route."""
        version = self.catalog.versions.get(served) if self.catalog is not None else None
        if version is None:
            return {}
        try:
            return tagged_decoding(version.tags.get(SQL_SCHEMA_TAG))
        except SchemaGrammarError as exc:
            why = f"{version.name} v{version.version}: its {SQL_SCHEMA_TAG} tag is unusable: {exc}"
            raise self.refuse(503, why) from None

    async def _served_static(self, request: Request, name: str) -> str:
        """Without a registry: an alias from the route table, or a model vLLM serves."""
        self.check_model(request, name)
        target = self.routes.resolve(name)
        if target is not None:
            return target
        known = await self.upstream_models()
        if name in known:
            return name
        choices = sorted(set(self.routes.aliases) | known)
        raise self.refuse(422, f"unknown model {name[:256]!r}: use one of {choices}", param="model")

    async def refresh(self) -> Catalog:
        """Re-read the registry and make the route table its cache: every ``NAME@ALIAS`` points where MLflow's
        alias does, champions are pinned and loaded, and the adapter cache matches what vLLM holds."""
        if self.registry is None or self.adapters is None:
            raise self.refuse(409, "this gateway follows no registry: its routes are static")
        self._refreshing = self._refreshing or asyncio.Lock()
        async with self._refreshing:
            catalog = await asyncio.to_thread(self.registry.read)
            try:
                await self.adapters.sync(set(catalog.versions))
            except UpstreamError as exc:
                raise self.upstream_failed(exc) from None
            fixed = {k: v for k, v in self.routes.aliases.items() if "@" not in k}
            self.routes.replace({**fixed, **catalog.routes()})
            self.adapters.pinned = catalog.pinned()
            self.catalog = catalog
        for served in sorted(self.adapters.pinned):
            try:
                await self.adapters.ensure(catalog.versions[served])
            except AdapterLoadError as exc:  # reported; requests for it get the same error as a 503
                log.warning("champion not loaded: %s", exc)
        return catalog

    async def follow_registry(self) -> None:
        """Re-read the registry every ``registry_refresh_s`` until cancelled; a failed read keeps the last routes."""
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - a registry or vLLM outage must not stop this
                log.warning("registry refresh failed, keeping the last routes: %s", exc)
            await asyncio.sleep(self.config.registry_refresh_s)

    def request_id(self, request: Request, served: str, request_id: str | None = None) -> str:
        """A new request id (or ``request_id``), remembered with its caller and model for feedback checks."""
        request_id = request_id or new_request_id()
        if self.log is not None:
            self.log.issued(request_id, self.log.key_id(self.bearer(request)), served)
        return request_id

    def record(self, request: Request, request_id: str, alias: str, served: str, seconds: float, **item: Any) -> None:
        """Queue the request log's record of one exchange (raw: the log's writer thread reads and scrubs it)."""
        if self.log is not None:
            key_id = self.log.key_id(self.bearer(request))
            self.log.completed(
                request_id=request_id,
                key_id=key_id,
                route=request.url.path,
                alias=alias,
                served=served,
                latency_s=seconds,
                **item,
            )

    def admit(self) -> None:
        """Refuse a stream before it starts when the queue is full, so the client gets a 429, not an SSE error."""
        if self.limiter.full:
            raise self.overloaded()

    def slot(self, model: str) -> Slot:
        """Hold a slot upstream for ``model`` (counted for draining); failures become :class:`GatewayError`."""
        return Slot(self, model)


# Dependencies are coroutines: FastAPI runs a plain function in a worker thread, per request.
async def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def require_api_key(request: Request) -> None:
    """The request's key, when keys are configured, and its rate (it takes only the request: the OpenAI routes'
    fast lane runs it as it is, ``serving.lane``)."""
    gateway: Gateway = request.app.state.gateway
    if gateway.config.api_keys:
        key = gateway.check_key(request, gateway.config.api_keys)
        if (models := gateway.config.key_models.get(key)) is not None:
            request.state.models = frozenset(models)
    gateway.check_rate(request)


async def require_admin_key(request: Request, gateway: GatewayDep) -> None:
    gateway.check_admin(request)
