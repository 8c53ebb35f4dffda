"""``make demo`` / ``tuneship demo``: the pipeline on embedded defaults, as far as it is built.

Today it builds (or reuses) the offline base model and the demo task, puts both in the artifact store,
serves the base model on a vLLM server (launched locally unless ``TUNESHIP_VLLM_URL`` names one),
streams an answer to a demo test question, and scores it by executing it against the demo database —
showing the gap the fine-tune has to close.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from infra.artifacts import open_store
from infra.base_model import RECIPES, ensure_base_model
from infra.demo_task import build_demo_task
from infra.settings import Settings
from infra.vllm_server import VllmLaunch, start_vllm
from tasks.generation import instruction_prompt
from tasks.sql_exec import connect_readonly, execute_sql, is_ordered, results_match


@contextlib.contextmanager
def _vllm(settings: Settings, model: Path, name: str) -> Iterator[str]:
    if settings.vllm_url != "local":
        yield settings.vllm_url
        return
    launch = VllmLaunch(model=model, served_model_name=name, device=settings.vllm_device)
    with start_vllm(launch, python=settings.vllm_python, workdir=settings.home / "services") as server:
        yield server.base_url


def stream_completion(base_url: str, model: str, prompt: str, *, max_tokens: int = 96) -> Iterator[str]:
    """Text deltas of a streamed, greedy completion from an OpenAI-compatible server."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line.removeprefix("data: "))["choices"][0]["text"]


def run_demo(settings: Settings, *, say: Callable[[str], None] = print) -> dict[str, object]:
    """Run the demo end to end and return what it saw."""
    store = open_store(settings)
    base = ensure_base_model(RECIPES["sql-small"], store=store, cache_dir=settings.cache_dir, log=say)
    say(f"base model: {base.ref.uri} ({'built' if base.built else 'reused'})")
    task_dir = settings.home / "demo-task"
    counts = build_demo_task(task_dir)
    task_ref = store.put_dir(task_dir, "datasets/demo-retail", overwrite=True)
    say(f"demo task: {counts['train']} train / {counts['test']} test questions → {task_ref.uri}")

    example = json.loads((task_dir / "test.jsonl").read_text().splitlines()[0])
    with _vllm(settings, base.path, "base") as url:
        say(f"vLLM: {url}")
        say(f"question: {example['instruction']}")
        pieces = []
        for piece in stream_completion(url, "base", instruction_prompt(example["instruction"])):
            pieces.append(piece)
        answer = "".join(pieces)
    conn = connect_readonly(task_dir / "retail.db")
    gold, pred = execute_sql(conn, example["response"]), execute_sql(conn, answer)
    correct = pred.ok and results_match(gold.rows, pred.rows, ordered=is_ordered(example["response"]))
    say(f"base model answered ({len(pieces)} streamed pieces): {answer}")
    say(f"gold SQL: {example['response']}")
    say(f"executed: {'correct' if correct else 'wrong'} ({pred.error or f'{len(pred.rows)} rows'})")
    return {"answer": answer, "correct": correct, "pieces": len(pieces), "base": base.ref.uri}
