"""Serving benchmarks: ``tuneship bench`` (one load test, priced, logged to MLflow against a model version) and
the comparison table the seed asks for (base vs fine-tuned vs another configuration vs an API, same load).

    report = bench(LoadSpec(url=gw, model="champion"), eval_prompts(test_jsonl), out_dir=Path("bench"))
    table = compare([("base", gw, "base"), ("fine-tuned", gw, "champion")], prompts, spec)
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

from prefect import flow
from pydantic import BaseModel, Field

from flows.results import PERSISTED
from infra.costs import load_prices, serving_cost
from infra.prompts import alpaca_prompt
from serving.loadgen import LoadReport, LoadSpec, run_load

DEFAULT_INSTANCE = "aws-g5.xlarge"
DEFAULT_API = "openai-gpt-4o-mini"


def eval_prompts(test_jsonl: Path, limit: int = 200) -> list[str]:
    """Prompts of an evaluation set (JSONL with ``instruction``), in the training template."""
    rows = [json.loads(line) for line in test_jsonl.read_text().splitlines() if line.strip()][:limit]
    return [alpaca_prompt(r["instruction"], r.get("input") or None) for r in rows]


def synthetic_prompts(count: int, words: int, seed: int = 0) -> list[str]:
    """Prompts of about ``words`` words each, from a fixed vocabulary (for length sweeps)."""
    rng = random.Random(seed)
    vocab = [
        "show",
        "count",
        "list",
        "customers",
        "orders",
        "products",
        "stores",
        "total",
        "average",
        "price",
        "city",
        "name",
        "each",
        "by",
        "the",
        "of",
    ]
    return [alpaca_prompt(" ".join(rng.choice(vocab) for _ in range(words))) for _ in range(count)]


def bench(
    spec: LoadSpec,
    prompts: list[str],
    *,
    out_dir: Path,
    instance: str = DEFAULT_INSTANCE,
    api: str | None = DEFAULT_API,
    tracking_uri: str | None = None,
    model_name: str | None = None,
    version: str | None = None,
    name: str = "load",
) -> LoadReport:
    """Run one load test, price it on ``instance``, write JSON/markdown/PNG, log it to MLflow if asked."""
    report = asyncio.run(run_load(spec, prompts))
    s = report.summary()
    if s["requests_per_s"] > 0 and s["output_tokens_per_s"] > 0:
        cost = serving_cost(
            load_prices(),
            instance,
            requests_per_s=s["requests_per_s"],
            output_tokens_per_s=s["output_tokens_per_s"],
            api=api,
        )
        report.extra["cost"] = cost.model_dump()
    files = report.write(out_dir, name)
    if tracking_uri:
        _log_to_mlflow(report, files, tracking_uri=tracking_uri, model_name=model_name, version=version)
    return report


def _log_to_mlflow(
    report: LoadReport, files: list[Path], *, tracking_uri: str, model_name: str | None, version: str | None
) -> None:
    from infra.tracking import MlflowTracker, flatten

    s = report.summary()
    tags = {"tuneship.model_name": model_name or "", "tuneship.model_version": version or ""}
    tracker = MlflowTracker(tracking_uri, system_metrics=False)
    with tracker.run(f"bench-{model_name or s['model']}-v{version or 'na'}", stage="bench", tags=tags):
        tracker.log_params({k: v for k, v in report.spec.model_dump().items() if k != "api_key"})
        tracker.log_metrics(
            {
                k: v
                for k, v in flatten({k: v for k, v in s.items() if k not in ("model", "url")}).items()
                if isinstance(v, int | float) and v == v
            }
        )
        for path in files:
            tracker.log_artifact(path, artifact_path="bench")
    if model_name and version and "cost" in s:
        from infra.registry import set_version_tags

        cost = s["cost"]
        set_version_tags(
            model_name,
            version,
            {
                "tuneship.cost.serving_usd_per_1m_output_tokens": f"{cost['usd_per_1m_output_tokens']:.4g}",
                "tuneship.cost.serving_usd_per_1k_requests": f"{cost['usd_per_1k_requests']:.4g}",
                "tuneship.cost.serving_instance": cost["instance"],
            },
            tracking_uri=tracking_uri,
        )


def compare(
    rows: list[tuple[str, str, str]],
    prompts: list[str],
    spec: LoadSpec,
    *,
    instance: str,
    api: str | None = DEFAULT_API,
) -> tuple[str, list[dict[str, Any]]]:
    """The seed's comparison: each (label, url, model) under the same load and prompts; plus the API's price.

    Cost per 1M output tokens prices the measured throughput at ``instance``'s hourly rate; the API row is
    the configured API price, not a measurement."""
    prices = load_prices()
    results = []
    for label, url, model in rows:
        report = asyncio.run(run_load(spec.model_copy(update={"url": url, "model": model}), prompts))
        s = report.summary()
        cost = serving_cost(
            prices, instance, requests_per_s=s["requests_per_s"], output_tokens_per_s=s["output_tokens_per_s"]
        )
        results.append(
            {
                "config": label,
                "p50_ms": s["latency_s"]["p50"] * 1000,
                "p95_ms": s["latency_s"]["p95"] * 1000,
                "ttft_p50_ms": s["ttft_s"]["p50"] * 1000,
                "tokens_per_s": s["output_tokens_per_s"],
                "requests_per_s": s["requests_per_s"],
                "errors": s["errors"],
                "usd_per_1m_tokens": cost.usd_per_1m_output_tokens,
                "measured": True,
            }
        )
    lines = [
        f"| configuration | p50 ms | p95 ms | TTFT p50 ms | output tokens/s | requests/s | $ / 1M tokens on "
        f"{instance} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['ttft_p50_ms']:.0f} | "
            f"{r['tokens_per_s']:.0f} | {r['requests_per_s']:.2f} | {r['usd_per_1m_tokens']:.2f} |"
        )
    if api:
        price = prices.api(api)
        results.append(
            {"config": f"API: {api}", "usd_per_1m_tokens": price.usd_per_1m_output_tokens, "measured": False}
        )
        lines.append(
            f"| API: {api} (price list {price.as_of}, not measured) | – | – | – | – | – | "
            f"{price.usd_per_1m_output_tokens:.2f} |"
        )
    return "\n".join(lines) + "\n", results


class BenchParams(BaseModel):
    url: str = Field(description="Gateway or OpenAI-compatible server.")
    model: str = "champion"
    concurrency: int = Field(default=16, gt=0, le=1024)
    requests: int = Field(default=200, gt=0, le=100_000)
    max_tokens: int = Field(default=64, gt=0, le=4096)
    prompts_file: str | None = Field(default=None, description="Evaluation JSONL; default: synthetic prompts.")
    instance: str = DEFAULT_INSTANCE
    out_dir: str = "bench-results/load"


@flow(name="bench", log_prints=True, validate_parameters=True, **PERSISTED)
def bench_flow(params: BenchParams) -> dict[str, Any]:
    """A load test as a Prefect run (e.g. after a deploy), priced and logged to MLflow."""
    from infra.settings import load_settings

    prompts = eval_prompts(Path(params.prompts_file)) if params.prompts_file else synthetic_prompts(64, 24)
    spec = LoadSpec(
        url=params.url,
        model=params.model,
        concurrency=params.concurrency,
        requests=params.requests,
        max_tokens=params.max_tokens,
    )
    report = bench(
        spec,
        prompts,
        out_dir=Path(params.out_dir),
        instance=params.instance,
        tracking_uri=load_settings().mlflow_tracking_uri,
    )
    print(report.markdown())
    return report.summary()
