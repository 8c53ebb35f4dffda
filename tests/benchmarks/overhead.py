"""The gateway's own cost, isolated: the gateway in front of the fixed-rate upstream (``fixed_rate_upstream.py``),
against hitting that upstream directly, in alternating rounds.

Figures: CPU-ms of the gateway process per streamed request (from /proc, the load generator's own cost
excluded), and the latency the gateway adds to time to first token (first body byte), to the end of the
stream at p50 and p99, at concurrency 16 (closed loop) and at a fixed request rate (open loop).

    python tests/benchmarks/overhead.py --loop asyncio --http h11   # one variant, printed as JSON

Each variant is a gateway launched by :func:`launch_gateway`: the code of a source tree (``src``: this checkout,
or an older commit checked out elsewhere, for before/after figures) and uvicorn's event loop and HTTP parser.
``--bare`` measures the bare relay (``bare_relay.py``) instead: the floor under any relay written in Python here.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from infra.services import free_port
from serving.loadgen import percentile

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LAUNCH = """
import sys, uvicorn
from pathlib import Path
from serving.app import create_app, GatewayConfig
from serving.upstream import VllmUpstream
port, upstream, loop, http, log_dir, direct = sys.argv[1:7]
config = GatewayConfig(aliases={"champion": "base"}, api_keys=["bench"], max_in_flight=256, max_tokens_cap=4096,
                       direct_relay=direct == "direct")
log = None
if log_dir != "-":  # the request log on (full mode: texts scrubbed), into a local artifact store
    from infra.artifacts import ArtifactStore, LocalBackend
    from serving.request_log import RequestLog, RequestLogConfig
    log = RequestLog(ArtifactStore(LocalBackend(Path(log_dir)), Path(log_dir) / ".cache"), RequestLogConfig())
uvicorn.run(create_app(config, VllmUpstream(upstream), log), host="127.0.0.1", port=int(port), loop=loop, http=http,
            log_level="warning")
"""


def _wait(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1, headers={"Authorization": "Bearer bench"}).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def start_upstream(ttft_ms: float, token_ms: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, str(HERE / "fixed_rate_upstream.py"), "--port", str(port)]
    proc = subprocess.Popen([*argv, "--ttft-ms", str(ttft_ms), "--token-ms", str(token_ms)])
    url = f"http://127.0.0.1:{port}"
    _wait(f"{url}/v1/models", proc)
    return proc, url


def launch_gateway(
    upstream: str,
    *,
    src: Path = REPO,
    loop: str = "uvloop",
    http: str = "httptools",
    log_dir: Path | None = None,
    direct: bool = True,
):
    """The gateway from ``src`` as its own process; with ``log_dir``, its request log writes there; ``direct``:
    streams take the direct relay where the server allows it (``serving.relay``)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(src)}
    argv = [sys.executable, "-c", LAUNCH, str(port), upstream, loop, http, str(log_dir) if log_dir else "-"]
    argv.append("direct" if direct else "general")
    proc = subprocess.Popen(argv, env=env, cwd=src)
    url = f"http://127.0.0.1:{port}"
    _wait(f"{url}/health", proc)
    return proc, url


def launch_bare_relay(upstream: str) -> tuple[subprocess.Popen, str]:
    """The floor under every variant: a relay with no framework and no checks (``bare_relay.py``)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "bare_relay.py"), "--port", str(port), "--upstream", upstream])
    url = f"http://127.0.0.1:{port}"
    _wait(f"{url}/health", proc)
    return proc, url


def cpu_times(pid: int) -> tuple[float, float]:
    """Seconds of CPU the process spent in user space and in the kernel (its system calls: socket reads and
    writes, which on loopback include delivering the bytes to the receiving socket)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


async def _one(session: Any, url: str, model: str, tokens: int, stream: bool) -> dict[str, float]:
    body = {"model": model, "prompt": "hello", "max_tokens": tokens, "stream": stream}
    started = time.perf_counter()
    first = None
    async with session.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer bench"}) as r:
        assert r.status == 200, await r.text()
        async for _ in r.content.iter_any():
            first = first or time.perf_counter()
        overhead = r.headers.get("x-tuneship-overhead-ms")
    end = time.perf_counter()
    sample = {"ttfb": (first or end) - started, "latency": end - started}
    if overhead is not None:
        sample["overhead_header_ms"] = float(overhead)
    return sample


