"""The request log: a record of every completion the gateway serves, and the feedback users send on them.

The request path only appends to a bounded in-memory queue (a few microseconds, ``make bench``:
request_log); a background thread turns queued items into records, scrubs personal data out of every text
(:mod:`infra.pii`) and writes them as *segments* to the artifact store, under ``requests/`` and ``feedback/``
(the layout: :mod:`infra.segments`).

A segment is written every ``flush_records`` records or ``flush_interval_s`` seconds, whichever comes first,
and on shutdown (SIGTERM: nothing queued is lost). A process killed with SIGKILL loses what was not yet in a
complete segment: the records of the last ``flush_interval_s`` seconds, at most ``2 × flush_records`` at a
high rate (one segment being written, one filling). A full queue drops the record and counts it
(``tuneship_request_log_dropped_total``); it never blocks a request.

Modes (``TUNESHIP_REQUEST_LOG``): ``off`` logs nothing and refuses feedback; ``metadata`` keeps ids, models,
token counts, finish reasons and latency but no prompt or output; ``full`` keeps the scrubbed texts too.

Request ids are ``<12 hex: issue time in ms><16 hex: random>`` (a batch item adds ``-<index>``); the OpenAI
routes answer them as ``cmpl-<id>`` / ``chatcmpl-<id>`` (vLLM takes the id from the ``X-Request-Id`` the gateway
sends it), and ``POST /feedback`` accepts either form.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import random
import time
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from infra.artifacts import ArtifactStore
from infra.pii import Scrubber
from infra.segments import (
    FEEDBACK,
    INDEX_FILE,
    REQUESTS,
    SegmentWriter,
    iso_time,
    new_request_id,
    registered,
    request_issued,
    segment_hours,
    segment_keys,
)

Mode = Literal["off", "metadata", "full"]
REQUEST_ID_HEADER = "X-Request-Id"
SERVED_HEADER = "X-Served-Model"  # the served id (NAME-vN, base) that answered: which version it was


class RequestLogConfig(BaseModel):
    """How the gateway logs requests and feedback (from ``TUNESHIP_REQUEST_LOG*`` settings)."""

    model_config = ConfigDict(frozen=True)

    mode: Mode = "full"
    flush_records: int = Field(default=256, ge=1, description="write a segment once this many records wait")
    flush_interval_s: float = Field(default=5.0, gt=0, description="… or once the oldest has waited this long")
    max_pending: int = Field(default=10_000, ge=1, description="queued records beyond this are dropped, counted")
    pii_patterns: dict[str, str] = Field(default_factory=dict, description="extra patterns to scrub, by name")
    pii_regions: list[str] = Field(default_factory=lambda: ["US", "GB"], description="phone numbering plans")
    max_request_s: float = Field(default=300.0, gt=0, description="longest a request may run (the upstream timeout)")
    index_size: int = Field(default=100_000, ge=1, description="recent request ids each replica remembers")
    feedback_window: int = Field(default=200, ge=1, description="feedback per model behind the thumbs-down rate")

    @property
    def join_window_s(self) -> float:
        """How long after its issue a request's record may still be on its way to the store (another replica's)."""
        return self.max_request_s + 2 * self.flush_interval_s + 5


class Origin(BaseModel):
    """Who made a request and which model answered it: what feedback on it is checked against."""

    key_id: str
    served: str | None


class RequestLog:
    """The gateway's request and feedback logs, with the index that feedback is checked against."""

    def __init__(self, store: ArtifactStore, config: RequestLogConfig, metrics: Any = None) -> None:
        self.store, self.config, self.metrics = store, config, metrics
        self.scrub = Scrubber(config.pii_patterns, regions=config.pii_regions)
        self.replica = f"{random.getrandbits(32):08x}"
        self.recent: dict[str, tuple[str, str | None]] = {}  # request id → (key id, served model)
        self._segment_index: dict[str, dict[str, list[str | None]]] = {}
        self._key_ids: dict[str, str] = {}
        self.down: dict[str, collections.deque[bool]] = {}
        counted = {
            "on_drop": self._dropped,
            "on_segment": self._segment,
            "flush_records": config.flush_records,
            "flush_interval_s": config.flush_interval_s,
            "max_pending": config.max_pending,
            "replica": self.replica,
        }
        self.requests = SegmentWriter(store, REQUESTS, self._request_record, **counted)
        self.feedback = SegmentWriter(store, FEEDBACK, self._feedback_record, **counted)

    @property
    def full(self) -> bool:
        return self.config.mode == "full"

    def start(self) -> None:
        self.requests.start()
        self.feedback.start()

    def close(self) -> None:
        self.requests.close()
        self.feedback.close()

    def flush(self) -> bool:
        return self.requests.flush() & self.feedback.flush()

    def _dropped(self) -> None:
        if self.metrics is not None:
            self.metrics.log_dropped.inc()

    def _segment(self, records: int) -> None:
        if self.metrics is not None:
            self.metrics.log_records.inc(records)
            self.metrics.log_segments.inc()

    # The request path ------------------------------------------------------------------------------------------

    def key_id(self, key: str) -> str:
        """A stable, non-reversible id for an API key (``open`` on a gateway without keys)."""
        if not key:
            return "open"
        if (found := self._key_ids.get(key)) is None:
            found = self._key_ids[key] = hashlib.sha256(key.encode()).hexdigest()[:16]
        return found

    def issued(self, request_id: str, key_id: str, served: str | None) -> None:
        """Remember who made ``request_id`` (for feedback checks before its segment is written)."""
        recent = self.recent
        if len(recent) >= self.config.index_size:
            del recent[next(iter(recent))]
        recent[request_id] = (key_id, served)

    def completed(self, **item: Any) -> None:
        """Queue one request's record. Items are raw (the request model, the engine's bytes): the writer thread
        parses and scrubs them, so the request path spends only an append here."""
        self.requests.put(item)

    # The writer thread -----------------------------------------------------------------------------------------

    def _request_record(self, item: dict[str, Any]) -> dict[str, Any]:
        request_id = item["request_id"]
        issued_ms = int(request_issued(request_id) * 1000)
        name, version = registered(item["served"])
        prompt, outputs, finish, usage = _read_exchange(item)
        record: dict[str, Any] = {
            "request_id": request_id,
            "issued_ms": issued_ms,
            "time": iso_time(issued_ms / 1000),
            "key_id": item["key_id"],
            "route": item["route"],
            "alias": item["alias"],
            "served": item["served"],
            "model": name,
            "version": version,
            "finish_reason": finish,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "latency_s": round(item["latency_s"], 4),
            "error": item.get("error"),
        }
        if self.full:
            record["prompt"] = self.scrub.value(prompt)
            record["output"] = self.scrub.value(outputs[0] if len(outputs) == 1 else outputs)
        return record

    def _feedback_record(self, item: dict[str, Any]) -> dict[str, Any]:
        item = dict(item)
        for field in ("correction", "comment"):
            if item.get(field) is not None:
                item[field] = self.scrub(item[field])
        return item

    # Feedback --------------------------------------------------------------------------------------------------

    def origin(self, request_id: str) -> Origin | None:
        """Who made ``request_id``: from this replica's memory, else from the written segments (blocking I/O)."""
        if (found := self.recent.get(request_id)) is not None:
            return Origin(key_id=found[0], served=found[1])
        for hour in segment_hours(REQUESTS, request_issued(request_id)):
            for key in segment_keys(self.store, hour):
                if key not in self._segment_index:
                    if len(self._segment_index) >= 10_000:  # a long-running replica: forget, read again if asked
                        self._segment_index.clear()
                    index = json.loads((self.store.get_dir(key) / INDEX_FILE).read_text())
                    self._segment_index[key] = index
                if (entry := self._segment_index[key].get(request_id)) is not None:
                    return Origin(key_id=str(entry[0]), served=entry[1])
        return None

    def rate(self, request_id: str, key_id: str, origin: Origin | None, **feedback: Any) -> None:
        """Queue a feedback record and count it (``tuneship_feedback_total``, the thumbs-down rate)."""
        now = time.time()
        served = origin.served if origin else None
        name, version = registered(served) if served else (None, None)
        record = {
            "feedback_id": new_request_id(),
            "issued_ms": int(now * 1000),
            "time": iso_time(now),
            "request_id": request_id,
            "key_id": key_id,
            "served": served,
            "model": name,
            "version": version,
            "joined": origin is not None,
            **feedback,
        }
        self.feedback.put(record)
        if self.metrics is not None and served is not None:
            window = self.down.setdefault(served, collections.deque(maxlen=self.config.feedback_window))
            window.append(feedback["rating"] == "down")
            self.metrics.feedback.labels(rating=feedback["rating"], model=served).inc()
            self.metrics.down_ratio.labels(model=served).set(sum(window) / len(window))
        elif self.metrics is not None:
            self.metrics.feedback.labels(rating=feedback["rating"], model="unjoined").inc()


