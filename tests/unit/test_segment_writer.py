"""The request log's writer on a real local artifact store: segments by count and by time, manifest-complete
segments only, a full queue that drops and counts instead of blocking, shutdown that writes everything, and the
reading of the engine's raw answers (JSON documents and SSE chunks) into records."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from infra.artifacts import ArtifactStore, LocalBackend
from infra.segments import new_request_id, parse_request_id, read_segment, registered, segment_keys
from serving.contract import ChatCompletionRequest
from serving.metrics import GatewayMetrics
from serving.request_log import RequestLog, RequestLogConfig


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(LocalBackend(tmp_path / "store"), tmp_path / "cache")


def _queue(log: RequestLog, count: int, **extra: object) -> list[str]:
    ids = []
    for i in range(count):
        rid = new_request_id()
        log.issued(rid, "k1", "retail-sql-v3")
        log.completed(
            request_id=rid, key_id="k1", route="/generate", alias="champion", served="retail-sql-v3",
            latency_s=0.01, prompt=f"question {i} from ana@example.com", text="SELECT 1", finish_reason="stop",
            usage={"prompt_tokens": 5, "completion_tokens": 2}, **extra,
        )  # fmt: skip
        ids.append(rid)
    return ids


def _stored(store: ArtifactStore, prefix: str = "requests") -> list[dict]:
    return [r for key in segment_keys(store, prefix) for r in read_segment(store, key)]


def test_segments_by_count_then_by_time_with_scrubbed_texts(store: ArtifactStore) -> None:
    metrics = GatewayMetrics()
    log = RequestLog(store, RequestLogConfig(flush_records=10, flush_interval_s=0.3), metrics)
    log.start()
    try:
        ids = _queue(log, 25)
        deadline = time.monotonic() + 10
        while len(_stored(store)) < 25 and time.monotonic() < deadline:
            time.sleep(0.1)
        records = _stored(store)
    finally:
        log.close()
    assert [r["request_id"] for r in records] == ids  # in order, each once
    assert len(segment_keys(store, "requests")) == 3  # 10 + 10 by count, the last 5 by time
    first = records[0]
    assert first["prompt"] == "question 0 from <EMAIL>" and first["output"] == "SELECT 1"
    assert (first["model"], first["version"], first["completion_tokens"]) == ("retail-sql", 3, 2)
    assert metrics.log_records._value.get() == 25 and metrics.log_segments._value.get() == 3


def test_close_writes_everything_queued(store: ArtifactStore) -> None:
    log = RequestLog(store, RequestLogConfig(flush_records=1000, flush_interval_s=3600))
    log.start()
    ids = _queue(log, 37)
    assert _stored(store) == []  # neither the count nor the time has come
    log.close()
    assert [r["request_id"] for r in _stored(store)] == ids


def test_a_full_queue_drops_and_counts_without_blocking(store: ArtifactStore) -> None:
    metrics = GatewayMetrics()
    log = RequestLog(store, RequestLogConfig(max_pending=5, flush_records=1000, flush_interval_s=3600), metrics)
    started = time.perf_counter()
    _queue(log, 12)  # the writer is not started: nothing drains the queue
    assert time.perf_counter() - started < 1.0
    assert metrics.log_dropped._value.get() == 7
    log.start()
    log.close()
    assert len(_stored(store)) == 5


def test_metadata_mode_keeps_no_text(store: ArtifactStore) -> None:
    log = RequestLog(store, RequestLogConfig(mode="metadata"))
    log.start()
    _queue(log, 3)
    log.close()
    records = _stored(store)
    assert len(records) == 3 and all("prompt" not in r and "output" not in r for r in records)
    assert records[0]["completion_tokens"] == 2 and records[0]["finish_reason"] == "stop"


def test_a_segment_without_its_manifest_is_never_read(store: ArtifactStore, tmp_path: Path) -> None:
    log = RequestLog(store, RequestLogConfig())
    log.start()
    _queue(log, 2)
    log.close()
    (key,) = segment_keys(store, "requests")
    half = tmp_path / "store" / key.replace("-000001", "-000002")
    half.mkdir(parents=True)
    (half / "records.jsonl.gz").write_bytes(b"\x1f\x8b half written")
    assert segment_keys(store, "requests") == [key]


def test_engine_answers_are_read_into_records(store: ArtifactStore) -> None:
    log = RequestLog(store, RequestLogConfig())
    chat = ChatCompletionRequest.model_validate(
        {"model": "champion", "messages": [{"role": "user", "content": "call me on +44 20 7946 0958"}]}
    )
    chunks = [
        json.dumps({"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {"content": "SELECT "}}]}).encode(),
        json.dumps({"choices": [{"index": 0, "delta": {"content": "1"}, "finish_reason": "stop"}]}).encode(),
        json.dumps({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}).encode(),
    ]
    base = {"key_id": "k", "route": "/v1/chat/completions", "alias": "champion", "served": "base", "latency_s": 0.1}
    streamed = log._request_record({"request_id": new_request_id(), "req": chat, "chunks": chunks, **base})
    assert streamed["prompt"] == [{"role": "user", "content": "call me on <PHONE>"}]
    assert (streamed["output"], streamed["finish_reason"], streamed["completion_tokens"]) == ("SELECT 1", "stop", 2)
    answer = json.dumps(
        {"choices": [{"index": i, "text": f"t{i}", "finish_reason": "length"} for i in range(2)], "usage": {}}
    ).encode()
    two = log._request_record({"request_id": new_request_id(), "prompt": "p", "answer": answer, **base})
    assert two["output"] == ["t0", "t1"] and two["finish_reason"] == ["length", "length"]
    assert (two["model"], two["version"]) == ("base", None)


def test_request_ids() -> None:
    rid = new_request_id()
    assert parse_request_id(rid)[0] == rid and abs(parse_request_id(rid)[1] - time.time()) < 5
    assert parse_request_id(f"cmpl-{rid}")[0] == rid == parse_request_id(f"chatcmpl-{rid}")[0]
    assert parse_request_id(f"{rid}-3")[0] == f"{rid}-3"
    for bad in ("", "cmpl-xyz", rid[:-1], rid + "0", f"{rid}; drop table", "../" + rid):
        assert parse_request_id(bad) is None
    assert registered("retail-sql-v12") == ("retail-sql", 12) and registered("base") == ("base", None)


def test_a_record_is_looked_for_in_the_hours_around_its_issue() -> None:
    from infra.segments import segment_hours

    issued = 1_795_830_000.0  # 2026-11-28T01:40:00Z
    assert segment_hours("requests", issued) == [
        "requests/2026/11/28/00",
        "requests/2026/11/28/01",
        "requests/2026/11/28/02",
    ]
