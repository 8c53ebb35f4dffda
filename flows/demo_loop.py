"""``make demo-loop`` / ``tuneship demo-loop``: retraining that learns from production, end to end.

1. v1: the retrain flow on the demo task (as ``make demo``; its stages come from the cache when ``make demo`` ran),
   registered as a model of its own (``retail-sql-loop-<time>``) and hot-loaded into the gateway as champion;
2. simulated users ask questions through the gateway (``/generate/batch``, with their API key) in phrasings the
   training data never used — the paraphrase style of ``offline/paraphrases.py``, new questions, none of them a
   test question — and rate every answer: thumbs up when it is right, thumbs down with the right SQL when it is
   wrong (the task generator's own oracle, never a test split);
3. then production takes over: the request log is written, the ``watch-feedback`` flow curates and requests a
   retrain (a Prefect event), the ``retrain-on-feedback`` deployment's automation starts the run, a Prefect
   **worker** runs it (preprocess on the curated data → fine-tune → evaluate on the fixed test split, the
   paraphrase split and the feedback holdout → the gate: a win on the feedback holdout, no regression on the
   test split → register → hot swap);
4. it prints v1 vs v2 with paired-bootstrap CIs on the feedback holdout and on the original test split, where the
   dataset, the run and the model are, and the wall time from the last feedback to v2 serving as champion.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from flows.demo import CONFIG, DATA_KEY, _env
from flows.prefect_api import configured_api_url, launch_local_server, prefect_api
from flows.serve import gateway_config, local_vllm, request_log, upstream
from infra.artifacts import open_store
from infra.registry import client, get_version, served_id
from infra.services import free_port
from infra.settings import Settings
from offline.demo_task import PARAPHRASE, build_demo_task, generate
from serving.app import create_app
from serving.catalog import RegistrySource
from serving.server import serve_in_thread
from tasks.base_model import resolve_base_model
from tasks.generation import instruction_prompt
from tasks.sql_exec import connect_readonly, execute_sql, is_ordered, results_match

REPO = Path(__file__).resolve().parents[1]
USERS_SEED = 2026
PREFECT_FILE = "deployments/prefect.yaml"


@contextlib.contextmanager
def feedback_worker(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """The retrain-on-feedback deployment registered on the Prefect server, and a process worker for its queue."""
    prefect = str(Path(sys.executable).parent / "prefect")
    full = {**os.environ, **env}
    subprocess.run(
        [prefect, "work-pool", "create", "tuneship-cpu", "--type", "process", "--overwrite"],
        env=full, cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [prefect, "--no-prompt", "deploy", "--name", "retrain-on-feedback", "--prefect-file", PREFECT_FILE],
        env=full, cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    with log_path.open("w") as log:
        worker = subprocess.Popen(
            [prefect, "worker", "start", "--pool", "tuneship-cpu", "--work-queue", "feedback"],
            env={**full, "PREFECT_WORKER_QUERY_SECONDS": "2"}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            yield worker
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()


def users_questions(task_dir: Path, count: int) -> list[tuple[str, str]]:
    """New questions in the paraphrase style, none worded like a question in any of the demo task's files."""
    seen: set[str] = set()
    for name in ("train.jsonl", "test.jsonl", "test_paraphrase.jsonl"):
        seen |= {json.loads(line)["instruction"] for line in (task_dir / name).read_text().splitlines()}
    db = sqlite3.connect(f"file:{task_dir / 'retail.db'}?mode=ro", uri=True)
    try:
        asked = generate(db, PARAPHRASE, count, seed=USERS_SEED, exclude=seen)
    finally:
        db.close()
    return list(asked.values())


