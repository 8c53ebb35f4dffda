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


RESOURCE_ATTACKS = [
    "SELECT randomblob(1e9)",
    "SELECT zeroblob(1e9)",
    "SELECT printf('%.*c', 9e8, 'x')",
    "SELECT length(printf('%.*c', 9e6, 'x') || printf('%.*c', 9e6, 'x'))",
    "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < 2000) "
    "SELECT length(group_concat(hex(printf('%.*c', 1e6, 'x')))) FROM r",
    "SELECT replace(hex(printf('%.*c', 4e6, 'x')), '7', hex(printf('%.*c', 4e6, 'x')))",
    "WITH RECURSIVE r(i, s) AS (SELECT 1, 'x' UNION ALL SELECT i + 1, s || s FROM r WHERE i < 40) "
    "SELECT max(length(s)) FROM r",
    "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT i FROM r ORDER BY i DESC LIMIT 1",
    "SELECT a.id FROM t a, t b, t c, t d, t e ORDER BY random() LIMIT 1",
    "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < 5000000) SELECT group_concat(i) FROM r",
]


@pytest.mark.parametrize("sql", RESOURCE_ATTACKS)
def test_resource_attacks_end_within_twice_the_limit_and_256_mb(db: Path, sql: str) -> None:
    """Each statement that only exists to exhaust memory or time is a wrong answer with a reason, fast, and the
    sandbox's process stays under its memory bound; the next statement runs normally."""
    with connect_readonly(db) as sandbox:
        assert execute_sql(sandbox, "SELECT 1").rows == [(1,)]
        started = time.monotonic()
        result = execute_sql(sandbox, sql, timeout_s=1.0)
        elapsed = time.monotonic() - started
        peak_mb = _peak_rss_mb(sandbox)
        assert (not result.ok and result.error) or result.rows == [(None,)], result  # past the length limit: NULL
        assert elapsed < 2.0, (elapsed, result.error)
        assert peak_mb is None or peak_mb < 256, peak_mb
        assert execute_sql(sandbox, "SELECT COUNT(*) FROM t").rows == [(100,)]


def _peak_rss_mb(sandbox) -> float | None:
    """The sandbox process's peak resident memory (None when it was killed and is gone)."""
    if sandbox.proc is None:
        return None
    for line in Path(f"/proc/{sandbox.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def test_blobs_round_trip_and_the_sandbox_survives_a_crash(db: Path) -> None:
    with connect_readonly(db) as sandbox:
        assert execute_sql(sandbox, "SELECT x'00ff', 1.5, NULL, 'a'").rows == [(b"\x00\xff", 1.5, None, "a")]
        sandbox.proc.kill()  # as if the kernel had killed it
        sandbox.proc.wait()
        assert execute_sql(sandbox, "SELECT 2").rows == [(2,)]  # a new one starts for the next statement
