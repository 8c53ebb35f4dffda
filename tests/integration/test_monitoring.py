"""The monitoring assets: every metric the Grafana dashboard queries is exported by the gateway or by vLLM,
and the Prometheus scrape config scrapes the jobs the dashboard filters on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import yaml

from infra.services import free_port
from serving.app import GatewayConfig, create_app
from serving.metrics import GpuCollector
from serving.server import serve_in_thread
from serving.upstream import VllmUpstream

pytestmark = pytest.mark.slow
MONITORING = Path(__file__).resolve().parents[2] / "infra" / "monitoring"
SUFFIXES = {"histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}


def exported(metrics_text: str) -> set[str]:
    """Sample names a /metrics page can carry, from its TYPE lines (present even before any observation)."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", metrics_text, re.M):
        names |= {name + s for s in SUFFIXES.get(kind, ("",))}
    return names


def dashboard_metrics() -> set[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(dashboard["panels"]) >= 8 and exprs
    return {m for e in exprs for m in re.findall(r"\b((?:tuneship_|vllm:|process_)[a-zA-Z0-9_:]+)", e)}


def test_every_dashboard_metric_is_exported_by_the_gateway_or_vllm(vllm_server) -> None:
    app = create_app(GatewayConfig(aliases={"champion": "base"}), VllmUpstream(vllm_server.base_url))
    with serve_in_thread(app, port=free_port()) as gateway:
        gateway_metrics = httpx.get(f"{gateway}/metrics").text
    vllm_metrics = httpx.get(f"{vllm_server.base_url}/metrics").text
    gpu = {family.name for family in GpuCollector().describe()}  # exported only where NVML finds a GPU
    available = exported(gateway_metrics) | exported(vllm_metrics) | gpu
    wanted = dashboard_metrics()
    assert {"tuneship_gpu_utilization_ratio", "vllm:num_requests_running", "tuneship_output_tokens_total"} <= wanted
    assert wanted <= available, f"not exported: {sorted(wanted - available)}"


def test_scrape_config_has_the_jobs_the_dashboard_uses() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    dashboard = (MONITORING / "grafana-dashboard.json").read_text()
    assert set(re.findall(r'job=\\"([^\\"]+)\\"', dashboard)) <= jobs == {"tuneship-gateway", "vllm"}


def test_tuneship_bench_against_the_gateway_prints_the_table_and_writes_the_files(vllm_server, tmp_path) -> None:
    import os
    import subprocess
    import sys

    app = create_app(GatewayConfig(aliases={"champion": "base"}), VllmUpstream(vllm_server.base_url))
    with serve_in_thread(app, port=free_port()) as gateway:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "bench",
                "--url",
                gateway,
                "--model",
                "champion",
                "--concurrency",
                "4",
                "--requests",
                "24",
                "--warmup",
                "2",
                "--max-tokens",
                "16",
                "--out",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "TUNESHIP_HOME": str(tmp_path)},
        )
        metrics = httpx.get(f"{gateway}/metrics").text
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| end-to-end latency |" in result.stdout and "per 1M output tokens" in result.stdout
    data = json.loads((tmp_path / "load.json").read_text())
    assert data["summary"]["requests"] == 24 and data["summary"]["errors"] == 0
    assert all(s["ok"] and 0 < s["output_tokens"] <= 16 and s["ttft"] < s["latency"] for s in data["samples"])
    assert (tmp_path / "load-latency.png").stat().st_size > 1000 and (tmp_path / "load.md").exists()
    # The gateway saw the 26 requests (warm-up included) it measured.
    assert re.search(r'^tuneship_request_latency_seconds_count\{model="champion"\} 26\.0$', metrics, re.M)


def test_load_without_streaming_counts_whole_completions(vllm_server) -> None:
    import asyncio
    import math

    from serving.loadgen import LoadSpec, run_load

    spec = LoadSpec(
        url=vllm_server.base_url,
        model="base",
        concurrency=4,
        requests=12,
        warmup=0,
        max_tokens=8,
        ignore_eos=True,
        stream=False,
    )
    report = asyncio.run(run_load(spec, ["SELECT", "How many orders"]))
    assert [(s.ok, s.output_tokens, s.ttft) for s in report.samples] == [(True, 8, None)] * 12
    summary = report.summary()
    assert summary["output_tokens_per_s"] == 96 / summary["wall_s"] and math.isnan(summary["ttft_s"]["p50"])
    assert "| end-to-end latency |" in report.markdown()
