"""Shared fixtures: one real service of each kind per test session, on loopback.

Expensive things (the S3 endpoint, the MLflow server, the vLLM server, a tiny model) are session
scoped and started lazily, only when a test asks for them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Never let boto3 probe the EC2 instance-metadata address while looking for credentials.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def s3_server(services_dir: Path) -> Iterator[object]:
    from infra.services import start_s3

    with start_s3(services_dir) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the session's S3 endpoint, with the environment pointing boto3 at it."""
    for key, value in s3_server.client_env().items():
        monkeypatch.setenv(key, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    return bucket


@pytest.fixture(scope="session")
def mlflow_server(services_dir: Path, s3_server) -> Iterator[object]:
    from infra.services import start_mlflow

    with start_mlflow(services_dir, s3=s3_server) as server:
        yield server


def _base_model(recipe_name: str, tmp_path_factory: pytest.TempPathFactory):
    """A base model from the per-user cache (built there on first use, ≈7 min for sql-small on 2 cores)."""
    from infra.artifacts import ArtifactStore, LocalBackend
    from infra.settings import load_settings
    from offline.base_model import RECIPES, ensure_base_model

    store = ArtifactStore(LocalBackend(tmp_path_factory.mktemp("store")), tmp_path_factory.mktemp("cache"))
    return ensure_base_model(RECIPES[recipe_name], store=store, cache_dir=load_settings().cache_dir)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory):
    """The quick tier's base model: the sql-tiny recipe (same code, ≈20 s to build)."""
    return _base_model("sql-tiny", tmp_path_factory)


@pytest.fixture(scope="session")
def base_model(tmp_path_factory: pytest.TempPathFactory):
    """The real offline base model (sql-small recipe)."""
    return _base_model("sql-small", tmp_path_factory)


@pytest.fixture(scope="session")
def demo_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from offline.demo_task import build_demo_task

    out = tmp_path_factory.mktemp("demo-task")
    build_demo_task(out)
    return out


@pytest.fixture(scope="session")
def vllm_server(services_dir: Path, base_model) -> Iterator[object]:
    """One vLLM-CPU server per session, serving the offline base model with runtime LoRA enabled."""
    from infra.vllm_server import VllmLaunch, start_vllm

    launch = VllmLaunch(model=base_model.path, served_model_name="base", max_lora_rank=16)
    with start_vllm(launch, python=REPO / ".venv-vllm" / "bin" / "python", workdir=services_dir) as server:
        yield server


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory):
    """A local artifact store shared by the session's pipeline fixtures."""
    from infra.artifacts import ArtifactStore, LocalBackend

    root = tmp_path_factory.mktemp("demo-store")
    return ArtifactStore(LocalBackend(root / "store"), root / "cache")


