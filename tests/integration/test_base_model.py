"""The offline base model is a trained base: low held-out loss, loads in transformers/PEFT/vLLM, writes valid
SQL for generic questions, and does *not* know the demo schema."""

from __future__ import annotations

import itertools
import json
import random
import shutil
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from offline.base_model import RECIPES, ensure_base_model, init_model
from offline.sql_corpus import corpus, generate_example
from tasks.generation import greedy_generate, instruction_prompt
from tasks.sql_exec import connect_readonly, execute_sql, is_ordered, results_match

pytestmark = pytest.mark.slow


def heldout_loss(model, tokenizer, texts: list[str]) -> float:
    """Token-weighted mean loss over ``texts`` (one forward pass each)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            loss = model(input_ids=ids, labels=ids).loss.item()
            total += loss * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_base_is_trained_well_below_its_initial_loss(base_model) -> None:
    model, tokenizer = load(base_model.path)
    texts = list(itertools.islice(corpus(seed=4242, eos=tokenizer.eos_token), 200))  # unseen seed
    trained = heldout_loss(model, tokenizer, texts)
    untrained = heldout_loss(init_model(base_model.recipe.arch, tokenizer, seed=123), tokenizer, texts)
    print(f"held-out loss: trained {trained:.3f}, same architecture at init {untrained:.3f}")
    assert trained < 0.5 * untrained


def test_a_lora_wraps_it(base_model) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load(base_model.path)
    config = LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert 0 < trainable < 0.2 * sum(p.numel() for p in peft_model.parameters())
    ids = tokenizer("### Instruction:\nCount the ships.\n\n### Response:\n", return_tensors="pt")["input_ids"]
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n and p.grad is not None]
    assert lora_grads and any(torch.count_nonzero(g) for g in lora_grads)


def test_writes_valid_sql_for_generic_questions(base_model) -> None:
    model, tokenizer = load(base_model.path)
    rng = random.Random(777)
    examples = [generate_example(rng) for _ in range(100)]
    outputs = greedy_generate(model, tokenizer, [instruction_prompt(e.question) for e in examples], max_new_tokens=64)
    valid = exact = 0
    for example, sql in zip(examples, outputs, strict=True):
        db = sqlite3.connect(":memory:")
        for ddl in example.ddl:
            db.execute(ddl)
        try:
            db.execute(sql).fetchall()
            valid += 1
        except sqlite3.Error:
            pass
        exact += sql.strip() == example.sql
    print(f"generic questions: {valid}% of the generated SQL runs on its schema, {exact}% exact match")
    assert valid > 50


def base_accuracy_on_demo(model, tokenizer, demo_task: Path, *, with_schema: bool, limit: int = 120) -> float:
    """Execution accuracy on the first ``limit`` questions of the demo test split (greedy, on the CPU)."""
    rows = [json.loads(line) for line in (demo_task / "test.jsonl").read_text().splitlines()[:limit]]
    schema = (demo_task / "schema.sql").read_text()
    questions = [(f"{schema}\n{r['instruction']}" if with_schema else r["instruction"]) for r in rows]
    outputs = greedy_generate(model, tokenizer, [instruction_prompt(q) for q in questions], max_new_tokens=96)
    conn = connect_readonly(demo_task / "retail.db")
    correct = 0
    for row, sql in zip(rows, outputs, strict=True):
        gold = execute_sql(conn, row["response"])
        pred = execute_sql(conn, sql)
        correct += pred.ok and results_match(gold.rows, pred.rows, ordered=is_ordered(row["response"]))
    return correct / len(rows)


def test_base_does_not_know_the_demo_schema(base_model, demo_task: Path) -> None:
    model, tokenizer = load(base_model.path)
    plain = base_accuracy_on_demo(model, tokenizer, demo_task, with_schema=False)
    schema = base_accuracy_on_demo(model, tokenizer, demo_task, with_schema=True)
    print(
        f"base model on 120 demo test questions: execution accuracy {plain:.1%} (question only), "
        f"{schema:.1%} (schema + question)"
    )
    assert plain < 0.2 and schema < 0.2


def test_vllm_serves_it_and_answers_in_sql(vllm_server) -> None:
    body = {
        "model": "base",
        "prompt": instruction_prompt("How many ships have color red?"),
        "max_tokens": 32,
        "temperature": 0,
    }
    text = httpx.post(f"{vllm_server.base_url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    assert text.startswith("SELECT") and "ships" in text, text


def test_second_build_reuses_the_cache(base_model, tmp_path: Path) -> None:
    from infra.artifacts import ArtifactStore, LocalBackend
    from infra.settings import load_settings

    store = ArtifactStore(LocalBackend(tmp_path / "store"), tmp_path / "cache")
    started = time.perf_counter()
    again = ensure_base_model(RECIPES["sql-small"], store=store, cache_dir=load_settings().cache_dir)
    print(f"second build: reused in {time.perf_counter() - started:.1f} s")
    assert again.source == "cache"
    assert again.ref.sha256 == base_model.ref.sha256
    assert ensure_base_model(RECIPES["sql-small"], store=store, cache_dir=tmp_path / "empty").ref == again.ref


def test_a_fresh_machine_loads_the_pinned_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No store, no cache: the default base comes from the repository's checkpoint, verified, never pre-trained."""
    from infra.artifacts import ArtifactStore, LocalBackend, tree_sha256
    from offline import base_model as offline_base
    from tasks.base_model import resolve_base_model

    def no_pretraining(*args: object, **kwargs: object) -> None:
        raise AssertionError("pre-trained although a pinned checkpoint exists")

    monkeypatch.setattr(offline_base, "pretrain", no_pretraining)
    checkpoint = offline_base.verified_checkpoint(RECIPES["sql-small"])
    assert checkpoint is not None and tree_sha256(checkpoint) == offline_base.PINNED[checkpoint.name]
    store = ArtifactStore(LocalBackend(tmp_path / "store"), tmp_path / "store-cache")
    resolved = resolve_base_model("tuneship/sql-small", store=store, cache_dir=tmp_path / "cache")
    assert resolved.revision == offline_base.PINNED[checkpoint.name]  # the revision a run records is the pin
    model, tokenizer = load(Path(resolved.path))  # the loader path every stage uses
    assert model.config.num_hidden_layers == RECIPES["sql-small"].arch.num_layers
    assert tokenizer.chat_template and "### Instruction:" in tokenizer.chat_template

    corrupted = tmp_path / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint, corrupted)
    (corrupted / "config.json").write_text((corrupted / "config.json").read_text().replace("silu", "gelu"))
    monkeypatch.setattr(offline_base, "CHECKPOINTS", tmp_path / "checkpoints")
    with pytest.raises(offline_base.CheckpointError, match=rf"{corrupted}: sha256 .* does not match its pin"):
        fresh = ArtifactStore(LocalBackend(tmp_path / "other-store"), tmp_path / "other-store-cache")
        resolve_base_model("tuneship/sql-small", store=fresh, cache_dir=tmp_path / "other-cache")


