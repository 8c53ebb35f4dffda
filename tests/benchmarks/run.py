"""``make bench``: every performance benchmark tuneship has, as ratios measured in one run.

    .venv/bin/python tests/benchmarks/run.py [NAME ...]      # all, or the named ones

Each benchmark writes ``bench-results/<name>.json``; the run ends with ``bench-results/summary.md``, one table
with the measured ratio and its goal side by side. These are measurements, not tests: nothing here fails
the build, and no test asserts a timing.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from infra.artifacts import ArtifactStore, LocalBackend  # noqa: E402
from infra.settings import load_settings  # noqa: E402
from offline.base_model import RECIPES, ensure_base_model  # noqa: E402
from tasks.base_model import ResolvedModel  # noqa: E402

RESULTS = REPO / "bench-results"
BENCHES: dict[str, Callable[[Path], dict[str, Any]]] = {}


def bench(fn: Callable[[Path], dict[str, Any]]) -> Callable[[Path], dict[str, Any]]:
    BENCHES[fn.__name__] = fn
    return fn


def _base(workdir: Path) -> tuple[ResolvedModel, ArtifactStore]:
    store = ArtifactStore(LocalBackend(workdir / "store"), workdir / "cache")
    built = ensure_base_model(RECIPES["sql-small"], store=store, cache_dir=load_settings().cache_dir)
    return ResolvedModel("tuneship/sql-small", str(built.path), built.ref.sha256), store


def _demo_config(workdir: Path, *overrides: str) -> Any:
    from offline.demo_task import build_demo_task
    from tasks.config import load_run_config

    task = workdir / "demo-task"
    if not (task / "train.jsonl").exists():
        build_demo_task(task)
    return load_run_config(
        REPO / "deployments" / "configs" / "tiny-cpu.yaml",
        [
            f"data.source={task / 'train.jsonl'}",
            f"data.test_file={task / 'test.jsonl'}",
            f"data.extra_test.paraphrase={task / 'test_paraphrase.jsonl'}",
            *overrides,
        ],
    )


def _demo_adapter(workdir: Path) -> Path:
    """The demo's adapter (the tiny-cpu preset trained in full), trained once per bench run; its directory."""
    from infra.tracking import MlflowTracker
    from tasks.finetune import finetune
    from tasks.preprocess import preprocess

    base, store = _base(workdir)
    cfg = _demo_config(workdir)
    data = preprocess(cfg.preprocess, cfg.data, name=cfg.name, base=base, store=store, workdir=workdir / "work")
    tracker = MlflowTracker(f"sqlite:///{workdir / 'mlflow.db'}", system_metrics=False)
    adapter = finetune(
        cfg.finetune,
        data,
        name=cfg.name,
        base=base,
        store=store,
        tracker=tracker,
        workdir=workdir / "work",
        run_id="demo",
    )
    return store.get_dir(adapter.artifact)


@bench
def finetune_throughput(workdir: Path) -> dict[str, Any]:
    """Fine-tune tokens/s (real tokens): length-grouped dynamic padding vs a plain Trainer padding to max_length."""
    from infra.tracking import MlflowTracker
    from tasks.finetune import finetune
    from tasks.preprocess import preprocess

    base, store = _base(workdir)
    tracker = MlflowTracker(f"sqlite:///{workdir / 'mlflow.db'}", system_metrics=False)
    demo = _demo_config(workdir)
    data = preprocess(demo.preprocess, demo.data, name=demo.name, base=base, store=store, workdir=workdir / "work")
    rates = {}
    for batching in ("padded", "group_by_length"):
        cfg = _demo_config(workdir, f"finetune.train.batching={batching}", "finetune.train.max_steps=60")
        adapter = finetune(
            cfg.finetune,
            data,
            name=cfg.name,
            base=base,
            store=store,
            tracker=tracker,
            workdir=workdir / "work",
            run_id=f"bench-{batching}",
        )
        rates[batching] = adapter.metrics["tokens_per_s"]
    return {
        "tokens_per_s_grouped": rates["group_by_length"],
        "tokens_per_s_padded_to_max_length": rates["padded"],
        "max_seq_len": data.max_seq_len,
        "mean_tokens_per_row": data.stats.token_length["mean"],
        "ratio": rates["group_by_length"] / rates["padded"],
        "goal": ">= 1.5",
        "met": rates["group_by_length"] / rates["padded"] >= 1.5,
    }


