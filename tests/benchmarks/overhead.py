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
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from infra.services import free_port
from serving.loadgen import percentile

STAMP = b'"id":"cmpl-'
# The gateway gets a core of its own (the last), the load generator and the upstream the others: a gateway is
# deployed on cores of its own, and this way its figures do not include waiting for the load generator's turn.
_CPUS = sorted(os.sched_getaffinity(0))
GATEWAY_CPUS, OTHER_CPUS = ({_CPUS[-1]}, set(_CPUS[:-1])) if len(_CPUS) > 1 else (set(_CPUS), set(_CPUS))
REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LAUNCH = """
import inspect, sys, uvicorn
from pathlib import Path
from serving.app import create_app, GatewayConfig
from serving.upstream import VllmUpstream
port, upstream, loop, http, log_dir, direct, lane = sys.argv[1:8]
config = GatewayConfig(aliases={"champion": "base"}, api_keys=["bench"], max_in_flight=256, max_tokens_cap=4096,
                       direct_relay=direct == "direct", fast_lane=lane == "lane")
log = None
if log_dir != "-":  # the request log on (full mode: texts scrubbed), into a local artifact store
    from infra.artifacts import ArtifactStore, LocalBackend
    from serving.request_log import RequestLog, RequestLogConfig
    log = RequestLog(ArtifactStore(LocalBackend(Path(log_dir)), Path(log_dir) / ".cache"), RequestLogConfig())
# Engine connections are reused as in front of the vLLM tuneship starts (TUNESHIP_VLLM_KEEP_ALIVE_S; the fixed-rate
# upstream never closes an idle one); a source tree from before that setting reused them for 4 s.
keep = {}
if "keep_alive_s" in inspect.signature(VllmUpstream).parameters:
    from infra.settings import VLLM_KEEP_ALIVE_S
    keep["keep_alive_s"] = VLLM_KEEP_ALIVE_S
uvicorn.run(create_app(config, VllmUpstream(upstream, **keep), log), host="127.0.0.1", port=int(port), loop=loop,
            http=http, log_level="warning", access_log=False)  # as tuneship serve runs it (serving.server)
"""


def _on(cpus: set[int]) -> Any:
    """For ``Popen(preexec_fn=...)``: the child, and every thread it starts, runs on ``cpus`` only."""
    return lambda: os.sched_setaffinity(0, cpus)


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


