"""Data-parallel and sharded training settings: each process's share of the global batch, the accelerate configs of
the 70B preset (parsed and validated by accelerate's own launcher code), and the 4-bit storage a sharded QLoRA
needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import ConfigError, TrainSettings, load_run_config
from tasks.finetune import build_bnb_config, launch_args, per_process, sharding

REPO = Path(__file__).resolve().parents[2]
PRESET_70B = REPO / "deployments" / "configs" / "llama3-70b-qlora.yaml"
ACCELERATE = REPO / "deployments" / "accelerate"


@pytest.mark.parametrize(
    ("micro", "acc", "processes", "expected"),
    [
        (16, 1, 2, (8, 1)),
        (1, 16, 8, (1, 2)),
        (4, 4, 2, (4, 2)),
        (6, 1, 3, (2, 1)),
        (3, 4, 6, (2, 1)),
        (4, 3, 1, (4, 3)),
    ],
)
def test_each_process_takes_its_share_of_the_global_batch(micro, acc, processes, expected) -> None:
    share = per_process(TrainSettings(micro_batch_size=micro, gradient_accumulation_steps=acc), processes)
    assert (share.micro_batch_size, share.gradient_accumulation_steps) == expected
    assert share.micro_batch_size * share.gradient_accumulation_steps * processes == micro * acc


def test_a_global_batch_the_processes_cannot_share_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"finetune: .*processes=4 cannot share the global batch of 3 × 1"):
        load_run_config(
            REPO / "deployments" / "configs" / "tiny-cpu.yaml",
            [
                "finetune.processes=4",
                "finetune.train.micro_batch_size=3",
                "finetune.train.gradient_accumulation_steps=1",
            ],
        )


def _launch(args: list[str]):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parsed = launch_command_parser().parse_args([*args, "-m", "tasks.finetune", "request.json", "adapter.json"])
    return _validate_launch_command(parsed)[0]


def test_the_70b_preset_launches_fsdp_qlora_on_8_gpus() -> None:
    cfg = load_run_config(PRESET_70B)
    ft = cfg.finetune
    assert ft.processes == 8 and ft.quantization == "nf4" and sharding(ft) == "FSDP"
    args = _launch(launch_args(ft, "cuda", port=29500))
    assert args.use_fsdp and args.num_processes == 8 and args.mixed_precision == "bf16"
    # QLoRA under FSDP: LoRA and frozen 4-bit weights in one unit, rank 0 loading, the others synced from it.
    assert args.fsdp_use_orig_params is False
    assert args.fsdp_cpu_ram_efficient_loading is True and args.fsdp_sync_module_states is True
    assert args.module and args.training_script == "tasks.finetune"
    share = per_process(ft.train, ft.processes)
    assert (share.micro_batch_size, share.gradient_accumulation_steps) == (1, 2)
    # The compute profile that placed fine-tune asks of its pool.
    assert cfg.compute.finetune.gpus == ft.processes


def test_the_deepspeed_alternative_is_zero_3() -> None:
    cfg = load_run_config(PRESET_70B, [f"finetune.accelerate_config={ACCELERATE / 'deepspeed-zero3.yaml'}"])
    assert sharding(cfg.finetune) == "DEEPSPEED"
    args = _launch(launch_args(cfg.finetune, "cuda", port=29500))
    assert args.use_deepspeed and args.zero_stage == 3 and args.num_processes == 8
    assert args.zero3_init_flag is True  # the 70B is built partitioned


def test_cpu_processes_launch_with_torchrun_and_gloo() -> None:
    cfg = load_run_config(REPO / "deployments" / "configs" / "tiny-cpu.yaml", ["finetune.processes=2"])
    assert sharding(cfg.finetune) is None
    args = _launch(launch_args(cfg.finetune, "cpu", port=29500))
    assert args.multi_gpu and not args.cpu and args.num_processes == 2  # torchrun; `--cpu` would be one process


def test_sharded_qlora_stores_4bit_weights_in_the_compute_dtype() -> None:
    import torch

    assert build_bnb_config("nf4", torch.bfloat16, sharded=True).bnb_4bit_quant_storage == torch.bfloat16
    assert build_bnb_config("nf4", torch.bfloat16).bnb_4bit_quant_storage == torch.uint8


def test_a_missing_accelerate_config_names_the_key(tmp_path) -> None:
    from tasks.finetune import FinetuneError

    cfg = load_run_config(PRESET_70B, [f"finetune.accelerate_config={tmp_path / 'nope.yaml'}"])
    with pytest.raises(FinetuneError, match="finetune.accelerate_config: cannot read"):
        sharding(cfg.finetune)
