"""Untrusted SQL runs read-only, cannot write, attach or pragma, and is stopped by a time limit."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import pytest

from tasks.sql_exec import connect_readonly, execute_sql, is_ordered, results_match


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "t.db"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, v REAL);")
    conn.executemany("INSERT INTO t VALUES (?,?,?)", [(i, f"n{i}", i / 3) for i in range(100)])
    conn.commit()
    conn.close()
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE t",
        "DELETE FROM t",
        "UPDATE t SET name = 'x'",
        "INSERT INTO t VALUES (1000, 'x', 1)",
        "CREATE TABLE u (a)",
        "ATTACH DATABASE ':memory:' AS other",
        "PRAGMA writable_schema = ON",
        "PRAGMA table_info(t)",
        "SELECT 1; DROP TABLE t",
    ],
)
def test_writes_attach_and_pragma_are_refused(db: Path, sql: str) -> None:
    before = digest(db)
    result = execute_sql(connect_readonly(db), sql)
    assert not result.ok and result.error
    assert digest(db) == before


def test_runaway_query_is_stopped_by_the_time_limit(db: Path) -> None:
    runaway = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"
    started = time.monotonic()
    result = execute_sql(connect_readonly(db), runaway, timeout_s=0.5)
    assert result.error == "timed out after 0.5 s"
    assert time.monotonic() - started < 5


def test_reads_work(db: Path) -> None:
    result = execute_sql(connect_readonly(db), "SELECT COUNT(*), MAX(v) FROM t WHERE id < 10")
    assert result.ok and result.rows == [(10, 3.0)]


def test_result_comparison() -> None:
    assert results_match([(1, "a"), (2, "b")], [(2, "b"), (1, "a")], ordered=False)
    assert not results_match([(1, "a"), (2, "b")], [(2, "b"), (1, "a")], ordered=True)
    assert results_match([(1 / 3,)], [(0.3333333334,)], ordered=True)
    assert results_match([(2,)], [(2.0,)], ordered=True)
    assert not results_match([(1,)], [(1,), (1,)], ordered=False)
    assert not results_match([("1",)], [(1,)], ordered=False)
    assert is_ordered("SELECT a FROM t\nORDER  BY a") and not is_ordered("SELECT border_by FROM t")
