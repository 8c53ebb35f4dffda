"""Running untrusted, model-generated SQL against a SQLite database, and comparing result sets.

Generated SQL is untrusted. It runs on a read-only connection (``mode=ro`` URI), under an authorizer
that allows reads only (no writes, no ``ATTACH``, no ``PRAGMA``), with a progress handler that aborts it
after a time limit. Any error or time-out is a wrong answer, recorded with its reason.
"""

from __future__ import annotations

import math
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

_ALLOWED = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_RECURSIVE,
}


def _authorizer(action: int, *_: object) -> int:
    return sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY


@dataclass(frozen=True)
class ExecResult:
    rows: list[tuple[object, ...]] | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def connect_readonly(db_path: Path) -> sqlite3.Connection:
    """A read-only connection with the authorizer installed."""
    conn = sqlite3.connect(f"{Path(db_path).resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    conn.set_authorizer(_authorizer)
    return conn


def execute_sql(conn: sqlite3.Connection, sql: str, *, timeout_s: float = 2.0, max_rows: int = 10_000) -> ExecResult:
    """Execute one statement; errors, denials and time-outs come back as ``ExecResult.error``."""
    deadline = time.monotonic() + timeout_s
    conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10_000)
    try:
        cursor = conn.execute(sql)
        rows = cursor.fetchmany(max_rows + 1)
    except sqlite3.Warning as exc:  # e.g. "You can only execute one statement at a time."
        return ExecResult(None, f"rejected: {exc}")
    except sqlite3.DatabaseError as exc:
        message = str(exc)
        if message == "interrupted":
            message = f"timed out after {timeout_s:g} s"
        return ExecResult(None, message)
    finally:
        conn.set_progress_handler(None, 0)
    if len(rows) > max_rows:
        return ExecResult(None, f"more than {max_rows} rows")
    return ExecResult([tuple(r) for r in rows])


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cells_equal(a: object, b: object, rel_tol: float) -> bool:
    if _is_number(a) and _is_number(b):
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)  # type: ignore[arg-type]
    return a == b


def _sort_key(row: tuple[object, ...]) -> tuple[tuple[int, object], ...]:
    return tuple((0, round(v, 6)) if _is_number(v) else (1, repr(v)) for v in row)  # type: ignore[call-overload]


def results_match(
    gold: list[tuple[object, ...]], pred: list[tuple[object, ...]], *, ordered: bool, rel_tol: float = 1e-6
) -> bool:
    """Equal result sets, numbers within ``rel_tol``; row order matters only when ``ordered``."""
    if len(gold) != len(pred):
        return False
    if not ordered:
        gold, pred = sorted(gold, key=_sort_key), sorted(pred, key=_sort_key)
    return all(
        len(g) == len(p) and all(_cells_equal(x, y, rel_tol) for x, y in zip(g, p, strict=True))
        for g, p in zip(gold, pred, strict=True)
    )


def is_ordered(sql: str) -> bool:
    """True when the query specifies its result order (an ORDER BY)."""
    return re.search(r"\border\s+by\b", sql, flags=re.IGNORECASE) is not None
