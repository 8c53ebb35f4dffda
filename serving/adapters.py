"""The adapters one gateway keeps in vLLM: champions pinned, every other version loaded on its first request, the
least recently used unpinned one unloaded when the cap is reached.

    cache = AdapterCache(upstream, fetch, capacity=8, metrics=metrics, in_flight=routes.in_flight)
    await cache.ensure(version)     # loaded already: a dict lookup; else one load, shared by concurrent callers

A load fetches the version's adapter from the artifact store (``fetch``: the bytes the version was registered
with, every file's sha256 checked) and asks vLLM to load it under the version's served id. Concurrent first
requests for one adapter wait on the same load. Eviction skips pinned adapters and any that this replica still
has requests on; when nothing can go, the cache runs over its cap rather than fail a request.

``capacity`` counts loaded adapters, pinned ones included. Keep it at or under vLLM's ``--max-cpu-loras`` (the
adapters vLLM keeps in host memory); ``--max-loras`` is how many of them one batch can mix (GPU memory).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from pathlib import Path

from serving.catalog import Version
from serving.metrics import GatewayMetrics
from serving.upstream import Upstream


class AdapterLoadError(Exception):
    """An adapter could not be fetched, verified or loaded; the message says which and why."""


class AdapterCache:
    def __init__(
        self,
        upstream: Upstream,
        fetch: Callable[[Version], Path],
        *,
        capacity: int,
        metrics: GatewayMetrics,
        in_flight: collections.Counter[str],
    ) -> None:
        self.upstream, self.fetch, self.capacity = upstream, fetch, capacity
        self.metrics, self.in_flight = metrics, in_flight
        self.loaded: collections.OrderedDict[str, None] = collections.OrderedDict()  # served id, least recent first
        self.pinned: set[str] = set()
        self.loading: dict[str, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()  # one load or unload at a time: the cap holds
        metrics.adapters_loaded.set_function(lambda: len(self.loaded))

    async def ensure(self, version: Version) -> None:
        """Return once ``version``'s adapter is loaded in vLLM; raise :class:`AdapterLoadError` if it cannot be."""
        served = version.served
        if served in self.loaded:
            self.loaded.move_to_end(served)
            return
        load = self.loading.get(served)
        if load is None:
            load = self.loading[served] = asyncio.ensure_future(self._load(version))
            load.add_done_callback(lambda _: self.loading.pop(served, None))
        await asyncio.shield(load)  # a caller that goes away does not cancel the load the others wait for

    async def _load(self, version: Version) -> None:
        started = time.perf_counter()
        served = version.served
        try:
            path = await asyncio.to_thread(self.fetch, version)
        except Exception as exc:  # noqa: BLE001 - any fetch failure (missing, altered, store down) refuses the load
            raise AdapterLoadError(f"{version.name}/{version.version}: adapter not fetched: {exc}") from None
        async with self._lock:
            if served not in self.loaded:
                await self._make_room()
                try:
                    await self.upstream.load_adapter(served, path)
                except Exception as exc:  # noqa: BLE001
                    raise AdapterLoadError(f"{version.name}/{version.version}: vLLM did not load it: {exc}") from None
                self.loaded[served] = None
        self.metrics.adapter_loads.inc()
        self.metrics.adapter_cold_load.observe(time.perf_counter() - started)

    async def _make_room(self) -> None:
        while len(self.loaded) >= self.capacity:
            idle = [s for s in self.loaded if s not in self.pinned and not self.in_flight.get(s)]
            if not idle:
                return  # every loaded adapter is pinned or busy: run over the cap rather than fail
            victim = idle[0]
            await self.upstream.unload_adapter(victim)
            del self.loaded[victim]
            self.metrics.adapter_evictions.inc()

    async def sync(self, servable: set[str]) -> None:
        """Match what vLLM reports loaded: adapters loaded by a deploy join (least recent), unloaded ones leave.
        Under the load lock, so no load or eviction of this cache falls between the list and its use."""
        async with self._lock:
            upstream_models = {m["id"] for m in await self.upstream.models()}
            self._reconcile(upstream_models, servable)

    def _reconcile(self, upstream_models: set[str], servable: set[str]) -> None:
        for served in [s for s in self.loaded if s not in upstream_models]:
            del self.loaded[served]
        for served in sorted(upstream_models & servable - set(self.loaded)):
            self.loaded[served] = None
            self.loaded.move_to_end(served, last=False)
