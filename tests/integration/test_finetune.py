"""Fine-tune on the offline base and the demo data, against the real S3 endpoint and MLflow server:
LoRA and QLoRA adapters change, the base does not, held-out loss drops, vLLM serves the adapter, and a
killed run resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from infra.artifacts import ArtifactStore, S3Backend, make_s3_client
from infra.tracking import MlflowTracker
from tasks.base_model import ResolvedModel
from tasks.config import load_run_config
from tasks.finetune import FinetuneError, finetune
from tasks.generation import instruction_prompt
from tasks.preprocess import load_splits, preprocess

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TINY_CPU = REPO / "deployments" / "configs" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def s3_store(s3_server, tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    os.environ.update(s3_server.client_env())
    bucket = f"ft-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    return ArtifactStore(
        S3Backend(bucket, "tuneship", make_s3_client(s3_server.endpoint_url)), tmp_path_factory.mktemp("c")
    )


@pytest.fixture(scope="module")
def base(base_model) -> ResolvedModel:
    return ResolvedModel("tuneship/sql-small", str(base_model.path), base_model.ref.sha256)


def config(demo_task: Path, *overrides: str):
    return load_run_config(
        TINY_CPU,
        [
            f"data.source={demo_task / 'train.jsonl'}",
            f"data.test_file={demo_task / 'test.jsonl'}",
            f"data.extra_test.paraphrase={demo_task / 'test_paraphrase.jsonl'}",
            *overrides,
        ],
    )


def eval_loss(model, dataset) -> float:
    """Token-weighted loss on the response tokens of ``dataset``."""
    import torch

    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for row in dataset:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    return total / count


@pytest.fixture(scope="module")
def dataset(demo_task: Path, base: ResolvedModel, s3_store: ArtifactStore, tmp_path_factory: pytest.TempPathFactory):
    cfg = config(demo_task)
    return preprocess(
        cfg.preprocess, cfg.data, name=cfg.name, base=base, store=s3_store, workdir=tmp_path_factory.mktemp("work")
    )


@pytest.mark.parametrize("quantization", ["none", "nf4", "int8"])
def test_adapter_trains_and_base_stays(
    quantization, demo_task, base, s3_store, dataset, mlflow_server, tmp_path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = config(demo_task, f"finetune.quantization={quantization}", "finetune.train.max_steps=60")
    tracker = MlflowTracker(mlflow_server.tracking_uri, experiment=f"test-{uuid.uuid4().hex[:6]}", system_metrics=False)
    adapter = finetune(
        cfg.finetune, dataset, name=cfg.name, base=base, store=s3_store, tracker=tracker, workdir=tmp_path
    )
    assert adapter.quantization == quantization and adapter.rank == 16
    assert adapter.artifact.uri.startswith("s3://") and adapter.metrics["global_step"] == 60

    original = AutoModelForCausalLM.from_pretrained(base.path)
    reference = {k: v.clone() for k, v in original.state_dict().items()}
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base.path), s3_store.get_dir(adapter.artifact)
    )
    for name, param in tuned.named_parameters():
        if "lora_B" in name:
            assert torch.count_nonzero(param) > 0, f"{name} did not move from its zero init"
        elif "lora_" not in name:
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(param, reference[key]), f"base weight {key} changed"

    held_out = load_splits(dataset, s3_store)["eval"]
    before, after = eval_loss(original, held_out), eval_loss(tuned, held_out)
    print(f"{quantization}: held-out response loss {before:.3f} → {after:.3f}")
    assert after < 0.7 * before

    import mlflow

    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    run = mlflow.get_run(adapter.mlflow_run_id)
    assert run.data.params["finetune.quantization"] == quantization
    assert {"loss", "train_loss", "tokens_per_s", "peak_memory_gib", "eval_loss"} <= set(run.data.metrics)
    assert "loss_curve.png" in [f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id)]


def test_vllm_serves_the_adapter_and_it_changes_the_output(
    demo_task, base, s3_store, dataset, mlflow_server, vllm_server, tmp_path
) -> None:
    cfg = config(demo_task, "finetune.train.max_steps=80")
    tracker = MlflowTracker(mlflow_server.tracking_uri, system_metrics=False)
    adapter = finetune(
        cfg.finetune, dataset, name=cfg.name, base=base, store=s3_store, tracker=tracker, workdir=tmp_path
    )
    path = s3_store.get_dir(adapter.artifact)
    load = httpx.post(
        f"{vllm_server.base_url}/v1/load_lora_adapter", json={"lora_name": "retail", "lora_path": str(path)}, timeout=60
    )
    assert load.status_code == 200, load.text
    questions = [json.loads(line)["instruction"] for line in (demo_task / "test.jsonl").read_text().splitlines()[:8]]

    def complete(model: str) -> list[str]:
        body = {
            "model": model,
            "prompt": [instruction_prompt(q) for q in questions],
            "max_tokens": 64,
            "temperature": 0,
        }
        choices = httpx.post(f"{vllm_server.base_url}/v1/completions", json=body, timeout=120).json()["choices"]
        return [c["text"] for c in sorted(choices, key=lambda c: c["index"])]

    base_out, tuned_out = complete("base"), complete("retail")
    assert sum(a != b for a, b in zip(base_out, tuned_out, strict=True)) >= len(questions) // 2
    assert any(t.startswith("SELECT") and ("customers" in t or "orders" in t or "products" in t) for t in tuned_out)


def test_memory_estimate_stops_a_run_that_cannot_fit(demo_task, base, s3_store, dataset, tmp_path) -> None:
    cfg = config(demo_task, "finetune.memory_limit_gib=0.01")
    with pytest.raises(FinetuneError, match=r"will not fit: .* Lower finetune.train.micro_batch_size"):
        finetune(
            cfg.finetune,
            dataset,
            name=cfg.name,
            base=base,
            store=s3_store,
            tracker=MlflowTracker("unused"),
            workdir=tmp_path,
        )


def test_killed_run_resumes_from_its_checkpoint(
    demo_task, s3_server, s3_store, mlflow_server, base_model, tmp_path
) -> None:
    from infra.settings import load_settings

    env = {
        **os.environ,
        **s3_server.client_env(),
        "TUNESHIP_HOME": str(tmp_path / "home"),
        "TUNESHIP_ARTIFACT_ROOT": f"s3://{s3_store.backend.bucket}/resume",
        "TUNESHIP_CACHE_DIR": str(load_settings().cache_dir),
        "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    args = [
        sys.executable,
        "-m",
        "flows.cli",
        "train",
        str(TINY_CPU),
        "--run-id",
        "resume-test",
        "--set",
        f"data.source={demo_task / 'train.jsonl'}",
        "--set",
        f"data.test_file={demo_task / 'test.jsonl'}",
        "--set",
        f"data.extra_test.paraphrase={demo_task / 'test_paraphrase.jsonl'}",
        "--set",
        "finetune.train.save_strategy=steps",
        "--set",
        "finetune.train.save_steps=15",
        "--set",
        "finetune.train.max_steps=45",
    ]
    first = subprocess.Popen(
        args, env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    store = ArtifactStore(S3Backend(s3_store.backend.bucket, "resume", s3_store.backend.client), tmp_path / "cache")
    deadline = time.monotonic() + 600
    while not store.list("runs/resume-test/checkpoints/"):
        assert first.poll() is None, "the first run ended before writing a checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = max(int(r.key.rsplit("-", 1)[1]) for r in store.list("runs/resume-test/checkpoints/"))
    assert killed_at < 45 and not store.exists("adapters/resume-test")

    second = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    saved = json.loads((store.get_dir("adapters/resume-test") / "tuneship_adapter.json").read_text())
    # Trainer itself reports where the second process began: at the newest checkpoint, not at 0.
    assert saved["metrics"]["start_step"] == saved["metrics"]["resumed_from_step"] == killed_at > 0
    assert saved["metrics"]["global_step"] == 45


def test_training_continues_from_an_adapter(demo_task, base, s3_store, dataset, mlflow_server, tmp_path) -> None:
    """finetune.init_from: champion — a few more steps from a trained adapter start where it ended (its held-out
    loss, not the base's), the new adapter records where it came from; a different LoRA shape is refused."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tracker = MlflowTracker(mlflow_server.tracking_uri, experiment=f"test-{uuid.uuid4().hex[:6]}", system_metrics=False)

    def train(*overrides: str, init=None):
        cfg = config(demo_task, *overrides)
        return finetune(
            cfg.finetune, dataset, name=cfg.name, base=base, store=s3_store, tracker=tracker, workdir=tmp_path,
            init=init,
        )  # fmt: skip

    first = train("finetune.train.max_steps=120")
    more = train("finetune.train.max_steps=5", "finetune.init_from=champion", init=first)
    fresh = train("finetune.train.max_steps=5")
    assert more.init_sha256 == first.sha256 and fresh.init_sha256 is None
    assert more.run_id != fresh.run_id  # the starting adapter is part of the run's identity

    held_out = load_splits(dataset, s3_store)["eval"]

    def loss(adapter) -> float:
        model = AutoModelForCausalLM.from_pretrained(base.path)
        return eval_loss(PeftModel.from_pretrained(model, s3_store.get_dir(adapter.artifact)), held_out)

    losses = {"first": loss(first), "more": loss(more), "fresh": loss(fresh)}
    print(f"held-out loss: {losses}")
    assert losses["more"] < 1.2 * losses["first"] and losses["more"] < 0.7 * losses["fresh"]
    with pytest.raises(FinetuneError, match="rank 16 .*the config's rank 8"):
        train("finetune.train.max_steps=5", "finetune.lora.r=8", "finetune.lora.alpha=16", init=first)


# Data-parallel training: `finetune.processes: 2` under `accelerate launch` (gloo on CPU). Measured on this 2-core
# machine at 60 steps: held-out loss 1.637 with one process, 1.659 with two (1.3 % apart; the two see the same
# batches in another order across ranks). The stated tolerance is 5 %.
PROCESSES_TOLERANCE = 0.05


def test_two_processes_train_like_one(demo_task, base, s3_store, dataset, mlflow_server, tmp_path) -> None:
    """Two processes share each global batch (8 rows each instead of 16): the same optimizer steps, a held-out loss
    within the tolerance of one process's, and only rank 0 logs to MLflow (one run, each logged step once), uploads
    checkpoints and stores the adapter."""
    from mlflow import MlflowClient

    experiment = f"dp-{uuid.uuid4().hex[:6]}"
    tracker = MlflowTracker(mlflow_server.tracking_uri, experiment=experiment, system_metrics=False)
    common = ["finetune.train.max_steps=60", "finetune.train.save_strategy=steps", "finetune.train.save_steps=30"]
    refs = {}
    for processes in (1, 2):
        cfg = config(demo_task, *common, f"finetune.processes={processes}")
        refs[processes] = finetune(
            cfg.finetune, dataset, name=cfg.name, base=base, store=s3_store, tracker=tracker, workdir=tmp_path,
            run_id=f"{experiment}-{processes}",
        )  # fmt: skip
    one, two = refs[1].metrics, refs[2].metrics
    print(f"\neval loss: 1 process {one['eval_loss']:.3f}, 2 processes {two['eval_loss']:.3f}; tokens/s "
          f"{one['tokens_per_s']:.0f} vs {two['tokens_per_s']:.0f}")  # fmt: skip
    assert one["global_step"] == two["global_step"] == 60
    assert one["micro_batch_size_effective"] == 16 and two["micro_batch_size_effective"] == 8
    assert abs(two["eval_loss"] - one["eval_loss"]) <= PROCESSES_TOLERANCE * one["eval_loss"]
    history = json.loads((s3_store.get_dir(refs[2].artifact) / "trainer_log_history.json").read_text())
    assert two["eval_loss"] < 0.5 * history[0]["loss"]  # it learned: far below the loss of its first 10 steps

    client = MlflowClient(mlflow_server.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`tuneship.run_key` = '{experiment}-2'")
    assert len(runs) == 1
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert steps and len(steps) == len(set(steps)) == 60 // 10  # logging_steps 10, logged once each
    assert refs[2].mlflow_run_id == runs[0].info.run_id
    checkpoints = sorted(r.key.rsplit("/", 1)[1] for r in s3_store.list(f"runs/{experiment}-2/checkpoints/"))
    assert checkpoints == ["checkpoint-30", "checkpoint-60"]


def _running(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_killed_two_process_run_resumes_from_its_checkpoint(
    demo_task, s3_server, s3_store, mlflow_server, base_model, tmp_path
) -> None:
    """`tuneship train` with two processes, SIGKILLed (the launcher and both ranks) once a checkpoint is in the store:
    run again, both ranks resume from that checkpoint and finish at the last step."""
    from infra.settings import load_settings

    run_id = f"resume-dp-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        **s3_server.client_env(),
        "TUNESHIP_HOME": str(tmp_path / "home"),
        "TUNESHIP_ARTIFACT_ROOT": f"s3://{s3_store.backend.bucket}/resume",
        "TUNESHIP_CACHE_DIR": str(load_settings().cache_dir),
        "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    args = [sys.executable, "-m", "flows.cli", "train", str(TINY_CPU), "--run-id", run_id]
    for override in (
        f"data.source={demo_task / 'train.jsonl'}",
        f"data.test_file={demo_task / 'test.jsonl'}",
        f"data.extra_test.paraphrase={demo_task / 'test_paraphrase.jsonl'}",
        "finetune.processes=2",
        "finetune.train.save_strategy=steps",
        "finetune.train.save_steps=15",
        "finetune.train.max_steps=45",
    ):
        args += ["--set", override]
    first = subprocess.Popen(
        args, env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    store = ArtifactStore(S3Backend(s3_store.backend.bucket, "resume", s3_store.backend.client), tmp_path / "cache")
    deadline = time.monotonic() + 600
    while not store.list(f"runs/{run_id}/checkpoints/"):
        assert first.poll() is None, "the first run ended before writing a checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.5)
    import psutil

    started = psutil.Process(first.pid).children(recursive=True)  # the launcher and both ranks (own sessions)
    assert sum("tasks.finetune" in " ".join(p.cmdline()) for p in started) >= 2
    os.killpg(first.pid, signal.SIGKILL)  # the CLI dies at once; what it started must follow
    first.wait()
    gone, alive = psutil.wait_procs(started, timeout=30)
    running = [p for p in alive if _running(p)]  # a zombie has exited: its reaper (init here) has yet to collect it
    assert not running, f"left running after the CLI was killed: {[p.cmdline()[:4] for p in running]}"
    killed_at = max(int(r.key.rsplit("-", 1)[1]) for r in store.list(f"runs/{run_id}/checkpoints/"))
    assert killed_at < 45 and not store.exists(f"adapters/{run_id}")

    second = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    saved = json.loads((store.get_dir(f"adapters/{run_id}") / "tuneship_adapter.json").read_text())
    assert saved["metrics"]["start_step"] == saved["metrics"]["resumed_from_step"] == killed_at > 0
    assert saved["metrics"]["global_step"] == 45
    assert saved["metrics"]["micro_batch_size_effective"] == 8


def _wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (``run-ID.wandb``): a 7-byte header, then LevelDB-style 32 KiB blocks of
    chunks (crc32, length, type: full / first / middle / last), each record a ``wandb_internal_pb2.Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, header = 32768, 7
    records, chunks, pos = [], [], 7
    while pos + header <= len(raw):
        if block - pos % block < header:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + header])
        if length == 0 and kind == 0:
            break
        chunks.append(raw[pos + header : pos + header + length])
        pos += header + length
        if kind in (1, 4):  # full or last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def test_wandb_offline_beside_mlflow(demo_task, base, s3_store, dataset, mlflow_server, tmp_path) -> None:
    """TUNESHIP_WANDB_MODE=offline: the fine-tune also reports to Weights & Biases (Trainer's report_to), whose
    offline run files hold the training curve and the stage's final metrics; MLflow still gets its run."""
    from infra.settings import Settings, environ, wandb_env

    settings = Settings(home=tmp_path / "home", wandb_mode="offline")
    tracker = MlflowTracker(mlflow_server.tracking_uri, experiment="wandb-test", system_metrics=False)
    cfg = config(demo_task, "finetune.train.max_steps=10", "finetune.train.logging_steps=5")
    run_id = f"wandb-{uuid.uuid4().hex[:6]}"
    with environ(wandb_env(settings)):
        ref = finetune(
            cfg.finetune, dataset, name=cfg.name, base=base, store=s3_store, tracker=tracker, workdir=tmp_path,
            run_id=run_id, report_to=("wandb",),
        )  # fmt: skip
    runs = list((tmp_path / "home" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("run-*.wandb"))
    records = _wandb_records(log)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == run_id and run.project == "tuneship"
    history = [
        {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item} for r in records if r.history.item
    ]
    losses = {int(h["train/global_step"]): float(h["train/loss"]) for h in history if "train/loss" in h}
    assert sorted(losses) == [5, 10]
    final = history[-1]
    assert float(final["tuneship/eval_loss"]) == pytest.approx(ref.metrics["eval_loss"])
    assert float(final["tuneship/global_step"]) == 10
    assert ref.mlflow_run_id  # MLflow is still the system of record