def start_upstream(ttft_ms: float, token_ms: float, uds: Path | None = None) -> tuple[subprocess.Popen, str]:
    """The fixed-rate upstream on a loopback port (its URL returned), and with ``uds`` on that Unix socket too."""
    port = free_port()
    argv = [sys.executable, str(HERE / "fixed_rate_upstream.py"), "--port", str(port)]
    argv += ["--uds", str(uds)] if uds else []
    proc = subprocess.Popen([*argv, "--ttft-ms", str(ttft_ms), "--token-ms", str(token_ms)], preexec_fn=_on(OTHER_CPUS))
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
    lane: bool = True,
):
    """The gateway from ``src`` as its own process; with ``log_dir``, its request log writes there; ``direct``:
    streams take the direct relay where the server allows it (``serving.relay``); ``lane``: the generating routes
    take the fast lane (``serving.lane``)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(src)}
    argv = [sys.executable, "-c", LAUNCH, str(port), upstream, loop, http, str(log_dir) if log_dir else "-"]
    argv += ["direct" if direct else "general", "lane" if lane else "no-lane"]
    proc = subprocess.Popen(argv, env=env, cwd=src, preexec_fn=_on(GATEWAY_CPUS))
    url = f"http://127.0.0.1:{port}"
    _wait(f"{url}/health", proc)
    return proc, url


def launch_bare_relay(upstream: str) -> tuple[subprocess.Popen, str]:
    """The floor under every variant: a relay with no framework and no checks (``bare_relay.py``)."""
    port = free_port()
    argv = [sys.executable, str(HERE / "bare_relay.py"), "--port", str(port), "--upstream", upstream]
    proc = subprocess.Popen(argv, preexec_fn=_on(GATEWAY_CPUS))
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


async def _one(session: Any, url: str, model: str, tokens: int, stream: bool, interval: int) -> dict[str, float]:
    body = {"model": model, "prompt": "hello", "max_tokens": tokens, "stream": stream}
    if interval > 1:  # vLLM's per-request stream interval: tokens per chunk after the first
        body["stream_interval"] = interval
    started, started_ns = time.perf_counter(), time.perf_counter_ns()
    first, first_way, stamp = None, None, None
    async with session.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer bench"}) as r:
        assert r.status == 200, await r.text()
        async for data in r.content.iter_any():
            now = time.perf_counter_ns()
            first = first or time.perf_counter()
            at = data.rfind(STAMP) + len(STAMP) if stream else -1  # the upstream's clock readings, if whole
            if at >= len(STAMP) and (close := data.find(b'"', at)) > 0:
                arrived, _, written = data[at:close].partition(b"-")
                if arrived.isdigit() and written.isdigit():
                    stamp = int(arrived), now - int(written)
                    first_way = first_way if first_way is not None else stamp[1]
        overhead = r.headers.get("x-tuneship-overhead-ms")
    end = time.perf_counter()
    sample = {"ttfb": (first or end) - started, "latency": end - started}
    if stamp is not None and first_way is not None:  # the path's part: there, and back for the first / last token
        there = stamp[0] - started_ns
        sample |= {"path_ttfb": (there + first_way) / 1e9, "path_latency": (there + stamp[1]) / 1e9}
    if overhead is not None:
        sample["overhead_header_ms"] = float(overhead)
    return sample


async def load(
    url: str, model: str, *, requests: int, concurrency: int | None = None, rate: float | None = None,
    tokens: int = 64, stream: bool = True, interval: int = 1,
) -> list[dict[str, float]]:  # fmt: skip
    """``requests`` requests, by ``concurrency`` clients in a closed loop, or started at ``rate`` per second;
    ``interval``: each asks for that stream interval."""
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
                    samples.append(await _one(session, url, model, tokens, stream, interval))

            await asyncio.gather(*(client() for _ in range(concurrency or 16)))
        else:
            start, tasks = time.perf_counter(), []
            for i in range(requests):
                await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
                tasks.append(asyncio.create_task(_one(session, url, model, tokens, stream, interval)))
            samples = list(await asyncio.gather(*tasks))
    return samples


def _summary(samples: list[dict[str, float]]) -> dict[str, float]:
    """Percentiles of the whole latency and time to first byte, and of their path's part (``path_``) where the
    upstream stamped its chunks."""
    summary = {}
    for prefix in ("", "path_"):
        latency = [s[f"{prefix}latency"] for s in samples if f"{prefix}latency" in s]
        ttfb = [s[f"{prefix}ttfb"] for s in samples if f"{prefix}ttfb" in s]
        if latency:
            summary |= {
                f"{prefix}p50_ms": percentile(latency, 50) * 1000,
                f"{prefix}p99_ms": percentile(latency, 99) * 1000,
                f"{prefix}ttfb_p50_ms": percentile(ttfb, 50) * 1000,
                f"{prefix}ttfb_p99_ms": percentile(ttfb, 99) * 1000,
            }
    return summary


def _headers(samples: list[dict[str, float]]) -> list[float]:
    return [s["overhead_header_ms"] for s in samples if "overhead_header_ms" in s]


def measure(
    upstream: str, gateway: str, gateway_pid: int, *, rounds: int = 3, requests: int = 192, rate: float = 40.0,
    tokens: int = 64, interval: int = 1,
) -> dict[str, Any]:  # fmt: skip
    """Alternate direct and gateway rounds (same load); the percentiles of all rounds' requests each way, and their
    differences. The load generator (this process) runs on the cores the upstream has, off the gateway's.
    ``interval``: the streams' stream interval (tokens per chunk after the first; 1: a chunk per token)."""
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, OTHER_CPUS)
    try:
        return _measure(
            upstream, gateway, gateway_pid, rounds=rounds, requests=requests, rate=rate, tokens=tokens,
            interval=interval,
        )  # fmt: skip
    finally:
        os.sched_setaffinity(0, mine)


