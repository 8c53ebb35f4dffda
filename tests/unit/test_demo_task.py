"""The demo task: every gold query runs, splits are disjoint, output is deterministic, schema is unseen by the base."""

from __future__ import annotations

import json
import random
import re
import sqlite3
from pathlib import Path

from offline.demo_task import build_demo_task
from offline.sql_corpus import generate_example
from tasks.sql_exec import connect_readonly, execute_sql

DEMO_TABLES = {"customers", "products", "stores", "employees", "orders", "order_items"}


def load(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sizes_and_shape(demo_task: Path) -> None:
    train, test = load(demo_task / "train.jsonl"), load(demo_task / "test.jsonl")
    assert len(train) >= 2000 and len(test) >= 300
    assert all(set(row) == {"instruction", "response"} for row in train + test)
    db = sqlite3.connect(demo_task / "retail.db")
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == DEMO_TABLES
    total = sum(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables)
    assert total >= 3000
    db.execute("PRAGMA foreign_keys = ON")
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []


def test_every_gold_query_runs_and_returns_rows(demo_task: Path) -> None:
    conn = connect_readonly(demo_task / "retail.db")
    for row in load(demo_task / "train.jsonl") + load(demo_task / "test.jsonl"):
        result = execute_sql(conn, row["response"])
        assert result.ok, (row, result.error)
        assert result.rows, row


def test_splits_share_no_question(demo_task: Path) -> None:
    train = [r["instruction"] for r in load(demo_task / "train.jsonl")]
    test = [r["instruction"] for r in load(demo_task / "test.jsonl")]
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)


def test_covers_joins_aggregates_filters_ordering(demo_task: Path) -> None:
    sql = [r["response"] for r in load(demo_task / "train.jsonl")]
    for construct in (
        " JOIN ",
        "COUNT(*)",
        "SUM(",
        "AVG(",
        "MAX(",
        "MIN(",
        " WHERE ",
        " AND ",
        " GROUP BY ",
        " ORDER BY ",
        " LIMIT ",
        "DISTINCT",
        " > ",
        " < ",
    ):
        share = sum(construct in s for s in sql) / len(sql)
        assert share > 0.01, f"{construct!r} in only {share:.1%} of the train queries"


def test_deterministic(demo_task: Path, tmp_path: Path) -> None:
    build_demo_task(tmp_path)
    for name in ("train.jsonl", "test.jsonl", "schema.sql"):
        assert (tmp_path / name).read_bytes() == (demo_task / name).read_bytes(), name
    dump = lambda p: list(sqlite3.connect(p).iterdump())  # noqa: E731
    assert dump(tmp_path / "retail.db") == dump(demo_task / "retail.db")


def test_generic_corpus_never_uses_the_demo_tables() -> None:
    rng = random.Random(1)
    for _ in range(5000):
        sql = generate_example(rng).sql
        tables = set(re.findall(r"(?:FROM|JOIN) (\w+)", sql))
        assert not tables & DEMO_TABLES, sql