async def load(
    url: str, model: str, *, requests: int, concurrency: int | None = None, rate: float | None = None,
    tokens: int = 64, stream: bool = True,
) -> list[dict[str, float]]:  # fmt: skip
    """``requests`` requests, by ``concurrency`` clients in a closed loop, or started at ``rate`` per second."""
    import aiohttp

    samples: list[dict[str, float]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        if rate is None:
            left = requests

            async def client() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    samples.append(await _one(session, url, model, tokens, stream))

            await asyncio.gather(*(client() for _ in range(concurrency or 16)))
        else:
            start, tasks = time.perf_counter(), []
            for i in range(requests):
                await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
                tasks.append(asyncio.create_task(_one(session, url, model, tokens, stream)))
            samples = list(await asyncio.gather(*tasks))
    return samples


def _summary(samples: list[dict[str, float]]) -> dict[str, float]:
    latency, ttfb = [s["latency"] for s in samples], [s["ttfb"] for s in samples]
    return {
        "p50_ms": percentile(latency, 50) * 1000,
        "p99_ms": percentile(latency, 99) * 1000,
        "ttfb_p50_ms": percentile(ttfb, 50) * 1000,
        "ttfb_p99_ms": percentile(ttfb, 99) * 1000,
    }


def _headers(samples: list[dict[str, float]]) -> list[float]:
    return [s["overhead_header_ms"] for s in samples if "overhead_header_ms" in s]


def measure(
    upstream: str, gateway: str, gateway_pid: int, *, rounds: int = 3, requests: int = 192, rate: float = 40.0,
    tokens: int = 64,
) -> dict[str, Any]:  # fmt: skip
    """Alternate direct and gateway rounds (same load); medians over rounds of the per-round differences."""
    asyncio.run(load(gateway, "champion", requests=32, concurrency=16, tokens=tokens))  # warm both paths
    asyncio.run(load(upstream, "base", requests=32, concurrency=16, tokens=tokens))
    added: dict[str, dict[str, list[float]]] = {"concurrency_16": {}, f"rate_{rate:g}_per_s": {}}
    user_s, kernel_s, streamed = 0.0, 0.0, 0
    for _ in range(rounds):
        for mode, kwargs in (("concurrency_16", {"concurrency": 16}), (f"rate_{rate:g}_per_s", {"rate": rate})):
            direct = _summary(asyncio.run(load(upstream, "base", requests=requests, tokens=tokens, **kwargs)))
            before = cpu_times(gateway_pid)
            via = _summary(asyncio.run(load(gateway, "champion", requests=requests, tokens=tokens, **kwargs)))
            after = cpu_times(gateway_pid)
            user_s, kernel_s = user_s + after[0] - before[0], kernel_s + after[1] - before[1]
            streamed += requests
            for key in direct:
                added[mode].setdefault(f"added_{key}", []).append(via[key] - direct[key])
                added[mode].setdefault(f"direct_{key}", []).append(direct[key])
    before = cpu_seconds(gateway_pid)
    plain = asyncio.run(load(gateway, "champion", requests=requests, concurrency=16, tokens=tokens, stream=False))
    plain_cpu = (cpu_seconds(gateway_pid) - before) / requests * 1000
    return {
        "cpu_ms_per_streamed_request": (user_s + kernel_s) / streamed * 1000,
        "user_ms_per_streamed_request": user_s / streamed * 1000,
        "kernel_ms_per_streamed_request": kernel_s / streamed * 1000,
        "cpu_ms_per_plain_request": plain_cpu,
        "overhead_header_p50_ms": statistics.median(headers) if (headers := _headers(plain)) else None,
        **{mode: {k: round(statistics.median(v), 3) for k, v in figures.items()} for mode, figures in added.items()},
        "requests_per_round": requests,
        "rounds": rounds,
        "tokens_per_request": tokens,
    }


def run_variant(
    name: str,
    upstream: str,
    *,
    src: Path = REPO,
    loop: str = "uvloop",
    http: str = "httptools",
    log_dir: Path | None = None,
    direct: bool = True,
    bare: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Launch the gateway from ``src`` with uvicorn's ``loop`` and ``http`` (or, with ``bare``, the bare relay),
    measure it, stop it (SIGTERM: its request log, when on, writes what it holds before the process ends)."""
    if bare:
        proc, url = launch_bare_relay(upstream)
    else:
        proc, url = launch_gateway(upstream, src=src, loop=loop, http=http, log_dir=log_dir, direct=direct)
    try:
        figures = measure(upstream, url, proc.pid, **kwargs)
        if bare:
            return {"variant": name, "bare_relay": True, **figures}
        return {"variant": name, "loop": loop, "http": http, "direct_relay": direct, **figures}
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=REPO, help="source tree of the gateway (default: this checkout)")
    parser.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    parser.add_argument("--http", default="httptools", choices=["httptools", "h11"])
    parser.add_argument("--general", action="store_true", help="streams take the general path, not the direct relay")
    parser.add_argument("--bare", action="store_true", help="the bare relay (bare_relay.py), not the gateway")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=192)
    args = parser.parse_args()
    upstream_proc, upstream_url = start_upstream(ttft_ms=10, token_ms=5)
    try:
        name = f"{args.src.name}:{args.loop}+{args.http}" + (" general" if args.general else "")
        name = "bare relay" if args.bare else name
        result = run_variant(
            name, upstream_url, src=args.src, loop=args.loop, http=args.http, rounds=args.rounds,
            requests=args.requests, direct=not args.general, bare=args.bare,
        )  # fmt: skip
        print(json.dumps(result, indent=2))
    finally:
        upstream_proc.terminate()