@bench
def qlora_memory(workdir: Path) -> dict[str, Any]:
    """Base-weight memory as the QLoRA preset loads the model (NF4) vs the 16-bit load of the same model."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.config import load_run_config
    from tasks.finetune import load_base_for_training

    base, _ = _base(workdir)
    preset = load_run_config(REPO / "deployments" / "configs" / "tiny-cpu-qlora.yaml", []).finetune
    sixteen = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.bfloat16)
    # What the preset's loader gives, with the modules bitsandbytes leaves alone in bf16 like the reference.
    nf4 = load_base_for_training(base, preset, device="cpu", compute_dtype=torch.bfloat16)

    def linear_bytes(model: Any) -> int:
        total = 0
        for module in model.modules():
            if type(module).__name__ in ("Linear", "Linear4bit") and module is not model.lm_head:
                total += module.weight.numel() * module.weight.element_size()
                state = getattr(module.weight, "quant_state", None)
                if state is not None:  # absmax (and nested) scales of the 4-bit blocks
                    total += sum(
                        t.numel() * t.element_size() for t in state.as_dict(packed=True).values() if torch.is_tensor(t)
                    )
        return total

    whole = nf4.get_memory_footprint() / sixteen.get_memory_footprint()
    share = sixteen.get_input_embeddings().weight.numel() / sixteen.num_parameters()
    return {
        "bytes_16bit": sixteen.get_memory_footprint(),
        "bytes_nf4": nf4.get_memory_footprint(),
        "ratio": whole,
        "ratio_quantized_layers": linear_bytes(nf4) / linear_bytes(sixteen),
        "embedding_share_of_params": share,
        "goal": "<= 0.35",
        "met": whole <= 0.35,
        "note": f"bitsandbytes quantizes the decoder's linear layers; the tied embeddings stay 16-bit and are "
        f"{share:.0%} of this model's weights",
    }


@bench
def eval_generation(workdir: Path) -> dict[str, Any]:
    """Eval generation as ``evaluate`` runs it: the base and the fine-tuned adapter answer the 200 test prompts,
    each as one batch through vLLM (adapter loaded at runtime) vs sequential transformers / PEFT generate."""
    import json as _json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from infra.vllm_server import VllmLaunch, complete, load_lora_adapter, start_vllm
    from tasks.generation import greedy_generate, instruction_prompt

    base, _ = _base(workdir)
    adapter = _demo_adapter(workdir)
    max_new_tokens = _demo_config(workdir).evaluate.max_new_tokens
    rows = [_json.loads(line) for line in (workdir / "demo-task" / "test.jsonl").read_text().splitlines()][:200]
    prompts = [instruction_prompt(r["instruction"]) for r in rows]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base.path), AutoTokenizer.from_pretrained(base.path)
    sequential: dict[str, float] = {}
    outputs: dict[str, list[str]] = {}
    for role in ("base", "candidate"):
        if role == "candidate":
            model = PeftModel.from_pretrained(model, str(adapter))
        started = time.perf_counter()
        outputs[role] = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=1)
        sequential[role] = time.perf_counter() - started
    batched: dict[str, float] = {}
    identical: dict[str, int] = {}
    settings = load_settings()
    with start_vllm(VllmLaunch(model=Path(base.path)), python=settings.vllm_python, workdir=workdir) as server:
        load_lora_adapter(server.base_url, "candidate", adapter)
        served = {"base": "base", "candidate": "candidate"}
        for name in served.values():
            complete(server.base_url, name, prompts[:8], max_tokens=max_new_tokens)  # warm-up
        for role, name in served.items():
            started = time.perf_counter()
            out = complete(server.base_url, name, prompts, max_tokens=max_new_tokens)
            batched[role] = time.perf_counter() - started
            identical[role] = sum(a == b for a, b in zip(outputs[role], out, strict=True))
    ratio = sum(sequential.values()) / sum(batched.values())
    return {
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "sequential_transformers_s": sequential,
        "vllm_batch_s": batched,
        "identical_outputs": identical,
        "ratio": ratio,
        "ratio_base_only": sequential["base"] / batched["base"],
        "ratio_adapter_only": sequential["candidate"] / batched["candidate"],
        "goal": ">= 10",
        "met": ratio >= 10,
        "note": "vLLM-CPU applies runtime LoRA with plain torch ops that gather each token's adapter weights, so "
        "the adapter's batch costs several times the base's",
    }


@bench
def gateway_overhead(workdir: Path) -> dict[str, Any]:
    """Throughput and p50 latency through the gateway vs straight to vLLM, concurrency 16, same prompts."""
    import asyncio

    from flows.bench import eval_prompts
    from flows.serve import start_gateway_process
    from infra.vllm_server import VllmLaunch, start_vllm
    from serving.loadgen import LoadSpec, run_load

    base, _ = _base(workdir)
    _demo_config(workdir)
    prompts = eval_prompts(workdir / "demo-task" / "test.jsonl", limit=128)
    settings = load_settings()
    import statistics

    import psutil

    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
    gateway_cpu_s, gateway_requests = 0.0, 0
    with start_vllm(VllmLaunch(model=Path(base.path)), python=settings.vllm_python, workdir=workdir) as server:
        proc, gateway = start_gateway_process(
            workdir, vllm_url=server.base_url, env={"TUNESHIP_GATEWAY_ALIASES": '{"champion": "base"}'}
        )
        cpu = psutil.Process(proc.proc.pid)
        with proc:
            targets = {"direct": (server.base_url, "base"), "gateway": (gateway, "champion")}
            for _ in range(9):  # alternate, so drift on a noisy machine hits both sides alike
                for side, (url, model) in targets.items():
                    spec = LoadSpec(
                        url=url, model=model, concurrency=16, requests=96, warmup=16, max_tokens=32, ignore_eos=True
                    )
                    before = sum(cpu.cpu_times()[:2])
                    runs[side].append(asyncio.run(run_load(spec, prompts)).summary())
                    if side == "gateway":
                        gateway_cpu_s += sum(cpu.cpu_times()[:2]) - before
                        gateway_requests += spec.requests + spec.warmup

    # Paired by round (each gateway round ran right after its direct round): medians of the per-round figures.
    pairs = list(zip(runs["direct"], runs["gateway"], strict=True))
    ratios = [g["output_tokens_per_s"] / d["output_tokens_per_s"] for d, g in pairs]
    added_ms = [(g["latency_s"]["p50"] - d["latency_s"]["p50"]) * 1000 for d, g in pairs]
    ratio, added_p50_ms = statistics.median(ratios), statistics.median(added_ms)
    return {
        "runs": runs,
        "ratio": ratio,
        "added_p50_ms": added_p50_ms,
        "round_ratios": ratios,
        "round_added_p50_ms": added_ms,
        "gateway_cpu_ms_per_request": gateway_cpu_s / gateway_requests * 1000,
        "errors": sum(r["errors"] for v in runs.values() for r in v),
        "note": "on 2 cores the gateway process takes CPU from vLLM itself; its own CPU per request is the "
        "machine-independent cost",
        "goal": ">= 0.95 throughput, added p50 <= 5 ms",
        "met": ratio >= 0.95 and added_p50_ms <= 5,
    }


@bench
def gateway_isolated(workdir: Path) -> dict[str, Any]:
    """The gateway's own cost in front of a fixed-rate upstream (tests/benchmarks/fixed_rate_upstream.py), not
    vLLM: CPU-ms per streamed 64-token request (user and kernel), and the latency it adds at concurrency 16 and
    at 40 requests/s, on a core of its own. The default (uvloop + httptools, the direct relay, the fast lane), the
    same without the fast lane (TUNESHIP_GATEWAY_FAST_LANE=false: every request through FastAPI's whole path), the
    same server with streams on the general path (TUNESHIP_GATEWAY_DIRECT_RELAY=false), uvicorn's pure-Python pair,
    and the floor: a bare relay with no framework and no checks (tests/benchmarks/bare_relay.py), in one run; then
    the default and the floor again with vLLM's stream interval at 8 (TUNESHIP_VLLM_STREAM_INTERVAL, or a
    request's stream_interval: 9 chunks for 64 tokens, not 64); and the default reaching the upstream on a Unix
    socket (TUNESHIP_VLLM_UDS, vLLM's --uds) instead of loopback TCP."""
    from tests.benchmarks.overhead import run_variant, start_upstream

    socket = Path(tempfile.mkdtemp(prefix="tuneship-bench-")) / "engine.sock"  # a socket's path: 107 bytes at most
    upstream, url = start_upstream(ttft_ms=10, token_ms=5, uds=socket)
    floor_name, grouped, grouped_floor, unix = (
        "bare relay (the floor: no framework, no checks)",
        "uvloop+httptools, direct relay, stream interval 8",
        "bare relay, stream interval 8",
        "uvloop+httptools, direct relay, engine on a Unix socket",
    )
    try:
        variants = {
            name: run_variant(
                name,
                url,
                loop=loop,
                http=http,
                direct=direct,
                lane=lane,
                bare=name.startswith("bare"),
                interval=interval,
                engine=f"unix:{socket}" if name == unix else None,
            )
            for name, loop, http, direct, lane, interval in (
                ("uvloop+httptools, direct relay", "uvloop", "httptools", True, True, 1),
                ("uvloop+httptools, direct relay, no fast lane", "uvloop", "httptools", True, False, 1),
                ("uvloop+httptools, general path", "uvloop", "httptools", False, True, 1),
                ("asyncio+h11 (general path)", "asyncio", "h11", True, True, 1),
                (floor_name, "uvloop", "httptools", True, True, 1),
                (unix, "uvloop", "httptools", True, True, 1),
                (grouped, "uvloop", "httptools", True, True, 8),
                (grouped_floor, "uvloop", "httptools", True, True, 8),
            )
        }
    finally:
        upstream.terminate()
        shutil.rmtree(socket.parent, ignore_errors=True)
    shipped = variants["uvloop+httptools, direct relay"]
    cpu, c16 = shipped["cpu_ms_per_streamed_request"], shipped["concurrency_16"]
    floor = variants[floor_name]
    return {
        "variants": variants,
        "ratio": cpu,
        "cpu_ms_per_streamed_request": cpu,
        "kernel_ms_per_streamed_request": shipped["kernel_ms_per_streamed_request"],
        "added_path_p50_ms": c16["added_path_p50_ms"],
        "added_path_p99_ms": c16["added_path_p99_ms"],
        "added_path_ttfb_p50_ms": c16["added_path_ttfb_p50_ms"],
        "added_p50_ms": c16["added_p50_ms"],
        "added_p99_ms": c16["added_p99_ms"],
        "added_ttfb_p50_ms": c16["added_ttfb_p50_ms"],
        "floor_cpu_ms_per_streamed_request": floor["cpu_ms_per_streamed_request"],
        "floor_kernel_ms_per_streamed_request": floor["kernel_ms_per_streamed_request"],
        "interval_8_cpu_ms_per_streamed_request": variants[grouped]["cpu_ms_per_streamed_request"],
        "interval_8_floor_cpu_ms_per_streamed_request": variants[grouped_floor]["cpu_ms_per_streamed_request"],
        "interval_8_added_path_p50_ms": variants[grouped]["concurrency_16"]["added_path_p50_ms"],
        "interval_8_added_path_p99_ms": variants[grouped]["concurrency_16"]["added_path_p99_ms"],
        "unix_socket_cpu_ms_per_streamed_request": variants[unix]["cpu_ms_per_streamed_request"],
        "unix_socket_kernel_ms_per_streamed_request": variants[unix]["kernel_ms_per_streamed_request"],
        "unix_socket_added_path_p50_ms": variants[unix]["concurrency_16"]["added_path_p50_ms"],
        "unix_socket_added_path_p99_ms": variants[unix]["concurrency_16"]["added_path_p99_ms"],
        "goal": "<= 1.0 CPU-ms per 64-token stream, added p50 <= 1 ms, p99 <= 5 ms at concurrency 16",
        "met": cpu <= 1.0 and c16["added_path_p50_ms"] <= 1 and c16["added_path_p99_ms"] <= 5,  # a chunk per token
        "note": "the gateway runs on a core of its own, the load generator and the upstream on the other(s). "
        "added_path_*: what the gateway adds to the path's part of the latency (the request's way to the upstream "
        "and the first / last token's way back, from the upstream's clock readings in its chunks), which leaves "
        "out the upstream's own schedule; added_*: the whole latency's percentiles, via the gateway less direct, "
        "which include that schedule's noise. The CPU-ms figure is the gateway process's own (from /proc). Its "
        "kernel part is the socket reads and writes every relay makes, one of each per token at least; the bare "
        "relay's figure is the floor under any relay written in Python on this machine",
    }


@bench
def request_log(workdir: Path) -> dict[str, Any]:
    """The request log's CPU cost per request in the gateway: (1) the request path alone (issuing the id and
    queueing the record, in-process), (2) the writer's work per record (parse, scrub, gzip, write a segment), and
    (3) end to end, the gateway process's CPU-ms per request with the log on and off in front of the fixed-rate
    upstream, alternating, in one run."""
    import statistics

    from infra.artifacts import ArtifactStore, LocalBackend
    from infra.segments import new_request_id
    from serving.request_log import RequestLog, RequestLogConfig
    from tests.benchmarks.overhead import run_variant, start_upstream

    store = ArtifactStore(LocalBackend(workdir / "store"), workdir / "cache")
    log = RequestLog(store, RequestLogConfig(max_pending=1_000_000))
    prompt = "### Instruction:\nHow many customers joined in 2021 in Lagos?\n\n### Response:\n"
    chunk = json.dumps({"id": "cmpl-x", "choices": [{"index": 0, "text": " tok", "finish_reason": None}]}).encode()
    count = 20_000
    started = time.perf_counter()
    for _ in range(count):  # what a route does per request: issue the id, queue the raw record
        rid = new_request_id()
        log.issued(rid, log.key_id("bench-key"), "base")
        log.completed(
            request_id=rid, key_id=log.key_id("bench-key"), route="/v1/completions", alias="champion", served="base",
            latency_s=0.1, prompt=prompt, chunks=[chunk] * 64,
        )  # fmt: skip
    request_path_us = (time.perf_counter() - started) / count * 1e6
    started = time.process_time()
    log.start()
    log.close()  # the writer: every queued record parsed, scrubbed, compressed and written
    writer_us = (time.process_time() - started) / count * 1e6

    upstream, url = start_upstream(ttft_ms=10, token_ms=5)
    on: list[dict[str, Any]] = []
    off: list[dict[str, Any]] = []
    try:
        for round_ in range(3):  # alternate: drift on a noisy machine hits both alike
            off.append(run_variant("log off", url, rounds=1, requests=192))
            on.append(run_variant("log on", url, rounds=1, requests=192, log_dir=workdir / f"gateway-log-{round_}"))
    finally:
        upstream.terminate()
    stream_delta = statistics.median(
        a["cpu_ms_per_streamed_request"] - b["cpu_ms_per_streamed_request"] for a, b in zip(on, off, strict=True)
    )
    plain_delta = statistics.median(
        a["cpu_ms_per_plain_request"] - b["cpu_ms_per_plain_request"] for a, b in zip(on, off, strict=True)
    )
    per_request_ms = (request_path_us + writer_us) / 1000
    return {
        "request_path_us": request_path_us,
        "writer_us_per_record": writer_us,
        "ratio": per_request_ms,
        "cpu_ms_per_request": per_request_ms,
        "gateway_cpu_ms_added_per_stream": stream_delta,
        "gateway_cpu_ms_added_per_plain_request": plain_delta,
        "streamed_64_tokens": {"log_on": on, "log_off": off},
        "goal": "<= 0.1 CPU-ms per request (request path + writer, full mode, 64-chunk stream)",
        "met": per_request_ms <= 0.1,
        "note": "the end-to-end deltas are differences of two noisy CPU figures of the gateway process; the first "
        "two figures are the log's own work, measured alone",
    }


@bench
def curation_throughput(workdir: Path) -> dict[str, Any]:
    """Curation over 100,000 logged requests, 2 % of them corrected (validated on the demo database): rows/s."""
    import random

    from infra.artifacts import ArtifactStore, LocalBackend
    from infra.prompts import alpaca_prompt
    from infra.segments import new_request_id
    from offline.demo_task import PARAPHRASE, generate
    from serving.request_log import Origin, RequestLog, RequestLogConfig
    from tasks.curate import curate

    cfg = _demo_config(workdir, f"evaluate.database={workdir / 'demo-task' / 'retail.db'}")
    store = ArtifactStore(LocalBackend(workdir / "store"), workdir / "cache")
    import sqlite3

    db = sqlite3.connect(workdir / "demo-task" / "retail.db")
    asked = list(generate(db, PARAPHRASE, 2000, seed=99, exclude=set()).values())
    log = RequestLog(store, RequestLogConfig(flush_records=5000, max_pending=200_000))
    rng = random.Random(5)
    total = 100_000
    for n in range(total):
        question, gold = asked[n % len(asked)]
        rid = new_request_id()
        log.completed(
            request_id=rid, key_id="k", route="/generate", alias="champion", served="retail-sql-v1", latency_s=0.2,
            prompt=alpaca_prompt(f"{question} (#{n})"), text="SELECT 1", finish_reason="stop", usage={},
        )  # fmt: skip
        if rng.random() < 0.02:
            log.rate(rid, "k", Origin(key_id="k", served="retail-sql-v1"), rating="down", correction=gold, comment=None)
    log.start()
    log.close()
    started = time.perf_counter()
    ref = curate(cfg, store=store, workdir=workdir / "work")
    seconds = time.perf_counter() - started
    return {
        "logged_requests": total,
        "feedback": ref.counts["rows_in"],
        "kept": ref.counts["kept"],
        "reasons": ref.reasons,
        "seconds": seconds,
        "ratio": total / seconds,
        "rows_per_s": total / seconds,
        "goal": "reported (rows/s over 100k logged requests)",
        "met": True,
    }


@bench
def serving_vs_naive(workdir: Path) -> dict[str, Any]:
    """64 concurrent requests: vLLM's continuous batching vs the seed's per-request ``model.generate``."""
    import asyncio
    import statistics

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.bench import eval_prompts
    from infra.vllm_server import VllmLaunch, start_vllm
    from serving.loadgen import LoadSpec, run_load

    base, _ = _base(workdir)
    _demo_config(workdir)
    prompts = eval_prompts(workdir / "demo-task" / "test.jsonl", limit=64)
    new_tokens = 64
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base.path), AutoTokenizer.from_pretrained(base.path)
    started = time.perf_counter()
    generated = 0
    with torch.inference_mode():
        for prompt in prompts:  # one request at a time, as a handler calling model.generate would serve them
            ids = tokenizer(prompt, return_tensors="pt")
            out = model.generate(
                **ids,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            generated += out.shape[1] - ids["input_ids"].shape[1]
    naive_tps = generated / (time.perf_counter() - started)
    settings = load_settings()
    rates: dict[str, list[float]] = {"whole": [], "streamed": []}
    with start_vllm(VllmLaunch(model=Path(base.path)), python=settings.vllm_python, workdir=workdir) as server:
        for _ in range(3):  # alternate: on 2 cores vLLM's own processes sometimes starve each other for a round
            for mode in rates:
                spec = LoadSpec(
                    url=server.base_url,
                    model="base",
                    concurrency=64,
                    requests=64,
                    warmup=8,
                    max_tokens=new_tokens,
                    ignore_eos=True,
                    stream=mode == "streamed",
                )
                rates[mode].append(asyncio.run(run_load(spec, prompts)).summary()["output_tokens_per_s"])
    whole, streamed = statistics.median(rates["whole"]), statistics.median(rates["streamed"])
    return {
        "naive_generate_tokens_per_s": naive_tps,
        "vllm_tokens_per_s": whole,
        "vllm_streamed_tokens_per_s": streamed,
        "rounds_tokens_per_s": rates,
        "ratio": whole / naive_tps,
        "ratio_streamed": streamed / naive_tps,
        "goal": ">= 10",
        "met": whole / naive_tps >= 10,
        "note": "ratio: whole completions, as the naive handler returns them; ratio_streamed: SSE, one event "
        "per token through vLLM's API server",
    }


@bench
def hot_swap(workdir: Path) -> dict[str, Any]:
    """Deploying a new version into a running server (load, smoke test, switch, drain, unload) vs restarting it."""
    from infra.services import free_port
    from infra.tracking import MlflowTracker
    from infra.vllm_server import VllmLaunch, load_lora_adapter, start_vllm
    from serving.app import GatewayConfig, create_app
    from serving.catalog import RegistrySource
    from serving.server import serve_in_thread
    from serving.upstream import VllmUpstream
    from tasks.config import DeployConfig
    from tasks.deploy import deploy
    from tasks.evaluate import evaluate
    from tasks.finetune import finetune
    from tasks.preprocess import preprocess
    from tasks.register import register

    base, store = _base(workdir)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    tracker = MlflowTracker(uri, system_metrics=False)

    def config(steps: int) -> Any:
        return _demo_config(
            workdir,
            "registry.model_name=bench-swap",
            "evaluate.max_examples=16",
            "evaluate.parity_sample=4",
            f"evaluate.database={workdir / 'demo-task' / 'retail.db'}",
            f"finetune.train.max_steps={steps}",
        )

    first = config(20)
    data = preprocess(first.preprocess, first.data, name=first.name, base=base, store=store, workdir=workdir / "work")
    settings = load_settings()
    launch = VllmLaunch(model=Path(base.path))
    with start_vllm(launch, python=settings.vllm_python, workdir=workdir) as server:
        versions, adapters = [], []
        for steps in (20, 40):  # two short runs: two different adapters
            cfg = config(steps)
            adapter = finetune(
                cfg.finetune, data, name=cfg.name, base=base, store=store, tracker=tracker, workdir=workdir / "work"
            )
            report = evaluate(
                cfg.evaluate,
                adapter,
                data,
                base=base,
                store=store,
                tracker=tracker,
                workdir=workdir / "work",
                server_url=server.base_url,
                served_base="base",
            )
            versions.append(register(cfg, adapter, report, data, store=store, tracker=tracker))
            adapters.append(adapter)
        config = GatewayConfig(aliases={"base": "base"}, admin_keys=["bench"], registry_refresh_s=3600)
        app = create_app(config, VllmUpstream(server.base_url), None, RegistrySource(uri, store))
        with serve_in_thread(app, port=free_port()) as gateway:
            swaps = []
            for version in versions + versions:
                dep = deploy(
                    "bench-swap",
                    version.version,
                    DeployConfig(),
                    store=store,
                    tracking_uri=uri,
                    vllm_url=server.base_url,
                    gateway_url=gateway,
                    admin_key="bench",
                )
                swaps.append(dep.swap_s)
    started = time.perf_counter()  # the alternative: restart vLLM and load the adapter into the fresh server
    with start_vllm(launch, python=settings.vllm_python, workdir=workdir) as server:
        load_lora_adapter(server.base_url, "restarted", store.get_dir(adapters[-1].artifact))
        restart_s = time.perf_counter() - started
    later = sorted(swaps[1:])  # the first deploy also warms the path up
    swap_s = later[len(later) // 2]
    return {
        "swap_s": swaps,
        "median_swap_s": swap_s,
        "restart_s": restart_s,
        "ratio": swap_s / restart_s,
        "goal": "swap <= 5 s (vs a restart ≈ 60 s)",
        "met": swap_s <= 5,
    }


def _sql_accuracy(url: str, model: str, task: Path, limit: int = 200) -> float:
    """Execution accuracy of ``model`` at ``url`` on the first ``limit`` questions of the demo's test split."""
    from infra.vllm_server import complete
    from tasks.generation import instruction_prompt
    from tasks.sql_exec import connect_readonly, execute_sql, is_ordered, results_match

    rows = [json.loads(line) for line in (task / "test.jsonl").read_text().splitlines()[:limit]]
    answers = complete(url, model, [instruction_prompt(r["instruction"]) for r in rows], max_tokens=96)
    conn = connect_readonly(task / "retail.db")
    right = 0
    for row, answer in zip(rows, answers, strict=True):
        gold, pred = execute_sql(conn, row["response"]), execute_sql(conn, answer.strip())
        right += pred.ok and results_match(gold.rows, pred.rows, ordered=is_ordered(row["response"]))
    return right / len(rows)


def _adapter_variant(adapter: Path, out: Path, seed: int) -> Path:
    """A copy of ``adapter`` with its LoRA weights scaled by a seeded factor per tensor: as many distinct adapters
    as needed, each exactly as costly to serve as a trained one (same rank, same target modules)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out, dirs_exist_ok=True)
    weights = load_file(adapter / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    scaled = {k: v * (1 + 0.05 * torch.randn((), generator=generator)) for k, v in weights.items()}
    save_file(scaled, out / "adapter_model.safetensors")
    return out


@bench
def multi_adapter(workdir: Path) -> dict[str, Any]:
    """Many fine-tunes on one vLLM server: throughput with N = 1, 2, 4, 8 adapters receiving requests round-robin,
    at the same concurrency, against N = 1; the base and the merged weights beside them; and the cold load of an
    adapter through the gateway (fetch, sha256 check, vLLM load) on a version's first request."""
    import asyncio
    import statistics

    import httpx

    from flows.bench import eval_prompts
    from infra.registry import client, served_id
    from infra.services import free_port
    from infra.vllm_server import VllmLaunch, load_lora_adapter, quantize_w4a16, start_vllm
    from serving.app import GatewayConfig, create_app
    from serving.catalog import RegistrySource
    from serving.loadgen import LoadSpec, percentile, run_load
    from serving.server import serve_in_thread
    from serving.upstream import VllmUpstream
    from tasks.merge import merge_adapter

    adapter = _demo_adapter(workdir)
    base, store = _base(workdir)
    variants = [_adapter_variant(adapter, workdir / "variants" / str(i), seed=i) for i in range(8)]
    prompts = eval_prompts(workdir / "demo-task" / "test.jsonl", limit=64)
    settings = load_settings()

    def throughput(url: str, models: list[str]) -> float:
        spec = LoadSpec(url=url, models=models, concurrency=16, requests=128, warmup=16, max_tokens=32, ignore_eos=True)
        report = asyncio.run(run_load(spec, prompts))
        return report.summary()["output_tokens_per_s"]

    rows: dict[str, list[float]] = {}
    launch = VllmLaunch(model=Path(base.path), max_loras=8, max_cpu_loras=8)
    with start_vllm(launch, python=settings.vllm_python, workdir=workdir) as server:
        for i, variant in enumerate(variants):
            load_lora_adapter(server.base_url, f"adapter-{i}", variant)
        for _ in range(3):  # interleaved rounds: machine noise falls on every row alike
            rows.setdefault("base", []).append(throughput(server.base_url, ["base"]))
            for n in (1, 2, 4, 8):
                rows.setdefault(f"lora_n{n}", []).append(
                    throughput(server.base_url, [f"adapter-{i}" for i in range(n)])
                )

        # Cold loads through the gateway: 8 registered versions, a cap of 2 loaded, no champion to pin; each
        # version's first request loads it (from the artifact store, verified), its second is warm.
        uri = f"sqlite:///{workdir / 'mlflow.db'}"
        registry = client(uri)
        registry.create_registered_model("bench-multi")
        for i, variant in enumerate(variants):
            ref = store.put_dir(variant, f"adapters/bench-multi/{i}")
            tags = {"tuneship.adapter_uri": ref.uri, "tuneship.adapter_sha256": ref.sha256}
            registry.create_model_version("bench-multi", ref.uri, tags=tags)
        config = GatewayConfig(max_adapters=2, registry_refresh_s=3600)
        app = create_app(config, VllmUpstream(server.base_url), None, RegistrySource(uri, store))
        cold, warm = [], []
        with serve_in_thread(app, port=free_port()) as gateway, httpx.Client(base_url=gateway, timeout=120) as http:
            for _ in range(2):  # the second round loads again (evicted at the cap), from the verified cache
                for version in range(1, 9):
                    body = {"model": f"bench-multi/{version}", "prompt": prompts[0], "max_tokens": 8}
                    for sink in (cold, warm):
                        started = time.perf_counter()
                        response = http.post("/v1/completions", json=body)
                        assert response.status_code == 200, response.text
                        assert response.headers["x-served-model"] == served_id("bench-multi", str(version))
                        sink.append(time.perf_counter() - started)
            metrics = http.get("/metrics").text
        load_lora_adapter(server.base_url, "demo", adapter)
        accuracy = {"full precision (fp32)": _sql_accuracy(server.base_url, "demo", workdir / "demo-task")}
    merged = merge_adapter(Path(base.path), adapter, workdir / "merged")
    with start_vllm(VllmLaunch(model=merged, served_model_name="merged", enable_lora=False),
                    python=settings.vllm_python, workdir=workdir) as server:  # fmt: skip
        rows["merged"] = [throughput(server.base_url, ["merged"]) for _ in range(3)]
    # The seed's "Quantized (4-bit)" row: the base in W4A16 (compressed-tensors), which vLLM-CPU serves only in
    # bfloat16, with the same adapter on top; its throughput and the adapter's accuracy on it.
    quantized = quantize_w4a16(settings.vllm_python, Path(base.path), workdir / "base-w4a16", group_size=64)
    launch = VllmLaunch(model=quantized, dtype="bfloat16", max_loras=8, max_cpu_loras=8)
    with start_vllm(launch, python=settings.vllm_python, workdir=workdir) as server:
        load_lora_adapter(server.base_url, "adapter-0", variants[0])
        rows["quantized_w4a16_lora"] = [throughput(server.base_url, ["adapter-0"]) for _ in range(3)]
        load_lora_adapter(server.base_url, "demo", adapter)
        accuracy["4-bit base (W4A16, bf16)"] = _sql_accuracy(server.base_url, "demo", workdir / "demo-task")
    sizes = {
        "full precision (fp32)": sum(f.stat().st_size for f in Path(base.path).glob("*.safetensors")),
        "4-bit base (W4A16, bf16)": sum(f.stat().st_size for f in quantized.glob("*.safetensors")),
    }

    tokens_per_s = {name: statistics.median(values) for name, values in rows.items()}
    ratios = {name: tokens_per_s[name] / tokens_per_s["lora_n1"] for name in tokens_per_s}
    counted = [line.split()[1] for line in metrics.splitlines() if line.startswith("tuneship_adapter_evictions_total ")]
    cold_ms = sorted(1000 * c for c in cold)
    return {
        "tokens_per_s": tokens_per_s,
        "rounds": rows,
        "vs_n1": ratios,
        "ratio": ratios["lora_n8"],
        "cold_request_p50_ms": percentile(cold_ms, 50),
        "cold_request_p95_ms": percentile(cold_ms, 95),
        "warm_request_p50_ms": percentile(sorted(1000 * w for w in warm), 50),
        "evictions": float(counted[0]),
        "adapter_accuracy": accuracy,
        "base_weight_bytes": sizes,
        "setup": "vLLM-CPU, max_loras 8, concurrency 16, 32 output tokens (ignore_eos), demo adapter r=16 all linear",
        "goal": "N = 8 adapters round-robin >= 0.9x the throughput of N = 1",
        "met": ratios["lora_n8"] >= 0.9,
    }


@bench
def flow_cache_rerun(workdir: Path) -> dict[str, Any]:
    """The retrain flow run twice on unchanged inputs: the second run's wall time against the first's."""
    import os
    import subprocess

    env = {
        **os.environ,
        "TUNESHIP_HOME": str(workdir / "home"),
        "PREFECT_HOME": str(workdir / "prefect"),
        "TUNESHIP_VLLM_URL": "local",
    }
    for key in ("PREFECT_API_URL", "TUNESHIP_GATEWAY_URL", "TUNESHIP_ARTIFACT_ROOT", "TUNESHIP_MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    argv = [
        sys.executable,
        "-m",
        "flows.retrain",
        "--no-deploy",
        "--set",
        "finetune.train.max_steps=300",
        "--set",
        "evaluate.max_examples=100",
    ]
    times = []
    for _ in range(2):
        started = time.perf_counter()
        subprocess.run(argv, cwd=REPO, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return {
        "first_s": times[0],
        "second_s": times[1],
        "ratio": times[1] / times[0],
        "goal": "<= 0.10",
        "met": times[1] / times[0] <= 0.10,
    }


@bench
def gpu_training_mfu(workdir: Path) -> dict[str, Any]:
    """On a GPU: bf16 training steps of a random ~1B Llama, tokens/s and MFU (see tests/benchmarks/gpu_mfu.py)."""
    from tests.benchmarks.gpu_mfu import measure

    return measure()


def summary(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| benchmark | measured | goal | met |", "|---|---|---|---|"]
    for name, result in results.items():
        if "skipped" in result:
            lines.append(f"| {name} | skipped: {result['skipped']} | {result.get('goal', '')} | – |")
            continue
        measured = result.get("ratio", result.get("mfu"))
        shown = f"{measured:.3g}×" if isinstance(measured, float) else str(measured)
        if "cpu_ms_per_streamed_request" in result:
            shown = (
                f"{result['cpu_ms_per_streamed_request']:.2f} CPU-ms/stream (the bare relay's floor "
                f"{result['floor_cpu_ms_per_streamed_request']:.2f}); added on the path p50 "
                f"{result['added_path_p50_ms']:+.1f} ms, p99 {result['added_path_p99_ms']:+.1f} ms, TTFB "
                f"{result['added_path_ttfb_p50_ms']:+.1f} ms (whole latency p50 {result['added_p50_ms']:+.1f} ms, "
                f"p99 {result['added_p99_ms']:+.1f} ms)"
            )
            if "interval_8_cpu_ms_per_streamed_request" in result:
                shown += (
                    f"; at stream interval 8: {result['interval_8_cpu_ms_per_streamed_request']:.2f} CPU-ms/stream "
                    f"(floor {result['interval_8_floor_cpu_ms_per_streamed_request']:.2f})"
                )
            if "unix_socket_cpu_ms_per_streamed_request" in result:
                unix = result["unix_socket_cpu_ms_per_streamed_request"]
                shown += f"; vLLM on a Unix socket: {unix:.2f} CPU-ms/stream"
        elif "added_p50_ms" in result:
            shown += (
                f", p50 {result['added_p50_ms']:+.0f} ms, {result['gateway_cpu_ms_per_request']:.1f} CPU-ms/request"
            )
        for key, label in (("ratio_base_only", "base only"), ("ratio_streamed", "streamed")):
            if key in result:
                shown += f" ({label} {result[key]:.3g}×)"
        if "writer_us_per_record" in result:
            shown = (
                f"{result['cpu_ms_per_request']:.3f} CPU-ms/request (request path {result['request_path_us']:.1f} µs "
                f"+ writer {result['writer_us_per_record']:.0f} µs); gateway end to end "
                f"{result['gateway_cpu_ms_added_per_stream']:+.2f} CPU-ms/stream"
            )
        if "rows_per_s" in result:
            shown = f"{result['rows_per_s']:,.0f} logged requests/s ({result['seconds']:.1f} s for 100k)"
        if "median_swap_s" in result:
            shown += f" ({result['median_swap_s']:.2f} s swap vs {result['restart_s']:.0f} s restart)"
        if "cold_request_p50_ms" in result:
            by_n = ", ".join(f"N={n} {result['vs_n1'][f'lora_n{n}']:.2f}×" for n in (2, 4, 8))
            acc = list(result["adapter_accuracy"].values())
            shown = (
                f"{by_n} of N=1; base {result['vs_n1']['base']:.2f}×, merged {result['vs_n1']['merged']:.2f}×, "
                f"4-bit base + LoRA {result['vs_n1']['quantized_w4a16_lora']:.2f}× (accuracy {acc[1]:.1%} vs "
                f"{acc[0]:.1%}); cold request p50 {result['cold_request_p50_ms']:.0f} ms, "
                f"p95 {result['cold_request_p95_ms']:.0f} ms"
            )
        if "first_s" in result:
            shown += f" ({result['second_s']:.1f} s vs {result['first_s']:.0f} s)"
        lines.append(f"| {name} | {shown} | {result.get('goal', '')} | {'yes' if result.get('met') else 'no'} |")
    return "\n".join(lines) + "\n"


def main(names: list[str]) -> None:
    RESULTS.mkdir(exist_ok=True)
    chosen = names or list(BENCHES)
    unknown = set(chosen) - set(BENCHES)
    if unknown:
        sys.exit(f"unknown benchmark(s) {sorted(unknown)}; choose from {sorted(BENCHES)}")
    results = {}
    for name in chosen:
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            started = time.perf_counter()
            result = BENCHES[name](Path(tmp))
        result["wall_s"] = time.perf_counter() - started
        result["machine"] = f"{platform.machine()}, {__import__('os').cpu_count()} cores"
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
        results[name] = result
        print(f"{name}: {json.dumps(result, default=str)}", flush=True)
    table = summary(results)
    (RESULTS / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
