"""Running untrusted, model-generated SQL against a SQLite database, and comparing result sets.

Generated SQL is untrusted. It runs in a child process (:class:`SqlSandbox`) on a read-only connection
(``mode=ro`` URI), under an authorizer that allows reads only (no writes, no ``ATTACH``, no ``PRAGMA``, none
of the functions that only make large blobs), with SQLite's length limit on every string and blob, a progress
handler that stops it after its time limit, and a cap on the rows and bytes it returns. The child has an
address-space limit (256 MB), and the parent kills it when a statement overruns its time limit by three
quarters (the progress handler only runs between SQLite opcodes) and starts a new one for the next statement. Any error,
time-out or resource failure is a wrong answer, recorded with its reason; the caller's process never runs out
of memory on a generated query.

    sandbox = connect_readonly(Path("retail.db"))
    execute_sql(sandbox, "SELECT COUNT(*) FROM orders")   # ExecResult(rows=[(1200,)])
"""

from __future__ import annotations

import base64
import json
import math
import re
import select
import sqlite3
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ALLOWED = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_RECURSIVE,
}
# Functions whose only use in a query is to allocate: denied outright (the length limit bounds the rest).
_DENIED_FUNCTIONS = {"randomblob", "zeroblob", "load_extension", "readfile", "writefile", "fts3_tokenizer"}
MEMORY_LIMIT_MB = 256
MAX_LENGTH = 10_000_000  # bytes in one string or blob (SQLITE_LIMIT_LENGTH)
MAX_RESULT_BYTES = 16_000_000


def _authorizer(action: int, arg1: str | None, arg2: str | None, *_: object) -> int:
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY


@dataclass(frozen=True)
class ExecResult:
    rows: list[tuple[object, ...]] | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _open(db_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"{Path(db_path).resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_LENGTH)
    conn.set_authorizer(_authorizer)
    return conn


def _cell(value: object) -> object:
    return {"$b": base64.b64encode(value).decode()} if isinstance(value, bytes) else value


def _uncell(value: object) -> object:
    return base64.b64decode(value["$b"]) if isinstance(value, dict) else value


def _run(conn: sqlite3.Connection, sql: str, timeout_s: float, max_rows: int) -> dict[str, Any]:
    """One statement in the child: ``{"rows": [...]}`` or ``{"error": reason}``."""
    deadline = time.monotonic() + timeout_s
    conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10_000)
    try:
        rows = conn.execute(sql).fetchmany(max_rows + 1)
    except sqlite3.Warning as exc:  # e.g. "You can only execute one statement at a time."
        return {"error": f"rejected: {exc}"}
    except sqlite3.DatabaseError as exc:
        message = str(exc)
        return {"error": f"timed out after {timeout_s:g} s" if message == "interrupted" else message}
    except MemoryError:
        return {"error": f"out of memory (the sandbox's limit is {MEMORY_LIMIT_MB} MB)"}
    finally:
        conn.set_progress_handler(None, 0)
    if len(rows) > max_rows:
        return {"error": f"more than {max_rows} rows"}
    return {"rows": [[_cell(v) for v in row] for row in rows]}


def _child(db_path: str) -> None:
    """The sandbox process: one JSON request per line on stdin, one JSON answer per line on stdout."""
    import resource

    limit = MEMORY_LIMIT_MB * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn = _open(Path(db_path))
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = json.dumps(_run(conn, request["sql"], request["timeout_s"], request["max_rows"]))
            if len(answer) > MAX_RESULT_BYTES:
                answer = json.dumps({"error": f"result over {MAX_RESULT_BYTES} bytes"})
        except MemoryError:
            answer = json.dumps({"error": f"out of memory (the sandbox's limit is {MEMORY_LIMIT_MB} MB)"})
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()


class SqlSandbox:
    """A child process that runs statements against ``db_path`` (read-only), one at a time."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        if not self.db_path.is_file():
            raise FileNotFoundError(f"{self.db_path}: no such SQLite file")
        self.proc: subprocess.Popen[str] | None = None
        self._finalizer: weakref.finalize | None = None  # kills the child if the sandbox is dropped unclosed

    def _start(self) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.sql_exec", str(self.db_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, SqlSandbox._stop, [proc])
        return proc

    @staticmethod
    def _stop(procs: list[subprocess.Popen[str] | None]) -> None:
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    def execute(self, sql: str, *, timeout_s: float = 2.0, max_rows: int = 10_000) -> ExecResult:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps({"sql": sql, "timeout_s": timeout_s, "max_rows": max_rows}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.close()
            return ExecResult(None, "the sandbox process died")
        ready, _, _ = select.select([self.proc.stdout], [], [], max(timeout_s * 1.75, timeout_s + 0.5))
        if not ready:  # stuck inside one SQLite opcode: the progress handler never ran
            self.close()
            return ExecResult(None, f"timed out after {timeout_s:g} s (killed)")
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            return ExecResult(None, f"the sandbox process died (exit {self.proc.wait() if self.proc else '?'})")
        answer = json.loads(line)
        if "error" in answer:
            return ExecResult(None, answer["error"])
        return ExecResult([tuple(_uncell(v) for v in row) for row in answer["rows"]])

    def close(self) -> None:
        if self.proc is not None:
            SqlSandbox._stop([self.proc])
            self.proc = None

    def __enter__(self) -> SqlSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_readonly(db_path: Path) -> SqlSandbox:
    """A sandbox for ``db_path``: read-only, resource-bounded, in its own process (started on first use)."""
    return SqlSandbox(db_path)


def execute_sql(sandbox: SqlSandbox, sql: str, *, timeout_s: float = 2.0, max_rows: int = 10_000) -> ExecResult:
    """Execute one statement; errors, denials, time-outs and resource failures come back as ``ExecResult.error``."""
    return sandbox.execute(sql, timeout_s=timeout_s, max_rows=max_rows)


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


if __name__ == "__main__":
    _child(sys.argv[1])
