"""Fine-tune stage: a LoRA or QLoRA adapter trained with transformers + PEFT (+ bitsandbytes), resumable.

    adapter = finetune(cfg.finetune, data, name=cfg.name, base=resolved, store=store, tracker=tracker,
                       workdir=Path(".tuneship/work"))

Reads top to bottom: pick the device and precision, estimate memory (and stop early if it cannot fit),
load the base (4-bit NF4 or 8-bit for QLoRA), wrap it with LoRA, train with the loss on the response only
and length-grouped batches, upload every checkpoint to the artifact store, and save the adapter. Restarted
with the same ``run_id``, it resumes from the newest complete checkpoint in the store — optimizer,
scheduler, RNG state and data position included, as transformers' ``Trainer`` restores them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from infra.artifacts import ArtifactStore
from infra.errors import UserError
from infra.tracking import MlflowTracker
from tasks.base_model import ResolvedModel
from tasks.config import FinetuneConfig, LoraSettings, TrainSettings
from tasks.preprocess import load_splits
from tasks.refs import AdapterRef, DatasetRef

GIB = 1024**3


class FinetuneError(UserError, RuntimeError):
    """The fine-tune cannot run as configured; the message says what to change."""


# --------------------------------------------------------------------------------- pure builders


def pick_device(requested: Literal["auto", "cpu", "cuda"]) -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("finetune.device: 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def compute_dtype_for(device: str) -> Any:
    """bf16 where the device supports it, fp16 on other GPUs, fp32 on CPU."""
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def build_bnb_config(quantization: str, compute_dtype: Any, *, sharded: bool = False) -> Any:
    """The bitsandbytes config for QLoRA (NF4 with double quantisation, or LLM.int8), or None. ``sharded`` (FSDP,
    DeepSpeed ZeRO-3) stores the packed 4-bit weights in the compute dtype: a shard holds one dtype."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            **({"bnb_4bit_quant_storage": compute_dtype} if sharded else {}),
        )
    return BitsAndBytesConfig(load_in_8bit=True)


REPO = Path(__file__).resolve().parents[1]
LAUNCHED = "TUNESHIP_FINETUNE_LAUNCHED"  # set for the processes `launch` starts: they never launch again


def accelerate_config_path(ft: FinetuneConfig) -> Path | None:
    if ft.accelerate_config is None:
        return None
    path = Path(ft.accelerate_config)
    return path if path.is_absolute() else REPO / path


def sharding(ft: FinetuneConfig) -> str | None:
    """FSDP or DEEPSPEED when ``finetune.accelerate_config`` shards the model across processes, else None."""
    import yaml

    path = accelerate_config_path(ft)
    if path is None:
        return None
    try:
        kind = str(yaml.safe_load(path.read_text()).get("distributed_type", ""))
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        raise FinetuneError(f"finetune.accelerate_config: cannot read {path}: {exc}") from None
    return kind if kind in ("FSDP", "DEEPSPEED") else None


def load_base_for_training(base: ResolvedModel, ft: FinetuneConfig, *, device: str, compute_dtype: Any) -> Any:
    """The base model as the fine-tune trains on it: 16-bit/fp32, or quantized for QLoRA (sharded: no device map,
    FSDP / ZeRO-3 place the shards)."""
    from transformers import AutoModelForCausalLM

    sharded = sharding(ft) is not None
    return AutoModelForCausalLM.from_pretrained(
        base.path,
        dtype=compute_dtype,
        quantization_config=build_bnb_config(ft.quantization, compute_dtype, sharded=sharded),
        device_map={"": device} if ft.quantization != "none" and not sharded else None,
    )