def simulate_users(
    gw: str, key: str, model: str, questions: list[tuple[str, str]], task_dir: Path, say: Callable[[str], None]
) -> dict[str, int]:
    """Ask every question through the gateway; rate each answer as its user would, with the right SQL when wrong."""
    headers = {"Authorization": f"Bearer {key}"}
    counts = {"asked": 0, "right": 0, "wrong": 0}
    sandbox = connect_readonly(task_dir / "retail.db")
    try:
        with httpx.Client(base_url=gw, headers=headers, timeout=600) as http:
            for start in range(0, len(questions), 32):
                chunk = questions[start : start + 32]
                body = {
                    "model": model,
                    "prompts": [instruction_prompt(q) for q, _ in chunk],
                    "max_tokens": 96,
                    "temperature": 0,
                }
                answers = http.post("/generate/batch", json=body).raise_for_status().json()["results"]
                for (_, gold), answer in zip(chunk, answers, strict=True):
                    counts["asked"] += 1
                    if "request_id" not in answer or answer.get("text") is None:
                        continue
                    want = execute_sql(sandbox, gold)
                    got = execute_sql(sandbox, answer["text"])
                    right = got.ok and results_match(want.rows, got.rows, ordered=is_ordered(gold))
                    counts["right" if right else "wrong"] += 1
                    rating = {"request_id": answer["request_id"], "rating": "up" if right else "down"}
                    if not right:
                        rating["correction"] = gold
                    http.post("/feedback", json=rating).raise_for_status()
                say(f"  users: {counts['asked']}/{len(questions)} asked, {counts['wrong']} answers wrong so far")
    finally:
        sandbox.close()
    return counts


