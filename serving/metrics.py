"""Prometheus metrics of one gateway app (its own registry: no module-level singletons).

GPU utilisation and memory come from NVML (``nvidia-ml-py``) when a GPU and its driver are present; on a
machine without one those series are simply absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from serving.routes import RouteTable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GpuCollector(Collector):
    """``tuneship_gpu_utilization_ratio`` and ``tuneship_gpu_memory_{used,total}_bytes`` per GPU, via NVML."""

    def __init__(self) -> None:
        import pynvml

        try:
            pynvml.nvmlInit()
            self.nvml: Any = pynvml
            self.count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError:  # no driver, no GPU: no GPU series
            self.nvml, self.count = None, 0

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("tuneship_gpu_utilization_ratio", "GPU busy share (NVML).", labels=["gpu"]),
            GaugeMetricFamily("tuneship_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=["gpu"]),
            GaugeMetricFamily("tuneship_gpu_memory_total_bytes", "GPU memory (NVML).", labels=["gpu"]),
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The series this collector exports when a GPU is present (on any machine)."""
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not self.count:
            return
        util, used, total = self._families()
        for index in range(self.count):
            handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
            rates, memory = self.nvml.nvmlDeviceGetUtilizationRates(handle), self.nvml.nvmlDeviceGetMemoryInfo(handle)
            util.add_metric([str(index)], rates.gpu / 100)
            used.add_metric([str(index)], memory.used)
            total.add_metric([str(index)], memory.total)
        yield from (util, used, total)


class RouteCollector(Collector):
    """``tuneship_route_info{alias,target}`` = 1 for the live alias map, and the canary share."""

    def __init__(self, routes: RouteTable) -> None:
        self.routes = routes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "tuneship_route_info", "Which served model each alias points at.", labels=["alias", "target"]
        )
        for alias, target in self.routes.aliases.items():
            info.add_metric([alias, target], 1)
        yield info
        yield GaugeMetricFamily(
            "tuneship_canary_share", "Share of champion traffic sent to the challenger.", value=self.routes.canary_share
        )
        yield GaugeMetricFamily("tuneship_route_switches", "Alias switches since start.", value=self.routes.switches)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process memory and CPU
        self.registry.register(GpuCollector())
        self.latency = Histogram(
            "tuneship_request_latency_seconds",
            "End-to-end request latency.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "tuneship_time_to_first_token_seconds",
            "Time to the first streamed token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.output_tokens = Counter("tuneship_output_tokens", "Generated tokens.", ["model"], registry=self.registry)
        self.tokens_per_s = Histogram(
            "tuneship_tokens_per_second",
            "Generated tokens per second per request.",
            ["model"],
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
            registry=self.registry,
        )
        self.in_flight = Gauge("tuneship_requests_in_flight", "Requests being served upstream.", registry=self.registry)
        self.streams = Counter(
            "tuneship_streams",
            "Streamed OpenAI answers by relay: direct (the engine's events written to the client's socket, "
            "serving.relay) or general.",
            ["relay"],
            registry=self.registry,
        )
        self.slow_client_waits = Counter(
            "tuneship_slow_client_waits",
            "Times a directly relayed stream stopped reading from the engine until a slow client caught up.",
            registry=self.registry,
        )
        self.queue_depth = Gauge("tuneship_queue_depth", "Requests waiting for a slot.", registry=self.registry)
        self.errors = Counter(
            "tuneship_request_errors", "Refused or failed requests by status.", ["status"], registry=self.registry
        )
        self.log_dropped = Counter(
            "tuneship_request_log_dropped", "Request-log records dropped (queue full).", registry=self.registry
        )
        self.log_records = Counter(
            "tuneship_request_log_records", "Records written to request-log segments.", registry=self.registry
        )
        self.log_segments = Counter(
            "tuneship_request_log_segments", "Request-log segments written.", registry=self.registry
        )
        self.feedback = Counter(
            "tuneship_feedback",
            "Feedback received, by rating and served model.",
            ["rating", "model"],
            registry=self.registry,
        )
        self.down_ratio = Gauge(
            "tuneship_feedback_down_ratio",
            "Share of thumbs-down among the latest feedback on each served model (window: feedback_window).",
            ["model"],
            registry=self.registry,
        )

        self.adapters_loaded = Gauge(
            "tuneship_adapters_loaded", "Adapters this gateway keeps loaded in vLLM.", registry=self.registry
        )
        self.adapter_loads = Counter(
            "tuneship_adapter_loads", "Adapters loaded on a first request (cold loads).", registry=self.registry
        )
        self.adapter_evictions = Counter(
            "tuneship_adapter_evictions", "Unpinned adapters unloaded to stay under the cap.", registry=self.registry
        )
        self.adapter_cold_load = Histogram(
            "tuneship_adapter_cold_load_seconds",
            "Fetch, verify and load of an adapter on its first request.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

        # Each request's labelled series, looked up once per label value, not per request (``labels()`` costs
        # a few microseconds); the label values are known model names and the two relays.
        self._per_model: dict[str, tuple[Any, Any, Any, Any]] = {}
        self._relayed: dict[str, Any] = {}

    def track_routes(self, routes: RouteTable) -> None:
        self.registry.register(RouteCollector(routes))

    def relayed(self, relay: str) -> None:
        """Count a streamed OpenAI answer by the relay that served it (``direct`` or ``general``)."""
        counter = self._relayed.get(relay)
        if counter is None:
            counter = self._relayed[relay] = self.streams.labels(relay=relay)
        counter.inc()

    def observe(self, model: str, seconds: float, ttft: float | None, tokens: int) -> None:
        series = self._per_model.get(model)
        if series is None:
            metrics = (self.latency, self.ttft, self.output_tokens, self.tokens_per_s)
            series = self._per_model[model] = tuple(m.labels(model=model) for m in metrics)  # type: ignore[assignment]
        latency, first_token, output_tokens, tokens_per_s = series
        latency.observe(seconds)
        if ttft is not None:
            first_token.observe(ttft)
        output_tokens.inc(tokens)
        if seconds > 0 and tokens:
            tokens_per_s.observe(tokens / seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
