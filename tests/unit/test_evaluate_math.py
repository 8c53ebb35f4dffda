"""Evaluation maths: perplexity against an independent brute force, bootstrap intervals, scorers, sandbox."""

from __future__ import annotations

import hashlib
import math
import sqlite3
import time
from pathlib import Path

import pytest

from tasks.config import ConfigError, EvalConfig, load_run_config
from tasks.evaluate import build_scorer, paired_bootstrap, perplexity, sql_execution_scorer


@pytest.fixture(scope="module")
def model_and_rows(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    model = AutoModelForCausalLM.from_pretrained(tiny_base.path)
    pairs = [
        ("How many ships have color red?", "SELECT COUNT(*) FROM ships WHERE color = 'red';"),
        ("List the name of every book whose price is above 20.", "SELECT name FROM books WHERE price > 20;"),
        ("Count the planets.", "SELECT COUNT(*) FROM planets;"),
    ]
    texts = [(f"### Instruction:\n{q}\n\n### Response:\n", sql) for q, sql in pairs]
    rows = []
    for prompt, response in texts:
        p = tokenizer(prompt)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + r, [-100] * len(p) + r))
    return model, rows


def brute_force(model, rows, *, context: int | None = None) -> float:
    """One forward pass per scored token position, with at most ``context`` previous tokens."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in rows:
            for t in range(1, len(ids)):
                if labels[t] == -100:
                    continue
                start = 0 if context is None else max(0, t - context)
                logits = model(input_ids=torch.tensor([ids[start:t]])).logits[0, -1]
                nll -= torch.log_softmax(logits.double(), dim=-1)[ids[t]].item()
                count += 1
    return math.exp(nll / count)


def test_perplexity_matches_brute_force(model_and_rows) -> None:
    model, rows = model_and_rows
    ppl, tokens = perplexity(model, rows, window=512, stride=256, batch_size=2)  # padded batches
    assert tokens == sum(sum(1 for x in labels[1:] if x != -100) for _, labels in rows)
    assert ppl == pytest.approx(brute_force(model, rows), rel=1e-4)


def test_sliding_window_gives_each_token_the_right_context(model_and_rows) -> None:
    model, rows = model_and_rows
    window = 12
    ppl, _ = perplexity(model, rows, window=window, stride=1)
    assert ppl == pytest.approx(brute_force(model, rows, context=window - 1), rel=1e-4)
    ppl_all, _ = perplexity(model, [(ids, ids) for ids, _ in rows], window=512, stride=512)
    assert ppl_all != pytest.approx(ppl, rel=1e-3)  # scoring prompts too is a different number


def test_paired_bootstrap() -> None:
    same = [True, False] * 50
    assert paired_bootstrap(same, same, samples=500) == (0.0, 0.0, 0.0)
    better = [True] * 80 + [False] * 20
    worse = [True] * 20 + [False] * 80
    diff, low, high = paired_bootstrap(better, worse, samples=2000)
    assert diff == pytest.approx(0.6) and 0.45 < low < diff < high < 0.75
    noisy_a = [i % 3 == 0 for i in range(60)]
    noisy_b = [i % 3 == 1 for i in range(60)]
    diff, low, high = paired_bootstrap(noisy_a, noisy_b, samples=2000)
    assert low < 0 < high  # no difference: the interval crosses zero


def test_scorers(tmp_path: Path) -> None:
    exact = build_scorer(EvalConfig(scorer="exact_match"))
    assert exact(" SELECT 1; ", "SELECT 1;").correct and not exact("SELECT 2;", "SELECT 1;").correct
    regex = build_scorer(EvalConfig(scorer="regex", regex=r"SELECT \d+;"))
    assert regex("SELECT 42;", "ignored").correct and not regex("DROP x;", "ignored").correct
    registered = build_scorer(EvalConfig(scorer="sql_exact"))  # an entry point in pyproject.toml
    assert registered("SELECT  1 ;", "SELECT 1").correct and not registered("SELECT 2", "SELECT 1").correct
    for path in ("operator:eq", "os:system", "subprocess:getoutput"):  # run parameters cannot name code
        with pytest.raises(ValueError, match="is not a known scorer"):
            EvalConfig(scorer=path)
    with pytest.raises(ConfigError, match="evaluate: scorer 'sql_execution' needs evaluate.database"):
        load_run_config(None, [], name="x", base_model="m", data={"source": "s"}, evaluate={"scorer": "sql_execution"})


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "shop.db"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL);")
    conn.executemany("INSERT INTO items VALUES (?,?,?)", [(i, f"item{i}", i * 1.5) for i in range(50)])
    conn.commit()
    conn.close()
    return path


def test_generated_sql_cannot_harm_the_database(db: Path) -> None:
    score = sql_execution_scorer(db, timeout_s=0.5)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    gold = "SELECT COUNT(*) FROM items"
    hostile = [
        "DROP TABLE items",
        "DELETE FROM items",
        "UPDATE items SET price = 0",
        "ATTACH DATABASE ':memory:' AS x",
        "PRAGMA writable_schema = ON",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r",
    ]
    started = time.monotonic()
    results = [score(sql, gold) for sql in hostile]
    assert time.monotonic() - started < 5  # the runaway CTE is cut at 0.5 s
    assert not any(r.correct for r in results)
    assert all(r.error for r in results)
    assert results[-1].error == "timed out after 0.5 s"
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert score("SELECT COUNT(id) FROM items", gold).correct  # a different query with the same result
    assert not score("SELECT COUNT(*) FROM items WHERE id > 1", gold).correct
