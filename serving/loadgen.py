"""A load generator for the gateway or any OpenAI-compatible server (``tuneship bench``).

    report = asyncio.run(run_load(LoadSpec(url="http://127.0.0.1:8080", model="champion", concurrency=16,
                                           requests=200), prompts))
    print(report.markdown())

Each request is a streamed ``POST /v1/completions``: the time to the first token, the time per output token
after it, and the end-to-end latency are read from the stream (with ``stream=False``, whole completions and
their end-to-end latency only). Load is either a fixed number of concurrent
clients (closed loop) or a request rate with Poisson arrivals (open loop); the first ``warmup`` requests are
sent and dropped. One pooled ``httpx.AsyncClient`` carries everything.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, Field


class LoadSpec(BaseModel):
    url: str = Field(description="Base URL of the gateway or an OpenAI-compatible server.")
    model: str = Field(default="champion", description="Model name or gateway alias.")
    models: list[str] = Field(default_factory=list, description="Or: round-robin over these models, one per request.")
    concurrency: int = Field(default=16, gt=0, description="Concurrent clients (closed loop).")
    rate: float | None = Field(default=None, gt=0, description="Requests/s with Poisson arrivals (open loop).")
    requests: int | None = Field(default=200, gt=0, description="Measured requests (after warm-up).")
    duration_s: float | None = Field(default=None, gt=0, description="Or: measure for this long.")
    warmup: int = Field(default=8, ge=0)
    max_tokens: int = Field(default=64, gt=0)
    temperature: float = 0.0
    ignore_eos: bool = Field(default=False, description="vLLM extension: always generate max_tokens.")
    stream: bool = Field(default=True, description="Stream (SSE, TTFT measured) or wait for whole completions.")
    api_key: str | None = None
    timeout_s: float = 300.0
    seed: int = 0


@dataclass
class Sample:
    ok: bool
    latency: float
    ttft: float | None = None
    output_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": sum(values) / len(values) if values else math.nan,
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
    }


@dataclass
class LoadReport:
    spec: LoadSpec
    samples: list[Sample]
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.ok]
        tokens = sum(s.output_tokens for s in ok)
        return {
            "requests": len(self.samples),
            "errors": len(self.samples) - len(ok),
            "error_rate": (len(self.samples) - len(ok)) / len(self.samples) if self.samples else math.nan,
            "wall_s": self.wall_s,
            "requests_per_s": len(ok) / self.wall_s,
            "output_tokens_per_s": tokens / self.wall_s,
            "latency_s": _stats([s.latency for s in ok]),
            "ttft_s": _stats([s.ttft for s in ok if s.ttft is not None]),
            "tpot_s": _stats([t for s in ok if (t := s.tpot) is not None]),
            "concurrency": self.spec.concurrency if self.spec.rate is None else None,
            "rate": self.spec.rate,
            "model": self.spec.model,
            "url": self.spec.url,
            **self.extra,
        }

    def markdown(self) -> str:
        s = self.summary()
        ms = lambda d, k: f"{d[k] * 1000:.1f}"  # noqa: E731
        load = f"concurrency {s['concurrency']}" if s["rate"] is None else f"{s['rate']} req/s"
        lines = [
            f"# Load test: {s['model']} at {s['url']} ({load})",
            "",
            f"{s['requests']} requests, {s['errors']} errors ({s['error_rate']:.1%}), "
            f"{s['requests_per_s']:.2f} requests/s, {s['output_tokens_per_s']:.1f} output tokens/s",
            "",
            "| ms | mean | p50 | p95 | p99 |",
            "|---|---|---|---|---|",
        ]
        for label, key in (
            ("end-to-end latency", "latency_s"),
            ("time to first token", "ttft_s"),
            ("time per output token", "tpot_s"),
        ):
            d = s[key]
            lines.append(f"| {label} | {ms(d, 'mean')} | {ms(d, 'p50')} | {ms(d, 'p95')} | {ms(d, 'p99')} |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path, name: str = "load") -> list[Path]:
        """JSON (summary + every sample), markdown, and a latency histogram PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir.mkdir(parents=True, exist_ok=True)
        data = {"summary": self.summary(), "samples": [vars(s) for s in self.samples]}
        paths = [out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}-latency.png"]
        paths[0].write_text(json.dumps(data, indent=1, default=str))
        paths[1].write_text(self.markdown())
        fig, ax = plt.subplots(figsize=(6, 3.5))
        latencies = [s.latency * 1000 for s in self.samples if s.ok]
        ax.hist(latencies, bins=40, color="#4C72B0")
        for q, style in ((50, "-"), (95, "--"), (99, ":")):
            ax.axvline(percentile(latencies, q), color="k", linestyle=style, label=f"p{q}")
        ax.set_xlabel("end-to-end latency (ms)")
        ax.set_ylabel("requests")
        ax.legend()
        fig.tight_layout()
        fig.savefig(paths[2], dpi=100)
        plt.close(fig)
        return paths