def _documents(raw: list[bytes]) -> list[Any]:
    """The engine's JSON documents (one answer, or a stream's chunks), parsed in one pass of the C decoder;
    one at a time only when some chunk is not JSON (that one is skipped). orjson: twice the speed of json here."""
    try:
        return orjson.loads(b"[" + b",".join(raw) + b"]")
    except orjson.JSONDecodeError:
        documents = []
        for one in raw:
            with contextlib.suppress(orjson.JSONDecodeError):
                documents.append(orjson.loads(one))
        return documents


def _read_exchange(item: dict[str, Any]) -> tuple[Any, list[str], Any, dict[str, Any]]:
    """(prompt, outputs, finish reason(s), usage) from what a route queued."""
    req = item.get("req")
    prompt: Any = item.get("prompt")
    if prompt is None and req is not None:
        prompt = [m.model_dump(exclude_none=True) for m in req.messages] if hasattr(req, "messages") else req.prompt
    if "text" in item:  # /generate: the route already has the text
        return prompt, [item["text"]], item.get("finish_reason"), item.get("usage") or {}
    texts: dict[int, list[str]] = collections.defaultdict(list)
    finishes: dict[int, str | None] = {}
    usage: dict[str, Any] = {}
    raw = [item["answer"]] if item.get("answer") else item.get("chunks") or []
    for document in _documents(raw):  # a stream has a document per token: kept tight
        if type(document) is not dict:
            continue
        usage = document.get("usage") or usage
        for choice in document.get("choices") or ():
            piece = choice.get("text")
            if piece is None:
                part = choice.get("delta") or choice.get("message")
                piece = part.get("content") if part else None
            index = choice.get("index", 0)
            if piece:
                texts[index].append(piece)
            if finish := choice.get("finish_reason"):
                finishes[index] = finish
    order = sorted(set(texts) | set(finishes)) or [0]
    finish_list = [finishes.get(i) for i in order]
    finish = finish_list[0] if len(finish_list) == 1 else finish_list
    return prompt, ["".join(texts.get(i, [])) for i in order], finish, usage