def _measure(
    upstream: str, gateway: str, gateway_pid: int, *, rounds: int, requests: int, rate: float, tokens: int,
    interval: int,
) -> dict[str, Any]:  # fmt: skip
    each = {"tokens": tokens, "interval": interval}
    asyncio.run(load(gateway, "champion", requests=32, concurrency=16, **each))  # warm both paths
    asyncio.run(load(upstream, "base", requests=32, concurrency=16, **each))
    modes = {"concurrency_16": {"concurrency": 16}, f"rate_{rate:g}_per_s": {"rate": rate}}
    samples: dict[tuple[str, str], list[dict[str, float]]] = {(m, way): [] for m in modes for way in ("direct", "via")}
    user_s, kernel_s, streamed = 0.0, 0.0, 0
    for _ in range(rounds):
        for mode, kwargs in modes.items():
            samples[mode, "direct"] += asyncio.run(load(upstream, "base", requests=requests, **each, **kwargs))
            before = cpu_times(gateway_pid)
            samples[mode, "via"] += asyncio.run(load(gateway, "champion", requests=requests, **each, **kwargs))
            after = cpu_times(gateway_pid)
            user_s, kernel_s = user_s + after[0] - before[0], kernel_s + after[1] - before[1]
            streamed += requests
    added: dict[str, dict[str, float]] = {}
    for mode in modes:
        direct, via = _summary(samples[mode, "direct"]), _summary(samples[mode, "via"])
        added[mode] = {f"added_{key}": round(via[key] - direct[key], 3) for key in direct}
        added[mode] |= {f"direct_{key}": round(value, 3) for key, value in direct.items()}
    before = cpu_seconds(gateway_pid)
    plain = asyncio.run(load(gateway, "champion", requests=requests, concurrency=16, tokens=tokens, stream=False))
    plain_cpu = (cpu_seconds(gateway_pid) - before) / requests * 1000
    return {
        "cpu_ms_per_streamed_request": (user_s + kernel_s) / streamed * 1000,
        "user_ms_per_streamed_request": user_s / streamed * 1000,
        "kernel_ms_per_streamed_request": kernel_s / streamed * 1000,
        "cpu_ms_per_plain_request": plain_cpu,
        "overhead_header_p50_ms": statistics.median(headers) if (headers := _headers(plain)) else None,
        **added,
        "requests_per_round": requests,
        "rounds": rounds,
        "tokens_per_request": tokens,
        "stream_interval": interval,
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
    lane: bool = True,
    bare: bool = False,
    engine: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Launch the gateway from ``src`` with uvicorn's ``loop`` and ``http`` (or, with ``bare``, the bare relay),
    measure it, stop it (SIGTERM: its request log, when on, writes what it holds before the process ends).
    ``engine``: the gateway reaches the upstream there (``unix:`` and its socket) rather than at ``upstream``,
    which the direct rounds still use."""
    if bare:
        proc, url = launch_bare_relay(upstream)
    else:
        proc, url = launch_gateway(
            engine or upstream, src=src, loop=loop, http=http, log_dir=log_dir, direct=direct, lane=lane
        )
    try:
        figures = measure(upstream, url, proc.pid, **kwargs)
        if bare:
            return {"variant": name, "bare_relay": True, **figures}
        where = {"engine": engine} if engine else {}
        return {
            "variant": name, "loop": loop, "http": http, "direct_relay": direct, "fast_lane": lane, **where, **figures
        }  # fmt: skip
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
    parser.add_argument("--no-lane", action="store_true", help="every request through FastAPI's whole path")
    parser.add_argument("--bare", action="store_true", help="the bare relay (bare_relay.py), not the gateway")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--stream-interval", type=int, default=1, help="tokens per streamed chunk after the first")
    parser.add_argument("--engine-uds", action="store_true", help="the gateway reaches the upstream on a Unix socket")
    args = parser.parse_args()
    import tempfile

    socket = Path(tempfile.mkdtemp(prefix="tuneship-bench-")) / "engine.sock" if args.engine_uds else None
    upstream_proc, upstream_url = start_upstream(ttft_ms=10, token_ms=5, uds=socket)
    try:
        name = f"{args.src.name}:{args.loop}+{args.http}" + (" general" if args.general else "")
        name += " no-lane" if args.no_lane else ""
        name = "bare relay" if args.bare else name
        result = run_variant(
            name, upstream_url, src=args.src, loop=args.loop, http=args.http, rounds=args.rounds,
            requests=args.requests, direct=not args.general, lane=not args.no_lane, bare=args.bare,
            interval=args.stream_interval, engine=f"unix:{socket}" if socket else None,
        )  # fmt: skip
        print(json.dumps(result, indent=2))
    finally:
        upstream_proc.terminate()
        if socket:
            shutil.rmtree(socket.parent, ignore_errors=True)