def test_a_cached_base_that_differs_from_its_sha256_is_never_used(tmp_path: Path) -> None:
    """The per-user cache is checked against the store's sha256 (or, before the store holds the model, against
    the checkpoint's pin): an edited cached copy is replaced by a verified one, never loaded."""
    from infra.artifacts import ArtifactStore, LocalBackend, tree_sha256
    from offline.base_model import PINNED, checkpoint_path

    recipe = RECIPES["sql-small"]
    pin = PINNED[checkpoint_path(recipe).name]
    store = ArtifactStore(LocalBackend(tmp_path / "store"), tmp_path / "store-cache")
    cache = tmp_path / "cache"
    first = ensure_base_model(recipe, store=store, cache_dir=cache, log=lambda _: None)
    cached = cache / recipe.key
    assert first.path == cached and first.ref.sha256 == pin

    def tamper() -> None:
        config = cached / "config.json"
        config.write_text(config.read_text().replace("silu", "gelu"))

    tamper()
    again = ensure_base_model(recipe, store=store, cache_dir=cache, log=lambda _: None)
    assert again.path != cached and tree_sha256(again.path) == pin  # the store's verified copy

    fresh = ArtifactStore(LocalBackend(tmp_path / "fresh-store"), tmp_path / "fresh-store-cache")
    restored = ensure_base_model(recipe, store=fresh, cache_dir=cache, log=lambda _: None)
    assert restored.source == "checkpoint" and restored.ref.sha256 == pin and tree_sha256(cached) == pin
