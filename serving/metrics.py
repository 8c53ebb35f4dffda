"""Prometheus metrics of one gateway app (its own registry: no module-level singletons)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process memory and CPU
        self.latency = Histogram("tuneship_request_latency_seconds", "End-to-end request latency.", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.ttft = Histogram("tuneship_time_to_first_token_seconds", "Time to the first streamed token.", ["model"],
                              buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.output_tokens = Counter("tuneship_output_tokens", "Generated tokens.", ["model"], registry=self.registry)
        self.tokens_per_s = Histogram("tuneship_tokens_per_second", "Generated tokens per second per request.",
                                      ["model"], buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
                                      registry=self.registry)  # fmt: skip
        self.in_flight = Gauge("tuneship_requests_in_flight", "Requests being served upstream.", registry=self.registry)
        self.queue_depth = Gauge("tuneship_queue_depth", "Requests waiting for a slot.", registry=self.registry)
        self.errors = Counter("tuneship_request_errors", "Refused or failed requests by status.", ["status"],
                              registry=self.registry)  # fmt: skip

    def observe(self, model: str, seconds: float, ttft: float | None, tokens: int) -> None:
        self.latency.labels(model=model).observe(seconds)
        if ttft is not None:
            self.ttft.labels(model=model).observe(ttft)
        self.output_tokens.labels(model=model).inc(tokens)
        if seconds > 0 and tokens:
            self.tokens_per_s.labels(model=model).observe(tokens / seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
