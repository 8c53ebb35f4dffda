"""``make bench``: every performance benchmark tuneship has, as ratios measured in one run.

    .venv/bin/python tests/benchmarks/run.py [NAME ...]      # all, or the named ones

Each benchmark writes ``bench-results/<name>.json``; the run ends with ``bench-results/summary.md``, one table
with the measured ratio and its goal side by side. These are measurements, not tests: nothing here fails
the build, and no test asserts a timing.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from infra.artifacts import ArtifactStore, LocalBackend  # noqa: E402
from infra.base_model import RECIPES, ResolvedModel, ensure_base_model  # noqa: E402
from infra.settings import load_settings  # noqa: E402

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
    from infra.demo_task import build_demo_task
    from tasks.config import load_run_config

    task = workdir / "demo-task"
    if not (task / "train.jsonl").exists():
        build_demo_task(task)
    return load_run_config(
        REPO / "deployments" / "configs" / "tiny-cpu.yaml",
        [f"data.source={task / 'train.jsonl'}", f"data.test_file={task / 'test.jsonl'}", *overrides],
    )


@bench
def finetune_throughput(workdir: Path) -> dict[str, Any]:
    """Fine-tune tokens/s (real tokens): length-grouped dynamic padding vs a plain Trainer padding to max_length."""
    from infra.tracking import MlflowTracker
    from tasks.finetune import finetune
    from tasks.preprocess import preprocess

    base, store = _base(workdir)
    tracker = MlflowTracker(f"sqlite:///{workdir / 'mlflow.db'}", system_metrics=False)
    data = preprocess(_demo_config(workdir), base=base, store=store, workdir=workdir / "work")
    rates = {}
    for batching in ("padded", "group_by_length"):
        cfg = _demo_config(workdir, f"finetune.train.batching={batching}", "finetune.train.max_steps=60")
        adapter = finetune(
            cfg, data, base=base, store=store, tracker=tracker, workdir=workdir / "work", run_id=f"bench-{batching}"
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
    """Base-weight memory of the NF4 (QLoRA) load vs the 16-bit load of the same model."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.finetune import build_bnb_config

    base, _ = _base(workdir)
    sixteen = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.bfloat16)
    nf4 = AutoModelForCausalLM.from_pretrained(
        base.path,
        dtype=torch.bfloat16,
        quantization_config=build_bnb_config("nf4", torch.bfloat16),
        device_map={"": "cpu"},
    )

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
    quantized = linear_bytes(nf4) / linear_bytes(sixteen)
    return {
        "bytes_16bit": sixteen.get_memory_footprint(),
        "bytes_nf4": nf4.get_memory_footprint(),
        "ratio": whole,
        "ratio_quantized_layers": quantized,
        "embedding_share_of_params": sixteen.get_input_embeddings().weight.numel() / sixteen.num_parameters(),
        "goal": "<= 0.35",
        "met": whole <= 0.35,
        "note": "embeddings (tied lm_head) stay 16-bit under bitsandbytes; they are a large share of a 3.7M model",
    }


@bench
def eval_generation(workdir: Path) -> dict[str, Any]:
    """Eval generation wall time: 200 test prompts in one batch through vLLM vs sequential transformers generate."""
    import json as _json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from infra.vllm_server import VllmLaunch, complete, start_vllm
    from tasks.generation import greedy_generate, instruction_prompt

    base, _ = _base(workdir)
    _demo_config(workdir)  # writes the demo task
    rows = [_json.loads(line) for line in (workdir / "demo-task" / "test.jsonl").read_text().splitlines()][:200]
    prompts = [instruction_prompt(r["instruction"]) for r in rows]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base.path), AutoTokenizer.from_pretrained(base.path)
    started = time.perf_counter()
    sequential = greedy_generate(model, tokenizer, prompts, max_new_tokens=96, batch_size=1)
    sequential_s = time.perf_counter() - started
    settings = load_settings()
    with start_vllm(VllmLaunch(model=Path(base.path)), python=settings.vllm_python, workdir=workdir) as server:
        complete(server.base_url, "base", prompts[:8], max_tokens=96)  # warm-up
        started = time.perf_counter()
        batched = complete(server.base_url, "base", prompts, max_tokens=96)
        vllm_s = time.perf_counter() - started
    same = sum(a == b for a, b in zip(sequential, batched, strict=True))
    return {
        "prompts": len(prompts),
        "sequential_transformers_s": sequential_s,
        "vllm_batch_s": vllm_s,
        "identical_outputs": same,
        "ratio": sequential_s / vllm_s,
        "goal": ">= 10",
        "met": sequential_s / vllm_s >= 10,
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