def build_lora_config(lora: LoraSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_training_args(
    train: TrainSettings,
    output_dir: Path,
    *,
    device: str,
    compute_dtype: Any,
    has_eval: bool,
    report_to: tuple[str, ...] = (),
    run_name: str | None = None,
) -> Any:
    """``TrainingArguments`` from our settings: mixed precision only where the device supports it."""
    import torch
    from transformers import TrainingArguments

    on_gpu = device == "cuda"
    evaluate = "no"
    if has_eval:
        evaluate = "steps" if train.eval_steps else train.save_strategy
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.micro_batch_size,
        per_device_eval_batch_size=max(train.micro_batch_size, 8),
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        logging_steps=train.logging_steps,
        save_strategy=train.save_strategy,
        save_steps=train.save_steps,
        eval_strategy=evaluate,
        eval_steps=train.eval_steps or (train.save_steps if train.save_strategy == "steps" else None),
        train_sampling_strategy="group_by_length" if train.batching == "group_by_length" else "random",
        bf16=on_gpu and compute_dtype == torch.bfloat16,
        fp16=on_gpu and compute_dtype == torch.float16,
        use_cpu=not on_gpu,
        seed=train.seed,
        data_seed=train.seed,
        report_to=list(report_to) or "none",  # MLflow is logged by the stage itself; W&B through Trainer
        run_name=run_name,
        save_total_limit=None,
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=True,
    )


def per_process(train: TrainSettings, processes: int) -> TrainSettings:
    """Each of ``processes`` data-parallel processes' share of the global batch (micro × accumulation): the same
    global batch, so the same optimizer steps, as one process."""
    if processes == 1:
        return train
    micro, acc = train.micro_batch_size, train.gradient_accumulation_steps
    if acc % processes == 0:
        acc //= processes
    elif micro % processes == 0:
        micro //= processes
    else:  # the config validator guarantees the global batch divides
        share = micro * acc // processes
        micro = max(d for d in range(1, micro + 1) if share % d == 0)
        acc = share // micro
    return train.model_copy(update={"micro_batch_size": micro, "gradient_accumulation_steps": acc})


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes `accelerate launch` started (one: rank 0 of 1)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls) -> World:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()


class _Silent:
    """The tracker of a process other than rank 0: rank 0 alone logs to MLflow."""

    @contextlib.contextmanager
    def run(self, run_key: str, **kwargs: Any) -> Iterator[str]:
        yield ""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


# ------------------------------------------------------------------------------- memory estimate


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    lora_params: int
    optimizer_gib: float
    activations_gib: float
    available_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.optimizer_gib + self.activations_gib

    def describe(self) -> str:
        return (
            f"weights {self.weights_gib:.2f} GiB + LoRA/optimizer {self.optimizer_gib:.2f} GiB "
            f"({self.lora_params:,} trainable) + activations {self.activations_gib:.2f} GiB "
            f"= {self.total_gib:.2f} GiB of {self.available_gib:.1f} GiB available"
        )


