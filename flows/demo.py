"""``make demo`` / ``tuneship demo``: the whole pipeline on embedded defaults, through the Prefect flow.

1. loads the offline base model (the repository's pinned checkpoint) and publishes the demo task to the artifact
   store under ``data/retail-sql``, where a customer's data would be (``tuneship artifacts put``);
2. starts a local ``prefect server`` (unless ``PREFECT_API_URL`` names one, see ``flows/prefect_api.py``) and
   the serving stack beside it: a vLLM server (launched locally unless ``TUNESHIP_VLLM_URL`` names one) and the
   FastAPI gateway in front of it;
3. runs the ``retrain`` flow on ``deployments/configs/tiny-cpu.yaml`` — the same run config the scheduled
   deployment trains on — (preprocess → fine-tune → evaluate → register + gate → deploy) against that stack:
   a promoted model is hot-swapped into the gateway's ``champion`` alias;
4. runs the same flow on a second task (``clinic-cpu.yaml``: another database, another registered model) on the
   same base, so the gateway serves both fine-tunes side by side from one vLLM server (docs/multi-adapter.md);
5. sends one streaming ``/generate`` and one ``/generate/batch`` request through the gateway and prints them,
   one question of each task to each fine-tune, the evaluation comparison and where the report, the MLflow run
   and the Prefect run are.

A second ``make demo`` reuses the caches: the flow's stages come back from Prefect's result cache.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from flows.prefect_api import configured_api_url, launch_local_server, prefect_api
from flows.serve import gateway_config, local_vllm, request_log, upstream
from infra.artifacts import open_store
from infra.registry import RegistryError, base_of, get_version
from infra.services import free_port
from infra.settings import Settings, environ
from offline.clinic_task import build_clinic_task
from offline.demo_task import build_demo_task
from serving.app import create_app
from serving.catalog import RegistrySource
from serving.server import serve_in_thread
from tasks.base_model import resolve_base_model
from tasks.config import DeployConfig
from tasks.deploy import Gateway, deploy
from tasks.generation import instruction_prompt
from tasks.refs import split_metric
from tasks.sql_exec import connect_readonly, execute_sql, is_ordered, results_match

MODEL = "retail-sql"
CONFIG = "deployments/configs/tiny-cpu.yaml"
# The metrics the demo prints for each test split.
SPLIT_LINE = (
    "examples",
    "accuracy_base",
    "accuracy_candidate",
    "ci_low_vs_base",
    "ci_high_vs_base",
    "invented_identifiers_candidate",
)
DATA_KEY = "data/retail-sql"  # where tiny-cpu.yaml reads its data: artifact://data/retail-sql/…
CLINIC_CONFIG = "deployments/configs/clinic-cpu.yaml"  # the second task, served beside the first
CLINIC_DATA_KEY = "data/clinic-sql"


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


def run_demo(
    settings: Settings,
    *,
    overrides: list[str] | None = None,
    compare: bool = True,
    second_task: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, object]:
    """Run the demo end to end and return what it measured.

    ``second_task`` also trains ``clinic-sql`` (``offline/clinic_task.py``) on the same base and serves both
    fine-tunes side by side through the gateway, from one vLLM server.

    ``overrides`` are dotted run-config overrides (e.g. a shorter fine-tune); ``compare=False`` leaves out the
    serving comparison and cost report (a second vLLM server with the merged weights).
    """
    from flows.retrain import RetrainParams, retrain

    store = open_store(settings)
    base = resolve_base_model("tuneship/sql-small", store=store, cache_dir=settings.cache_dir, log=say)
    say(f"base model: {base.id} ({base.path})")
    task_dir = settings.home / "demo-task"
    counts = build_demo_task(task_dir)
    data = store.put_dir(task_dir, DATA_KEY, overwrite=True)
    say(
        f"demo task: {counts['train']} train / {counts['test']} test / {counts['test_paraphrase']} paraphrase-test "
        f"questions in {task_dir}, published as {data.uri}"
    )

    admin_key = settings.admin_key or secrets.token_urlsafe(24)
    # Prefect's server and vLLM start side by side; each is waited on until it answers (or dies), not timed.
    with contextlib.ExitStack() as stack:
        prefect = None if configured_api_url() else stack.enter_context(launch_local_server(settings))
        vllm_url = stack.enter_context(local_vllm(settings, Path(base.path)))
        say(f"vLLM: {vllm_url}")
        stack.enter_context(prefect_api(settings, server=prefect, say=say))
        log = request_log(settings, store)  # as `tuneship serve` runs it: every completion logged, scrubbed
        registry = RegistrySource(settings.mlflow_tracking_uri, store, (base.id, base.revision))
        config = gateway_config(settings, admin_keys=[admin_key])
        app = create_app(config, upstream(settings, vllm_url), log, registry)
        with serve_in_thread(app, port=free_port()) as gw:
            say(f"gateway: {gw}")
            serving = {"TUNESHIP_VLLM_URL": vllm_url, "TUNESHIP_GATEWAY_URL": gw, "TUNESHIP_ADMIN_KEYS": admin_key}
            with environ(serving):
                state = retrain(RetrainParams(config=CONFIG, overrides=overrides or []), return_state=True)
                second = _second_task(settings, store, overrides, say) if second_task else None
            if not state.is_completed():
                raise RuntimeError(f"the retrain flow ended {state.name}: {state.message}")
            summary = state.result()
            m = summary.metrics
            say(f"Prefect flow run {state.state_details.flow_run_id}: {state.name}")
            decoding = " under the database's grammar" if m.get("constrained_decoding") else ""
            say(
                f"evaluate (through vLLM{decoding}): perplexity {m['perplexity_base']:.1f} → "
                f"{m['perplexity_candidate']:.2f}; PEFT/vLLM parity {m['parity_agreement']:.0%}; execution accuracy "
                "base → fine-tuned (95% CI of gain):"
            )
            for split, label in (("test", "templated"), ("paraphrase", "paraphrase")):
                sm = {key: m.get(split_metric(split, key), float("nan")) for key in SPLIT_LINE}
                if split_metric(split, "accuracy_candidate") in m:
                    say(
                        f"  {label:10} ({sm['examples']:.0f} questions): {sm['accuracy_base']:.1%} → "
                        f"{sm['accuracy_candidate']:.1%} [{sm['ci_low_vs_base']:+.1%}, {sm['ci_high_vs_base']:+.1%}]; "
                        "queries naming a table or column the database lacks: "
                        f"{sm['invented_identifiers_candidate']:.1%}"
                    )
            if "accuracy_champion" in m:
                say(
                    f"  vs the champion before this run: {m['accuracy_diff_vs_champion']:+.1%} "
                    f"[{m['ci_low_vs_champion']:+.1%}, {m['ci_high_vs_champion']:+.1%}]"
                )
            say(f"  report: {summary.report}")
            verdict = "promoted to @champion" if summary.promoted else "kept as @challenger"
            say(f"register: {summary.model_name} v{summary.version} — {verdict}: {summary.reasons}")
            say(f"  MLflow: {settings.mlflow_tracking_uri} (model {summary.model_name})")

            # The champion serves under the gateway's alias: deployed by the flow when it promoted this run,
            # else the registry's champion from an earlier run goes in now.
            try:
                champion = get_version(summary.model_name, "champion", tracking_uri=settings.mlflow_tracking_uri)
            except RegistryError:
                champion = None
            alias = "champion"
            if champion is not None and base_of(champion) != (base.id, base.revision):
                # An earlier champion on another base cannot serve on this vLLM server: show this run's version.
                say(
                    f"the registry's champion v{champion.version} was trained on another base; serving this run's "
                    f"v{summary.version} as the challenger instead (`tuneship promote {summary.model_name} "
                    f"{summary.version} --reason …` makes it the champion)"
                )
                champion = get_version(summary.model_name, summary.version, tracking_uri=settings.mlflow_tracking_uri)
                alias = "challenger"
            if champion is not None and summary.deployment is None:
                deploy(
                    summary.model_name,
                    str(champion.version),
                    DeployConfig(alias=alias),
                    store=store,
                    tracking_uri=settings.mlflow_tracking_uri,
                    vllm_url=vllm_url,
                    gateway_url=gw,
                    admin_key=admin_key,
                    vllm_key=settings.vllm_key,
                )
            model = f"{summary.model_name}@{alias}" if champion is not None else "base"
            routes = httpx.get(f"{gw}/admin/routes", headers={"Authorization": f"Bearer {admin_key}"}).json()
            say(f"gateway aliases: {routes['aliases']}")
            _requests(gw, model, task_dir, say)
            if second is not None:
                tasks = [(model, task_dir, "retail.db"), (second, settings.home / "clinic-task", "clinic.db")]
                _side_by_side(gw, admin_key, tasks, say)
            if log is not None and log.flush():
                say(f"request log: every completion above is in {store.root_uri}/requests/ (personal data scrubbed)")
            if champion is not None and compare:
                comparison = _comparison(settings, store, base, champion, gw, model, task_dir, say)
                _costs(summary, comparison, settings, say)
    return {"summary": summary.model_dump(mode="json"), "flow_run_id": str(state.state_details.flow_run_id)}


def _comparison(
    settings: Settings, store, base, champion, gw: str, model: str, task_dir: Path, say: Callable[[str], None]
) -> list[dict]:
    """The seed's comparison table: base vs the fine-tuned adapter (runtime LoRA) vs the adapter merged into the
    base weights (a second vLLM server), same prompts, same load; and the configured API price."""
    from flows.bench import compare, eval_prompts
    from serving.loadgen import LoadSpec
    from tasks.merge import merge_adapter
    from tasks.refs import adapter_of

    adapter = adapter_of(champion, store)
    merged = merge_adapter(base.path, store.get_dir(adapter.artifact), settings.home / "merged" / adapter.sha256[:16])
    prompts = eval_prompts(task_dir / "test.jsonl", limit=64)
    spec = LoadSpec(url=gw, concurrency=8, requests=48, warmup=4, max_tokens=48)
    with local_vllm(settings, merged, served_name="merged") as merged_url:
        rows = [
            ("base model (vLLM)", gw, "base"),
            ("fine-tuned: runtime LoRA (vLLM)", gw, model),
            ("fine-tuned: merged weights (vLLM)", merged_url, "merged"),
        ]
        table, results = compare(rows, prompts, spec, instance=settings.instance_type)
    report = settings.home / "reports" / "comparison.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(f"# Serving comparison (concurrency 8, 48 requests, 48 output tokens)\n\n{table}")
    say(f"serving comparison (concurrency 8, 48 requests each; {report}):\n{table}")
    return results


def _costs(summary, comparison: list[dict], settings: Settings, say: Callable[[str], None]) -> None:
    from flows.bench import DEFAULT_API
    from infra.costs import load_prices, serving_cost

    prices = load_prices()
    lines = ["| item | measured | cost |", "|---|---|---|"]
    if summary.training_cost:
        t = summary.training_cost
        lines.append(
            f"| training run (fine-tune wall clock, retries included) | {t.seconds:.0f} s on {t.instance} "
            f"| ${t.usd:.4f} |"
        )
    tuned = next(r for r in comparison if r["config"].startswith("fine-tuned: runtime"))
    for instance in (settings.instance_type, "aws-g5.xlarge"):
        cost = serving_cost(
            prices,
            instance,
            requests_per_s=tuned["requests_per_s"],
            output_tokens_per_s=tuned["tokens_per_s"],
            api=DEFAULT_API,
        )
        item = f"serving the fine-tuned model at this machine's measured throughput, priced on {instance}"
        measured = f"{tuned['requests_per_s']:.2f} req/s, {tuned['tokens_per_s']:.0f} tokens/s"
        priced = (
            f"${cost.usd_per_1k_requests:.4f} / 1K requests, ${cost.usd_per_1m_output_tokens:.2f} / 1M tokens; "
            f"cheaper than {DEFAULT_API} above {cost.breakeven_output_tokens_per_month / 1e6:,.0f}M "
            f"tokens/month (capacity {cost.capacity_output_tokens_per_month / 1e6:,.0f}M)"
        )
        lines.append(f"| {item} | {measured} | {priced} |")
    table = "\n".join(lines) + "\n"
    report = settings.home / "reports" / "costs.md"
    report.write_text(f"# Cost report (price table: infra/costs.yaml)\n\n{table}")
    say(f"costs ({report}):\n{table}")


def _second_task(settings: Settings, store, overrides: list[str] | None, say: Callable[[str], None]) -> str:
    """Train, evaluate, register and deploy the clinic task through the same flow; its registered name."""
    from flows.retrain import RetrainParams, retrain

    task_dir = settings.home / "clinic-task"
    counts = build_clinic_task(task_dir)
    data = store.put_dir(task_dir, CLINIC_DATA_KEY, overwrite=True)
    say(f"second task: an outpatient clinic, {counts['train']} train / {counts['test']} test questions, {data.uri}")
    state = retrain(RetrainParams(config=CLINIC_CONFIG, overrides=overrides or []), return_state=True)
    if not state.is_completed():
        raise RuntimeError(f"the clinic retrain flow ended {state.name}: {state.message}")
    summary = state.result()
    m = summary.metrics
    verdict = "promoted to @champion" if summary.promoted else "kept as @challenger"
    say(
        f"  {summary.model_name} v{summary.version}: execution accuracy {m['accuracy_base']:.1%} → "
        f"{m['accuracy_candidate']:.1%} [{m['ci_low_vs_base']:+.1%}, {m['ci_high_vs_base']:+.1%}]; {verdict}"
    )
    return summary.model_name if summary.promoted else f"{summary.model_name}/{summary.version}"


def _side_by_side(gw: str, admin_key: str, tasks: list[tuple[str, Path, str]], say: Callable[[str], None]) -> None:
    """One question of each task to each fine-tune, through one gateway and one vLLM server."""
    Gateway(gw, admin_key).refresh()  # a version the gate kept as challenger was deployed by no one: read it now
    listed = [m["id"] for m in httpx.get(f"{gw}/v1/models", timeout=30).json()["data"]]
    say(f"two fine-tunes on one base, one vLLM server; GET /v1/models: {', '.join(listed)}")
    for model, task_dir, db in tasks:
        question = json.loads((task_dir / "test.jsonl").read_text().splitlines()[0])
        body = {"model": model, "prompt": instruction_prompt(question["instruction"]), "max_tokens": 96}
        response = httpx.post(f"{gw}/v1/completions", json={**body, "temperature": 0}, timeout=120)
        response.raise_for_status()
        answer = response.json()["choices"][0]["text"].strip()
        conn = connect_readonly(task_dir / db)
        gold, pred = execute_sql(conn, question["response"]), execute_sql(conn, answer)
        ok = pred.ok and results_match(gold.rows, pred.rows, ordered=is_ordered(question["response"]))
        served = response.headers.get("x-served-model")
        say(f"  {question['instruction']}")
        say(f"    model={model} (served {served}): {answer}  → {'correct' if ok else 'wrong'}")


def _requests(gw: str, model: str, task_dir: Path, say: Callable[[str], None]) -> None:
    question = json.loads((task_dir / "test.jsonl").read_text().splitlines()[0])
    conn = connect_readonly(task_dir / "retail.db")
    gold = execute_sql(conn, question["response"])

    def verdict(sql: str) -> str:
        pred = execute_sql(conn, sql)
        ok = pred.ok and results_match(gold.rows, pred.rows, ordered=is_ordered(question["response"]))
        return "correct" if ok else "wrong"

    say(f"question: {question['instruction']}")
    for alias in ("base", model):
        answer = "".join(stream_generate(gw, alias, instruction_prompt(question["instruction"])))
        say(f"  POST /generate model={alias:<8} (SSE): {answer}  → {verdict(answer)}")
    batch = [json.loads(line) for line in (task_dir / "test.jsonl").read_text().splitlines()[1:4]]
    body = {
        "prompts": [instruction_prompt(r["instruction"]) for r in batch],
        "max_tokens": 96,
        "temperature": 0,
        "model": model,
    }
    results = httpx.post(f"{gw}/generate/batch", json=body, timeout=120).json()["results"]
    say(f"  POST /generate/batch ({model}):")
    for row, result in zip(batch, results, strict=True):
        say(f"    {row['instruction']} → {result.get('text', result.get('error'))}")
