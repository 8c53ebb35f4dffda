"""``make demo`` / ``tuneship demo``: the pipeline on embedded defaults, as far as it is built.

Builds (or reuses) the offline base model and the demo task, preprocesses and fine-tunes a LoRA adapter with
the ``tiny-cpu`` preset (MLflow-tracked, checkpoints in the artifact store), evaluates base vs fine-tuned vs
the current champion through a vLLM server (launched locally unless ``TUNESHIP_VLLM_URL`` names one),
registers the adapter in MLflow and runs the promotion gate, then puts the FastAPI gateway in front of vLLM
and sends a streaming ``/generate`` (base and champion) and a ``/generate/batch`` request through it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from infra.artifacts import open_store
from infra.base_model import resolve_base_model
from infra.demo_task import build_demo_task
from infra.services import free_port
from infra.settings import Settings
from infra.tracking import MlflowTracker
from infra.vllm_server import VllmLaunch, load_lora_adapter, start_vllm
from serving.app import GatewayConfig, create_app
from serving.server import serve_in_thread
from serving.upstream import VllmUpstream
from tasks.config import load_run_config
from tasks.evaluate import evaluate
from tasks.finetune import finetune
from tasks.generation import instruction_prompt
from tasks.preprocess import preprocess
from tasks.register import champion_adapter, promote, register
from tasks.sql_exec import connect_readonly, execute_sql, is_ordered, results_match

PRESET = Path(__file__).resolve().parents[1] / "deployments" / "configs" / "tiny-cpu.yaml"


@contextlib.contextmanager
def _vllm(settings: Settings, model: Path, name: str) -> Iterator[str]:
    if settings.vllm_url != "local":
        yield settings.vllm_url
        return
    launch = VllmLaunch(model=model, served_model_name=name, device=settings.vllm_device)
    with start_vllm(launch, python=settings.vllm_python, workdir=settings.home / "services") as server:
        yield server.base_url


def stream_generate(gateway_url: str, model: str, prompt: str, *, max_tokens: int = 96) -> Iterator[str]:
    """Text deltas from the gateway's ``POST /generate`` server-sent events."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{gateway_url}/generate", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line.removeprefix("data: "))
                if "text" in event:
                    yield event["text"]


def run_demo(settings: Settings, *, say: Callable[[str], None] = print) -> dict[str, object]:
    """Run the demo end to end and return what it measured."""
    store = open_store(settings)
    base = resolve_base_model("tuneship/sql-small", store=store, cache_dir=settings.cache_dir, log=say)
    say(f"base model: {base.id} ({base.path})")
    task_dir = settings.home / "demo-task"
    counts = build_demo_task(task_dir)
    say(f"demo task: {counts['train']} train / {counts['test']} test questions in {task_dir}")

    cfg = load_run_config(
        PRESET,
        [
            f"data.source={task_dir / 'train.jsonl'}",
            f"data.test_file={task_dir / 'test.jsonl'}",
            f"evaluate.database={task_dir / 'retail.db'}",
        ],
    )
    data = preprocess(cfg, base=base, store=store, workdir=settings.home / "work")
    say(f"preprocess: {data.stats.splits}, {data.stats.rejected} rejected → {data.artifact.uri}")
    tracker = MlflowTracker.from_settings(settings)
    adapter = finetune(cfg, data, base=base, store=store, tracker=tracker, workdir=settings.home / "work")
    metrics = adapter.metrics
    say(
        f"fine-tune: {metrics['global_step']:.0f} steps, train loss {metrics['train_loss']:.3f}, "
        f"eval loss {metrics.get('eval_loss', float('nan')):.3f}, {metrics['tokens_per_s']:.0f} tokens/s "
        f"→ {adapter.artifact.uri} (MLflow run {adapter.mlflow_run_id})"
    )

    champion = champion_adapter(cfg.model_name, tracking_uri=settings.mlflow_tracking_uri, store=store)
    with _vllm(settings, Path(base.path), "base") as url:
        say(f"vLLM: {url}")
        report = evaluate(cfg, adapter, data, base=base, store=store, tracker=tracker, champion=champion,
                          server_url=url, served_base="base", workdir=settings.home / "work")  # fmt: skip
        m = report.metrics
        vs_base = report.comparisons["base"]
        say(
            f"evaluate ({report.n_examples} test questions, through vLLM): execution accuracy base "
            f"{m['accuracy_base']:.1%} → fine-tuned {m['accuracy_candidate']:.1%} (95% CI of the gain "
            f"[{vs_base.ci_low:+.1%}, {vs_base.ci_high:+.1%}]); perplexity {m['perplexity_base']:.1f} → "
            f"{m['perplexity_candidate']:.2f}; PEFT/vLLM parity {m['parity_agreement']:.0%}"
        )
        if "champion" in report.comparisons:
            vs = report.comparisons["champion"]
            say(f"  vs the current champion: {vs.accuracy_diff:+.1%} [{vs.ci_low:+.1%}, {vs.ci_high:+.1%}]")
        say(f"  report: {report.artifact.uri}")
        version = register(cfg, adapter, report, data, store=store, tracking_uri=settings.mlflow_tracking_uri)
        decision = promote(cfg, version, report, tracking_uri=settings.mlflow_tracking_uri)
        verdict = "promoted to @champion" if decision.promoted else "kept as @challenger"
        say(f"register: {version.uri} {verdict} — {decision.reasons()}")

        # The gateway routes by alias: champion is whatever the registry says now (maybe an earlier run),
        # challenger is this run's adapter.
        champion_now = champion_adapter(cfg.model_name, tracking_uri=settings.mlflow_tracking_uri, store=store)
        aliases = {"base": "base"}
        for alias, ref in (("champion", champion_now), ("challenger", adapter)):
            if ref is not None:
                aliases[alias] = f"adapter-{ref.sha256[:16]}"
                load_lora_adapter(url, aliases[alias], store.get_dir(ref.artifact))
        question = json.loads((task_dir / "test.jsonl").read_text().splitlines()[0])
        conn = connect_readonly(task_dir / "retail.db")
        gold = execute_sql(conn, question["response"])

        def verdict(sql: str) -> str:
            pred = execute_sql(conn, sql)
            ok = pred.ok and results_match(gold.rows, pred.rows, ordered=is_ordered(question["response"]))
            return "correct" if ok else "wrong"

        gateway = create_app(GatewayConfig(aliases=aliases), VllmUpstream(url))
        with serve_in_thread(gateway, port=free_port()) as gw:
            say(f"gateway: {gw} (aliases: {aliases})")
            say(f"question: {question['instruction']}")
            for model in ("base", "champion"):
                answer = "".join(stream_generate(gw, model, instruction_prompt(question["instruction"])))
                say(f"  POST /generate model={model:<8} (SSE): {answer}  → {verdict(answer)}")
            batch = [json.loads(line) for line in (task_dir / "test.jsonl").read_text().splitlines()[1:4]]
            body = {
                "prompts": [instruction_prompt(r["instruction"]) for r in batch],
                "max_tokens": 96,
                "temperature": 0,
            }
            results = httpx.post(f"{gw}/generate/batch", json=body, timeout=120).json()["results"]
            say("  POST /generate/batch (champion):")
            for row, result in zip(batch, results, strict=True):
                say(f"    {row['instruction']} → {result.get('text', result.get('error'))}")
    scores = {"base": m["accuracy_base"], "candidate": m["accuracy_candidate"]}
    return {"scores": scores, "adapter": adapter.artifact.uri, "report": report.artifact.uri, "version": version.uri}