def estimate_memory(
    base: ResolvedModel, cfg: FinetuneConfig, *, max_seq_len: int, device: str, compute_dtype: Any
) -> MemoryEstimate:
    """Estimate training memory from the model's config, without loading its weights."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base.path)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    dtype_bytes = torch.tensor([], dtype=compute_dtype).element_size()
    per_param = {"none": dtype_bytes, "int8": 1.0, "nf4": 0.5 + 0.127 / 8}[cfg.quantization]  # + double-quant scales
    quantizable = lora_params = other = 0
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            quantizable += module.weight.numel()
            if name.split(".")[-1] in cfg.lora.target_modules:
                lora_params += cfg.lora.r * (module.in_features + module.out_features)
    other = sum(p.numel() for p in skeleton.parameters()) - quantizable
    shards = cfg.processes if sharding(cfg) else 1  # FSDP / ZeRO-3: each process holds its shard
    weights = (quantizable * per_param + other * dtype_bytes) / shards
    optimizer = lora_params * (4 + 4 + 4 + 4) / shards  # fp32 weight, grad, Adam m and v
    # Activations per layer ≈ 34·s·b·h bytes at 16 bit (Korthikanti et al., 2022) with memory-efficient
    # attention (SDPA/flash: no s² score matrix kept). With gradient checkpointing only each layer's input
    # (2·s·b·h) is kept, plus one layer's full activations while it is recomputed.
    sbh = cfg.train.micro_batch_size * max_seq_len * config.hidden_size
    layers = config.num_hidden_layers
    stored = (2 * sbh * layers + 34 * sbh) if cfg.gradient_checkpointing else 34 * sbh * layers
    logits = cfg.train.micro_batch_size * max_seq_len * config.vocab_size * 4 * 2  # fp32 logits and their grad
    act_bytes = stored * dtype_bytes / 2 + logits
    if cfg.memory_limit_gib is not None:
        available = cfg.memory_limit_gib * GIB
    elif device == "cuda":
        available = torch.cuda.mem_get_info()[1]
    else:
        import psutil

        available = psutil.virtual_memory().available
    return MemoryEstimate(weights / GIB, lora_params, optimizer / GIB, act_bytes / GIB, available / GIB)


# ---------------------------------------------------------------------------------- the stage


def default_run_id(
    name: str, cfg: FinetuneConfig, data: DatasetRef, base: ResolvedModel, init: AdapterRef | None = None
) -> str:
    """Same name, config, data, base (and starting adapter) → same run id: a re-run resumes or reuses."""
    parts = [cfg.model_dump(mode="json"), data.fingerprint, base.id, base.revision]
    blob = json.dumps(parts + ([init.sha256] if init else []), sort_keys=True)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _check_init(init: AdapterRef, ft: FinetuneConfig, base: ResolvedModel) -> None:
    """An adapter training may continue from: trained on these base weights, with this LoRA shape."""
    problems = []
    if (init.base_model, init.base_model_revision) != (base.id, base.revision):
        problems.append(f"it was trained on {init.base_model}@{init.base_model_revision[:12]}, not {base.id}")
    if init.rank != ft.lora.r or sorted(init.target_modules) != sorted(ft.lora.target_modules):
        problems.append(
            f"its LoRA is rank {init.rank} on {sorted(init.target_modules)}, the config's rank {ft.lora.r} on "
            f"{sorted(ft.lora.target_modules)}"
        )
    if problems:
        raise FinetuneError(
            f"finetune.init_from: cannot continue from adapter {init.artifact.uri}: " + "; ".join(problems)
        )


def _latest_checkpoint(store: ArtifactStore, run_id: str) -> tuple[int, Path] | None:
    refs = store.list(f"runs/{run_id}/checkpoints/")
    steps = [
        (int(ref.key.rsplit("-", 1)[1]), ref) for ref in refs if ref.key.rsplit("/", 1)[1].startswith("checkpoint-")
    ]
    if not steps:
        return None
    step, ref = max(steps, key=lambda item: item[0])
    return step, store.get_dir(ref)


def _callbacks(store: ArtifactStore, run_id: str, tracker: MlflowTracker, start: dict[str, float]) -> list[Any]:
    from transformers import TrainerCallback

    class RecordStart(TrainerCallback):
        """Where this process's training began: past 0 when Trainer resumed from a checkpoint."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            start.update(step=float(state.global_step), epoch=float(state.epoch or 0))

    class UploadCheckpoints(TrainerCallback):
        """Every checkpoint Trainer writes goes to the artifact store (manifest last: complete or invisible)."""

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not state.is_world_process_zero:
                return
            name = f"checkpoint-{state.global_step}"
            store.put_dir(Path(args.output_dir) / name, f"runs/{run_id}/checkpoints/{name}", overwrite=True)

    class LogToMlflow(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            numbers = {k: v for k, v in (logs or {}).items() if isinstance(v, int | float) and math.isfinite(v)}
            if numbers:
                tracker.log_metrics(numbers, step=state.global_step)

    return [RecordStart(), UploadCheckpoints(), LogToMlflow()]


def _loss_curve(history: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _peak_memory_gib(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB


def finetune(
    cfg: FinetuneConfig,
    data: DatasetRef,
    *,
    name: str,
    base: ResolvedModel,
    store: ArtifactStore,
    tracker: MlflowTracker,
    workdir: Path,
    run_id: str | None = None,
    init: AdapterRef | None = None,
    report_to: tuple[str, ...] = (),
) -> AdapterRef:
    """Train a LoRA/QLoRA adapter on ``data`` and store it; resume if ``run_id`` has checkpoints.

    ``name`` (the run's name) prefixes the run id, which defaults to a hash of ``cfg``, the data and the base.
    With ``init`` (``finetune.init_from: champion``), training continues from that adapter's weights instead of
    a new LoRA; it must be on the same base with the same rank and target modules.

    Under ``accelerate launch`` (``finetune.processes`` > 1, see ``launch``) every process trains its share of each
    global batch; rank 0 alone logs to MLflow, uploads checkpoints and stores the adapter, and every rank returns
    its ref. ``report_to`` names Trainer integrations besides MLflow (``wandb``).
    """
    import torch
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer

    ft = cfg
    if init is not None:
        _check_init(init, ft, base)
    run_id = run_id or default_run_id(name, cfg, data, base, init)
    adapter_key = f"adapters/{run_id}"
    if store.exists(adapter_key):  # finished before: the stage is idempotent
        saved = json.loads((store.get_dir(adapter_key) / "tuneship_adapter.json").read_text())
        return AdapterRef(artifact=store.ref(adapter_key), **saved)

    world = World.from_env()
    if not world.main:
        tracker = _Silent()  # type: ignore[assignment]
    device = pick_device(ft.device)
    if ft.processes > 1 and world.size == 1:  # this process launches the data-parallel ones
        if os.environ.get(LAUNCHED):
            raise FinetuneError(f"accelerate launch started one process, not finetune.processes={ft.processes}")
        return launch(
            cfg,
            data,
            name=name,
            base=base,
            store=store,
            tracker=tracker,
            workdir=workdir,
            run_id=run_id,
            init=init,
            report_to=report_to,
            device=device,
        )
    dtype = compute_dtype_for(device)
    estimate = estimate_memory(base, ft, max_seq_len=data.max_seq_len, device=device, compute_dtype=dtype)
    if estimate.total_gib > estimate.available_gib:
        raise FinetuneError(
            f"the fine-tune will not fit: {estimate.describe()}. Lower finetune.train.micro_batch_size "
            f"(raising gradient_accumulation_steps keeps the effective batch), lower preprocess.max_seq_len, "
            f"set finetune.gradient_checkpointing: true, or use finetune.quantization: nf4"
        )

    splits = load_splits(data, store)
    train_set, eval_set = splits["train"], splits["eval"] if len(splits["eval"]) else None
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    out = workdir / f"finetune-{run_id}"
    out.mkdir(parents=True, exist_ok=True)
    tokens_per_epoch = sum(len(ids) for ids in train_set["input_ids"])

    with tracker.run(run_id, stage="finetune", tags={"tuneship.dataset_fingerprint": data.fingerprint}) as mlflow_run:
        tracker.log_params(
            {
                "run_id": run_id,
                "name": name,
                "base_model": base.id,
                "base_revision": base.revision,
                "finetune": cfg.model_dump(mode="json"),
            }
        )
        tracker.log_metrics({"memory_estimate_gib": estimate.total_gib, "train_rows": len(train_set)})
        tracker.set_tags({"tuneship.memory_estimate": estimate.describe()})
        torch.manual_seed(ft.train.seed)
        model = load_base_for_training(base, ft, device=device, compute_dtype=dtype)
        if ft.quantization != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ft.gradient_checkpointing)
        elif ft.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if init is not None:
            model = PeftModel.from_pretrained(model, store.get_dir(init.artifact), is_trainable=True)
        else:
            model = get_peft_model(model, build_lora_config(ft.lora))

        train = per_process(ft.train, world.size)
        resumed_from = 0
        start: dict[str, float] = {}
        attempts = 0
        started = time.perf_counter()
        while True:
            latest = _latest_checkpoint(store, run_id)
            args = build_training_args(
                train,
                out,
                device=device,
                compute_dtype=dtype,
                has_eval=eval_set is not None,
                report_to=report_to,
                run_name=run_id,
            )
            collator = DataCollatorForSeq2Seq(
                tokenizer,
                padding="max_length" if train.batching == "padded" else True,
                max_length=data.max_seq_len if train.batching == "padded" else None,
                label_pad_token_id=-100,
            )
            trainer = Trainer(
                model=model,
                args=args,
                train_dataset=train_set,
                eval_dataset=eval_set,
                data_collator=collator,
                processing_class=tokenizer,
                callbacks=_callbacks(store, run_id, tracker, start),
            )
            if latest and not resumed_from:
                resumed_from = latest[0]
                tracker.set_tags({"tuneship.resumed_from_step": resumed_from})
            try:
                result = trainer.train(resume_from_checkpoint=str(latest[1]) if latest else None)
                break
            except torch.OutOfMemoryError as exc:
                attempts += 1
                if attempts > train.max_oom_retries or train.micro_batch_size == 1:
                    raise FinetuneError(
                        f"CUDA out of memory at micro_batch_size={train.micro_batch_size}: {exc}"
                    ) from exc
                train = train.model_copy(
                    update={
                        "micro_batch_size": train.micro_batch_size // 2,
                        "gradient_accumulation_steps": train.gradient_accumulation_steps * 2,
                    }
                )
                torch.cuda.empty_cache()
        seconds = time.perf_counter() - started

        history = trainer.state.log_history
        epochs_here = float(trainer.state.epoch or 0) - start.get("epoch", 0.0)
        metrics = {
            "train_loss": float(result.training_loss),
            "global_step": float(trainer.state.global_step),
            "resumed_from_step": float(resumed_from),
            "start_step": start.get("step", 0.0),
            "train_seconds": seconds,
            "tokens_per_s": tokens_per_epoch * epochs_here / seconds if seconds else 0.0,
            "peak_memory_gib": _peak_memory_gib(device),
            "micro_batch_size_effective": float(train.micro_batch_size),
        }
        if eval_set is not None:
            metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
        if "wandb" in report_to and world.main:  # close the W&B run: its summary holds the final metrics
            import wandb

            wandb.log({f"tuneship/{k}": v for k, v in metrics.items()})
            wandb.finish()
        if not world.main:  # rank 0 stores the adapter; the others return its ref
            world.barrier()
            saved = json.loads((store.get_dir(adapter_key) / "tuneship_adapter.json").read_text())
            return AdapterRef(artifact=store.ref(adapter_key), **saved)
        tracker.log_metrics(metrics, step=trainer.state.global_step)
        tracker.log_artifact(_loss_curve(history, out / "loss_curve.png"))

        adapter_dir = out / "adapter"
        shutil.rmtree(adapter_dir, ignore_errors=True)
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        (adapter_dir / "trainer_log_history.json").write_text(json.dumps(history, indent=1))
        saved = {
            "base_model": base.id,
            "base_model_revision": base.revision,
            "rank": ft.lora.r,
            "alpha": ft.lora.alpha,
            "target_modules": list(ft.lora.target_modules),
            "quantization": ft.quantization,
            "dataset_fingerprint": data.fingerprint,
            "run_id": run_id,
            "mlflow_run_id": mlflow_run,
            "metrics": metrics,
            "init_sha256": init.sha256 if init else None,
        }
        (adapter_dir / "tuneship_adapter.json").write_text(json.dumps(saved, indent=1))
        final = store.put_dir(adapter_dir, adapter_key, overwrite=True)
        ref = AdapterRef(artifact=final, **saved)
        tracker.set_tags({"tuneship.adapter_uri": final.uri, "tuneship.adapter_sha256": final.sha256})
        world.barrier()
        return ref


# --------------------------------------------------------------------------- data-parallel launch


def launch(
    cfg: FinetuneConfig,
    data: DatasetRef,
    *,
    name: str,
    base: ResolvedModel,
    store: ArtifactStore,
    tracker: MlflowTracker,
    workdir: Path,
    run_id: str,
    init: AdapterRef | None,
    report_to: tuple[str, ...],
    device: str,
) -> AdapterRef:
    """Train with ``cfg.processes`` processes under ``accelerate launch`` (gloo on CPU, NCCL on GPUs, FSDP or
    DeepSpeed with ``cfg.accelerate_config``) and return the ref rank 0 stored. The launcher and its processes are
    one process group: an interrupted or failed stage stops them all."""
    import signal
    import subprocess
    import sys
    import tempfile

    from infra.services import free_port, parent_death_signal

    request = {
        "cfg": cfg.model_dump(mode="json"),
        "data": data.model_dump(mode="json"),
        "name": name,
        "base": {"id": base.id, "revision": base.revision, "path": str(base.path)},
        "store": {"root": store.root_uri, "cache_dir": str(store.cache_dir)},
        "tracker": {
            "tracking_uri": tracker.tracking_uri,
            "experiment": tracker.experiment,
            "system_metrics": tracker.system_metrics,
            "artifact_location": tracker.artifact_location,
        },
        "workdir": str(workdir),
        "run_id": run_id,
        "init": init.model_dump(mode="json") if init else None,
        "report_to": list(report_to),
    }
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        result = Path(tmp) / "adapter.json"
        command = [sys.executable, "-m", "accelerate.commands.launch"]
        command += launch_args(cfg, device, port=free_port())
        command += ["-m", "tasks.finetune", str(Path(tmp) / "request.json"), str(result)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", LAUNCHED: "1"}
        if device == "cpu":  # the machine's cores shared between the processes, not oversubscribed
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.processes)))
        # Its own process group (cleanup below), and SIGTERM if this process dies: torchrun then stops the ranks.
        proc = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=parent_death_signal())
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None or code != 0:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if code != 0 or not result.exists():
            raise RuntimeError(f"accelerate launch of {cfg.processes} fine-tune processes exited {code}")
        return AdapterRef.model_validate_json(result.read_text())