async def _one(client: httpx.AsyncClient, spec: LoadSpec, prompt: str, model: str | None = None) -> Sample:
    body: dict[str, Any] = {
        "model": model or spec.model,
        "prompt": prompt,
        "max_tokens": spec.max_tokens,
        "temperature": spec.temperature,
        "stream": spec.stream,
    }
    if spec.ignore_eos:
        body["ignore_eos"] = True
    started = time.perf_counter()
    first, tokens = None, 0
    try:
        if not spec.stream:
            response = await client.post("/v1/completions", json=body)
            if response.status_code != 200:
                error = f"{response.status_code}: {response.text[:200]}"
                return Sample(False, time.perf_counter() - started, error=error)
            tokens = response.json()["usage"]["completion_tokens"]
            return Sample(True, time.perf_counter() - started, None, tokens)
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return Sample(False, time.perf_counter() - started, error=f"{response.status_code}: {text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    return Sample(False, time.perf_counter() - started, error=str(chunk["error"])[:200])
                if any(c.get("text") for c in chunk.get("choices", [])):
                    first = first or time.perf_counter()
                    tokens += 1
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens", tokens)
    except httpx.HTTPError as exc:
        return Sample(False, time.perf_counter() - started, error=type(exc).__name__)
    end = time.perf_counter()
    return Sample(True, end - started, (first - started) if first else None, tokens)


async def run_load(spec: LoadSpec, prompts: Sequence[str]) -> LoadReport:
    """Send the load ``spec`` describes, cycling through ``prompts``; return every measured sample."""
    if not prompts:
        raise ValueError("no prompts to send")
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    limits = httpx.Limits(
        max_connections=max(spec.concurrency, 64), max_keepalive_connections=max(spec.concurrency, 64)
    )
    rng = random.Random(spec.seed)
    counter = iter(range(10**9))

    models = spec.models or [spec.model]
    turn = iter(range(10**9))

    def next_prompt() -> str:
        return prompts[next(counter) % len(prompts)]

    def send(client: httpx.AsyncClient) -> Any:
        """The next request: the next prompt, to the next model (round-robin)."""
        return _one(client, spec, next_prompt(), models[next(turn) % len(models)])

    async with httpx.AsyncClient(base_url=spec.url, headers=headers, timeout=spec.timeout_s, limits=limits) as client:
        warm = [send(client) for _ in range(spec.warmup)]
        for start in range(0, len(warm), spec.concurrency):
            await asyncio.gather(*warm[start : start + spec.concurrency])
        samples: list[Sample] = []
        started = time.perf_counter()
        deadline = started + spec.duration_s if spec.duration_s else math.inf
        wanted = spec.requests if spec.requests and not spec.duration_s else math.inf

        def more() -> bool:
            return len(samples) + in_flight < wanted and time.perf_counter() < deadline

        in_flight = 0
        if spec.rate is None:  # closed loop: each client sends its next request when the last one ends

            async def client_loop() -> None:
                nonlocal in_flight
                while more():
                    in_flight += 1
                    sample = await send(client)
                    in_flight -= 1
                    samples.append(sample)

            await asyncio.gather(*(client_loop() for _ in range(spec.concurrency)))
        else:  # open loop: Poisson arrivals at spec.rate, whatever the server's pace
            tasks = []
            while more():
                tasks.append(asyncio.create_task(send(client)))
                in_flight += 1
                await asyncio.sleep(rng.expovariate(spec.rate))
            samples.extend(await asyncio.gather(*tasks))
        wall = time.perf_counter() - started
    return LoadReport(spec, samples, wall)
