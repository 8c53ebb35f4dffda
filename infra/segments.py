"""The request and feedback logs in the artifact store: record ids, the segment layout, its writer and readers.

The gateway writes (``serving.request_log``), curation reads (``tasks.curate``). One segment is one artifact
directory, complete once its manifest is written (last, by ``ArtifactStore.put_dir``):

    requests/YYYY/MM/DD/HH/<first issue ms, 12 hex>-<replica>-<seq>/records.jsonl.gz   one JSON record per line
                                                                   /index.json         request id → key id, model
    feedback/YYYY/MM/DD/HH/…/records.jsonl.gz

Request ids are ``<12 hex: issue time in ms><16 hex: random>``; a batch item adds ``-<index>``. The OpenAI routes
answer them as ``cmpl-<id>`` / ``chatcmpl-<id>``.
"""

from __future__ import annotations

import collections
import gzip
import json
import logging
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from infra.artifacts import ArtifactStore

log = logging.getLogger("tuneship.request_log")

REQUESTS, FEEDBACK = "requests", "feedback"
RECORDS_FILE, INDEX_FILE = "records.jsonl.gz", "index.json"
REQUEST_ID = re.compile(r"(?:chatcmpl-|cmpl-)?([0-9a-f]{12})([0-9a-f]{16})(-\d{1,4})?")
SERVED_VERSION = re.compile(r"(.+)-v(\d+)")


def new_request_id() -> str:
    return f"{time.time_ns() // 1_000_000:012x}{random.getrandbits(64):016x}"


def parse_request_id(value: str) -> tuple[str, float] | None:
    """The bare request id in ``value`` (``cmpl-`` / ``chatcmpl-`` removed) and its issue time, or None."""
    match = REQUEST_ID.fullmatch(value)
    if match is None:
        return None
    return match.group(1) + match.group(2) + (match.group(3) or ""), int(match.group(1), 16) / 1000


def request_issued(request_id: str) -> float:
    """When a (bare) request id was issued, in seconds since the epoch."""
    return int(request_id[:12], 16) / 1000


def registered(served: str) -> tuple[str, int | None]:
    """The registered model name and version behind a served model name (``retail-sql-v3`` → retail-sql, 3)."""
    match = SERVED_VERSION.fullmatch(served)
    return (match.group(1), int(match.group(2))) if match else (served, None)


def iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def hour_prefix(prefix: str, seconds: float) -> str:
    return f"{prefix}/{datetime.fromtimestamp(seconds, UTC):%Y/%m/%d/%H}"


def segment_hours(prefix: str, issued: float) -> list[str]:
    """The hour folders that can hold the record of a request issued at ``issued``: a segment is filed under the
    hour its *first* record was issued, and a segment gathers records for a while (the flush interval, and the
    requests that ran long), so the record may sit under the hour before or the hour after its own."""
    return sorted({hour_prefix(prefix, issued + shift) for shift in (-3600, 0, 3600)})


def read_segment(store: ArtifactStore, key: str) -> list[dict[str, Any]]:
    """The records of one complete segment (verified against its manifest)."""
    path = store.get_dir(key) / RECORDS_FILE
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def segment_keys(store: ArtifactStore, prefix: str) -> list[str]:
    """Keys of the complete segments under ``prefix`` (``requests`` or ``feedback``, or a day or hour in them)."""
    return store.keys(prefix)


class SegmentWriter:
    """Items in (from any thread, never blocking), segments out (from one daemon thread)."""

    def __init__(
        self,
        store: ArtifactStore,
        prefix: str,
        prepare: Callable[[Any], dict[str, Any]],
        *,
        flush_records: int,
        flush_interval_s: float,
        max_pending: int,
        replica: str,
        on_drop: Callable[[], None],
        on_segment: Callable[[int], None],
    ) -> None:
        self.store, self.prefix, self.prepare = store, prefix, prepare
        self.flush_records, self.flush_interval_s, self.max_pending = flush_records, flush_interval_s, max_pending
        self.replica, self.on_drop, self.on_segment = replica, on_drop, on_segment
        self.pending: collections.deque[Any] = collections.deque()
        self.wake = threading.Event()
        self.closing = False
        self.segments = 0
        self.written = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"{prefix}-log-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, item: Any) -> bool:
        """Queue ``item``; False (and counted) when the queue is full."""
        pending = self.pending
        if len(pending) >= self.max_pending:
            self.on_drop()
            return False
        pending.append(item)
        if len(pending) >= self.flush_records:
            self.wake.set()
        return True

    def _run(self) -> None:
        while True:
            self.wake.wait(self.flush_interval_s)
            self.wake.clear()
            closing = self.closing
            while self.pending:
                self._write(min(len(self.pending), self.flush_records))
            with self._idle:
                self._idle.notify_all()
            if closing:
                return

    def _write(self, count: int) -> None:
        items = [self.pending.popleft() for _ in range(count)]
        records = []
        for item in items:
            try:
                records.append(self.prepare(item))
            except Exception:  # a record that cannot be read is dropped and counted, never the segment
                log.exception("request log: could not prepare a record")
                self.on_drop()
        if not records:
            return
        first = records[0]["issued_ms"] / 1000
        self.segments += 1
        key = f"{hour_prefix(self.prefix, first)}/{records[0]['issued_ms']:012x}-{self.replica}-{self.segments:06d}"
        index = {r["request_id"]: [r["key_id"], r.get("served")] for r in records} if self.prefix == REQUESTS else None
        for attempt in range(5):
            try:
                with tempfile.TemporaryDirectory(prefix="tuneship-segment-") as tmp:
                    folder = Path(tmp)
                    with gzip.open(folder / RECORDS_FILE, "wb", compresslevel=6) as out:
                        out.writelines(orjson.dumps(r) + b"\n" for r in records)
                    if index is not None:  # who made each request: what feedback is checked against
                        (folder / INDEX_FILE).write_text(json.dumps(index))
                    self.store.put_dir(folder, key, overwrite=True)
                break
            except Exception:
                if attempt == 4:
                    log.exception("request log: segment %s lost (%d records)", key, len(records))
                    for _ in records:
                        self.on_drop()
                    return
                time.sleep(0.5 * 2**attempt)
        self.written += len(records)
        self.on_segment(len(records))

    def flush(self, timeout: float = 30.0) -> bool:
        """Write everything queued now; True once the queue was empty (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self.pending and time.monotonic() < deadline:
                self.wake.set()
                self._idle.wait(max(0.0, min(1.0, deadline - time.monotonic())))
        return not self.pending

    def close(self, timeout: float = 60.0) -> None:
        """Write what is queued and stop the thread."""
        self.closing = True
        self.wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