def _wait_for_run(api: str, deployment: str, since: float, timeout: float) -> dict:
    """The first flow run of ``deployment`` created after ``since``, once it has finished."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=api, timeout=30) as http:
        found = next(d for d in http.post("/deployments/filter", json={}).json() if d["name"] == deployment)
        query = {"flow_runs": {"deployment_id": {"any_": [found["id"]]}}, "sort": "EXPECTED_START_TIME_DESC"}
        while time.monotonic() < deadline:
            runs = [r for r in http.post("/flow_runs/filter", json=query).json() if _ts(r["created"]) >= since]
            if runs and runs[-1]["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return runs[-1]
            time.sleep(2)
    raise TimeoutError(f"no finished {deployment} run within {timeout:.0f} s")


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def run_demo_loop(settings: Settings, *, users: int = 480, say: Callable[[str], None] = print) -> dict[str, object]:
    """Run the loop; return what it measured (v1 vs v2 on each split, the wall time, where things are)."""
    from flows.feedback import WatchParams, watch_feedback
    from flows.retrain import RetrainParams, retrain

    store = open_store(settings)
    base = resolve_base_model("tuneship/sql-small", store=store, cache_dir=settings.cache_dir, log=say)
    task_dir = settings.home / "demo-task"
    build_demo_task(task_dir)
    store.put_dir(task_dir, DATA_KEY, overwrite=True)
    model = f"retail-sql-loop-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [f"registry.model_name={model}"]
    admin_key, user_key = settings.admin_key or secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    home = settings.home.resolve()
    uri = settings.mlflow_tracking_uri
    say(f"the loop's model: {model} (base {base.id})")
    with contextlib.ExitStack() as stack:
        prefect = None if configured_api_url() else stack.enter_context(launch_local_server(settings))
        vllm_url = stack.enter_context(local_vllm(settings, Path(base.path)))
        api_url = stack.enter_context(prefect_api(settings, server=prefect, say=say))
        log = request_log(settings, store)
        config = gateway_config(settings, api_keys=[user_key], admin_keys=[admin_key])
        registry = RegistrySource(uri, store, (base.id, base.revision))
        gw = stack.enter_context(
            serve_in_thread(create_app(config, upstream(settings, vllm_url), log, registry), port=free_port())
        )
        serving = {
            "TUNESHIP_VLLM_URL": vllm_url,
            "TUNESHIP_GATEWAY_URL": gw,
            "TUNESHIP_ADMIN_KEYS": admin_key,
            "TUNESHIP_HOME": str(home),
            "TUNESHIP_ARTIFACT_ROOT": str(Path(settings.artifact_root).resolve())
            if not settings.artifact_root_is_s3
            else settings.artifact_root,
            "TUNESHIP_MLFLOW_TRACKING_URI": uri,
            "TUNESHIP_REPO": str(REPO),
            "PREFECT_API_URL": api_url,
        }
        stack.enter_context(_env(serving))
        worker_log = home / "services" / "feedback-worker.log"
        stack.enter_context(feedback_worker(serving, worker_log))
        say(
            f"gateway: {gw} (request log: {settings.request_log}); Prefect worker for retrain-on-feedback: {worker_log}"
        )

        say("v1: the retrain flow on the demo task's training data")
        state = retrain(RetrainParams(config=CONFIG, overrides=overrides), return_state=True)
        if not state.is_completed() or not state.result().promoted:
            raise RuntimeError(f"v1 was not trained and promoted: {state.name}: {state.message}")
        v1 = state.result()
        say(f"v1 = {model} v{v1.version}, serving as champion ({v1.deployment.adapter_name if v1.deployment else '?'})")

        questions = users_questions(task_dir, users)
        say(f"{len(questions)} users ask in phrasings the training data never used, and rate the answers:")
        counts = simulate_users(gw, user_key, model, questions, task_dir, say)
        last_feedback = time.time()
        assert log is not None and log.flush()
        say(f"  v1 answered {counts['right']} right, {counts['wrong']} wrong; every wrong one came back corrected")

        watched = watch_feedback(WatchParams(config=CONFIG, overrides=overrides))
        say(f"watch-feedback: curated v{watched.curated.version} ({watched.curated.counts}); {watched.reason}")
        if not watched.requested:
            raise RuntimeError(f"the watch requested no retrain: {watched.reason}")
        run = _wait_for_run(api_url, "retrain-on-feedback", last_feedback - 5, timeout=3600)
        if run["state_type"] != "COMPLETED":
            raise RuntimeError(f"the retrain-on-feedback run ended {run['state_name']}; worker log: {worker_log}")
        champion = get_version(model, "champion", tracking_uri=uri)
        routes = httpx.get(f"{gw}/admin/routes", headers={"Authorization": f"Bearer {admin_key}"}).json()
        serving_now = routes["aliases"].get(f"{model}@champion")
        swapped = time.time()
        if str(champion.version) == str(v1.version) or serving_now != served_id(model, str(champion.version)):
            tags = client(uri).get_model_version(model, str(int(v1.version) + 1)).tags
            gate = {k: v for k, v in tags.items() if k.startswith("tuneship.gate.")}
            raise RuntimeError(f"v2 was not promoted and served; its gate: {gate}")
        m = {
            k.removeprefix("tuneship.eval."): float(v)
            for k, v in champion.tags.items()
            if k.startswith("tuneship.eval.")
        }

    say(f"v2 = {model} v{champion.version}, serving as champion since the swap")
    lines = ["| split | v1 | v2 | v2 − v1, 95 % CI |", "|---|---|---|---|"]
    for split, label in (
        ("feedback", "feedback holdout"),
        ("test", "original test split"),
        ("paraphrase", "paraphrase"),
    ):
        prefix = "" if split == "test" else f"{split}_"
        if f"{prefix}accuracy_candidate" not in m:
            continue
        lines.append(
            f"| {label} ({m[f'{prefix}examples']:.0f}) | {m[f'{prefix}accuracy_champion']:.1%} | "
            f"{m[f'{prefix}accuracy_candidate']:.1%} | {m[f'{prefix}accuracy_diff_vs_champion']:+.1%} "
            f"[{m[f'{prefix}ci_low_vs_champion']:+.1%}, {m[f'{prefix}ci_high_vs_champion']:+.1%}] |"
        )
    table = "\n".join(lines)
    say(table)
    wall = swapped - last_feedback
    curated = watched.curated
    say(f"from the last feedback to v2 serving as champion: {wall / 60:.1f} min")
    say(f"dataset: {curated.train} (+ holdout {curated.holdout}); lineage beside it")
    say(f"Prefect: the retrain-on-feedback run {run['name']} ({run['id']}) on {api_url}")
    say(f"MLflow: {uri} — model {model}, v{v1.version} → v{champion.version}")
    report = settings.home / "reports" / "demo-loop.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(f"# The feedback loop ({model})\n\n{table}\n\nlast feedback → v2 serving: {wall:.0f} s\n")
    return {"model": model, "metrics": m, "wall_s": wall, "users": counts, "curated": curated.model_dump()}