def launch_args(cfg: FinetuneConfig, device: str, *, port: int) -> list[str]:
    """``accelerate launch`` options for ``cfg`` (before the training module)."""
    args = ["--num_machines", "1", "--num_processes", str(cfg.processes), "--main_process_port", str(port)]
    if (config := accelerate_config_path(cfg)) is not None:
        return [*args, "--config_file", str(config)]
    # accelerate's torchrun launcher; on CPU (no --cpu: that is its one-process launcher) Trainer joins a gloo group.
    return [*args, "--multi_gpu", "--dynamo_backend", "no", *(["--mixed_precision", "no"] if device == "cpu" else [])]


def _main(argv: list[str]) -> None:
    """One data-parallel process (``python -m tasks.finetune REQUEST RESULT`` under ``accelerate launch``)."""
    import signal

    from infra.services import parent_death_signal

    # torchrun starts each rank in its own session: a launcher killed outright (SIGKILL) must take its ranks along.
    if (die_with_parent := parent_death_signal(signal.SIGKILL)) is not None:
        die_with_parent()
    from infra.artifacts import open_store
    from infra.settings import Settings

    request = json.loads(Path(argv[0]).read_text())
    settings = Settings(artifact_root=request["store"]["root"], cache_dir=Path(request["store"]["cache_dir"]))
    store = open_store(settings, check=False)
    tracker = MlflowTracker(**request["tracker"])
    init = AdapterRef.model_validate(request["init"]) if request["init"] else None
    ref = finetune(
        FinetuneConfig.model_validate(request["cfg"]),
        DatasetRef.model_validate(request["data"]),
        name=request["name"],
        base=ResolvedModel(**request["base"]),
        store=store,
        tracker=tracker,
        workdir=Path(request["workdir"]),
        run_id=request["run_id"],
        init=init,
        report_to=tuple(request["report_to"]),
    )
    if World.from_env().main:
        Path(argv[1]).write_text(ref.model_dump_json())


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