def _demo_config(demo_task: Path, *overrides: str):
    from tasks.config import load_run_config

    return load_run_config(
        REPO / "deployments" / "configs" / "tiny-cpu.yaml",
        [
            f"data.source={demo_task / 'train.jsonl'}",
            f"data.test_file={demo_task / 'test.jsonl'}",
            f"data.extra_test.paraphrase={demo_task / 'test_paraphrase.jsonl'}",
            f"evaluate.database={demo_task / 'retail.db'}",
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def demo_config(demo_task: Path):
    """Build the tiny-cpu preset pointed at the session's demo task: ``demo_config("key=value", ...)``."""
    return lambda *overrides: _demo_config(demo_task, *overrides)


@pytest.fixture(scope="session")
def demo_base(base_model):
    from tasks.base_model import ResolvedModel

    return ResolvedModel("tuneship/sql-small", str(base_model.path), base_model.ref.sha256)


@pytest.fixture(scope="session")
def demo_dataset(demo_task: Path, demo_base, demo_store, tmp_path_factory: pytest.TempPathFactory):
    from tasks.preprocess import preprocess

    cfg = _demo_config(demo_task)
    return preprocess(
        cfg.preprocess, cfg.data, name=cfg.name, base=demo_base, store=demo_store, workdir=tmp_path_factory.mktemp("w")
    )


@pytest.fixture(scope="session")
def demo_adapter(demo_task: Path, demo_base, demo_store, demo_dataset, mlflow_server, tmp_path_factory):
    """The demo's adapter, trained with the full tiny-cpu preset (≈2.5 min on 2 cores)."""
    from infra.tracking import MlflowTracker
    from tasks.finetune import finetune

    tracker = MlflowTracker(mlflow_server.tracking_uri, system_metrics=False)
    cfg = _demo_config(demo_task)
    return finetune(
        cfg.finetune,
        demo_dataset,
        name=cfg.name,
        base=demo_base,
        store=demo_store,
        tracker=tracker,
        workdir=tmp_path_factory.mktemp("w"),
    )


@pytest.fixture(scope="session")
def weak_adapter(demo_config, demo_base, demo_store, demo_dataset, mlflow_server, tmp_path_factory):
    """A shorter run of the demo preset (300 steps): better than the base, clearly worse than the full run."""
    from infra.tracking import MlflowTracker
    from tasks.finetune import finetune

    tracker = MlflowTracker(mlflow_server.tracking_uri, system_metrics=False)
    cfg = demo_config("finetune.train.max_steps=300")
    return finetune(
        cfg.finetune,
        demo_dataset,
        name=cfg.name,
        base=demo_base,
        store=demo_store,
        tracker=tracker,
        workdir=tmp_path_factory.mktemp("w"),
    )


def small_evaluation(examples: int) -> tuple[str, ...]:
    """The overrides of a small evaluation on the demo task (``examples`` questions per split), as the deploy tests
    register them: the deploy only needs the recorded outputs."""
    return f"evaluate.max_examples={examples}", "evaluate.parity_sample=4"


@pytest.fixture(scope="session")
def demo_evaluation(demo_config, demo_base, demo_store, demo_dataset, vllm_server, mlflow_server, tmp_path_factory):
    """``demo_evaluation(adapter, examples)``: the adapter's small evaluation on the demo task, made once per
    session (its overrides: ``demo_evaluation.overrides(examples)``). A report names no registered model, so modules
    that register the same adapter under the same evaluation (the deploy and the replicas tests) share it."""
    from infra.tracking import MlflowTracker
    from tasks.evaluate import evaluate

    tracker = MlflowTracker(mlflow_server.tracking_uri, system_metrics=False)
    work = tmp_path_factory.mktemp("evaluations")
    reports = {}

    def evaluated(adapter, examples: int):
        key = (adapter.sha256, examples)
        if key not in reports:
            cfg = demo_config(*small_evaluation(examples))
            reports[key] = evaluate(
                cfg.evaluate, adapter, demo_dataset, base=demo_base, store=demo_store, tracker=tracker, workdir=work,
                server_url=vllm_server.base_url, served_base="base",
            )  # fmt: skip
        return reports[key]

    evaluated.overrides = small_evaluation
    return evaluated


@pytest.fixture(scope="session")
def clinic_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The second offline task (an outpatient clinic's database), for serving two fine-tunes from one base."""
    from offline.clinic_task import build_clinic_task

    out = tmp_path_factory.mktemp("clinic-task")
    build_clinic_task(out)
    return out


@pytest.fixture(scope="session")
def clinic_config(clinic_task: Path):
    """The clinic-cpu preset pointed at the session's clinic task: ``clinic_config("key=value", ...)``."""
    from tasks.config import load_run_config

    def build(*overrides: str):
        return load_run_config(
            REPO / "deployments" / "configs" / "clinic-cpu.yaml",
            [
                f"data.source={clinic_task / 'train.jsonl'}",
                f"data.test_file={clinic_task / 'test.jsonl'}",
                f"evaluate.database={clinic_task / 'clinic.db'}",
                *overrides,
            ],
        )

    return build


@pytest.fixture(scope="session")
def clinic_adapter(clinic_config, demo_base, demo_store, mlflow_server, tmp_path_factory):
    """A fine-tune of the same base on the clinic task (clinic-cpu preset, 4 epochs: ≈1 min on 2 cores)."""
    from infra.tracking import MlflowTracker
    from tasks.finetune import finetune
    from tasks.preprocess import preprocess

    cfg = clinic_config("finetune.train.epochs=4")
    dataset = preprocess(
        cfg.preprocess, cfg.data, name=cfg.name, base=demo_base, store=demo_store, workdir=tmp_path_factory.mktemp("w")
    )
    tracker = MlflowTracker(mlflow_server.tracking_uri, system_metrics=False)
    adapter = finetune(
        cfg.finetune,
        dataset,
        name=cfg.name,
        base=demo_base,
        store=demo_store,
        tracker=tracker,
        workdir=tmp_path_factory.mktemp("w"),
    )
    return adapter, dataset


@pytest.fixture(scope="session")
def prefect_server(services_dir: Path) -> Iterator[object]:
    """One real `prefect server` per session (SQLite, its own PREFECT_HOME), ≈10 s to start."""
    from infra.services import start_prefect

    with start_prefect(services_dir) as server:
        yield server


@pytest.fixture(scope="session")
def pii_corpus() -> dict[str, list[str]]:
    """≥ 200 distinct personal-data strings of every kind the scrubber knows, in the formats people type them.

    Numbers are drawn at random and kept only when they are real: phone numbers valid in their numbering plan
    (libphonenumber), card numbers with a Luhn check digit, IBANs with ISO 7064 check digits. ``ticket`` is a
    user-configured pattern (``TCK-`` and six digits).
    """
    import ipaddress
    import random

    import phonenumbers
    from stdnum import iban, luhn

    rng = random.Random(20261128)
    names = ["ana", "li.wei", "o'neil", "jo-ann", "SAM", "kaito", "fatima", "bjorn", "noor", "d.smith"]
    domains = ["example.com", "mail.example.org", "shop.example.co.uk", "corp.example.io", "EXAMPLE.NET"]
    kinds: dict[str, set[str]] = {k: set() for k in ("email", "phone", "card", "iban", "ip", "ticket")}
    while len(kinds["email"]) < 200:
        tag = rng.choice(["", f"+{rng.randint(1, 99)}", f"{rng.randint(1, 9999)}"])
        kinds["email"].add(f"{rng.choice(names).replace(chr(39), '')}{tag}@{rng.choice(domains)}")
    formats = [phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.E164]
    plans = {"US": (1, 10, ["415", "212", "646", "303", "617", "512"]), "GB": (44, 10, ["20", "161", "7700"])}
    while len(kinds["phone"]) < 200:
        region = rng.choice(list(plans))
        code, length, prefixes = plans[region]
        prefix = rng.choice(prefixes)
        national = prefix + "".join(
            rng.choice("23456789" if i == 0 else "0123456789") for i in range(length - len(prefix))
        )
        number = phonenumbers.parse(f"+{code}{national}")
        if not phonenumbers.is_valid_number(number):
            continue
        style = rng.choice([*formats, phonenumbers.PhoneNumberFormat.NATIONAL])
        kinds["phone"].add(phonenumbers.format_number(number, style))
    for prefix, length in [("4", 16), ("51", 16), ("55", 16), ("37", 15), ("6011", 16)] * 60:
        body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
        digits = body + luhn.calc_check_digit(body)
        sep = rng.choice(["", " ", "-"])
        kinds["card"].add(sep.join(digits[i : i + 4] for i in range(0, len(digits), 4)) if sep else digits)
    bbans = {
        "DE": lambda: _digits(rng, 18),
        "GB": lambda: "NWBK" + _digits(rng, 14),
        "NL": lambda: "ABNA" + _digits(rng, 10),
    }
    while len(kinds["iban"]) < 200:
        country = rng.choice(list(bbans))
        bban = bbans[country]()
        number = country + iban.calc_check_digits(country + "00" + bban) + bban
        kinds["iban"].add(iban.format(number) if rng.random() < 0.5 else number)
    while len(kinds["ip"]) < 200:
        if rng.random() < 0.6:
            kinds["ip"].add(".".join(str(rng.randint(1, 254)) for _ in range(4)))
        else:
            kinds["ip"].add(str(ipaddress.IPv6Address(rng.getrandbits(128))))
    while len(kinds["ticket"]) < 200:
        kinds["ticket"].add(f"TCK-{rng.randint(0, 999999):06d}")
    return {kind: sorted(values) for kind, values in kinds.items()}


def _digits(rng, count: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(count))
