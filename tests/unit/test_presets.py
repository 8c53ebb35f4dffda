"""Every shipped run config is a test case: it validates, its builders work, its LoRA targets exist in its
architecture, and its memory estimate fits the GPU it is meant for.

Hub models cannot be downloaded here, so their architectures are written down from their published
``config.json`` and built on the meta device (no weights).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from offline.base_model import RECIPES
from tasks.base_model import ResolvedModel
from tasks.config import ConfigError, load_run_config
from tasks.finetune import build_bnb_config, build_lora_config, build_training_args, estimate_memory

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "deployments" / "configs").glob("*.yaml"))

# model id → (model_type, hidden, intermediate, layers, heads, kv heads, vocab), from the published configs.
ARCHITECTURES = {
    "meta-llama/Meta-Llama-3-8B": ("llama", 4096, 14336, 32, 32, 8, 128256),
    "meta-llama/Meta-Llama-3-70B": ("llama", 8192, 28672, 80, 64, 8, 128256),
    "mistralai/Mistral-7B-v0.1": ("mistral", 4096, 14336, 32, 32, 8, 32000),
    "microsoft/Phi-3-mini-4k-instruct": ("phi3", 3072, 8192, 32, 32, 32, 32064),
    "codellama/CodeLlama-7b-hf": ("llama", 4096, 11008, 32, 32, 32, 32016),
}
GPU_GIB = 80  # every GPU preset fits one 80 GB GPU per process (the 70B one runs data-parallel)


def architecture_dir(model_id: str, tmp_path: Path) -> Path:
    from transformers import AutoConfig

    if model_id.startswith("tuneship/"):
        arch = RECIPES[model_id.removeprefix("tuneship/")].arch
        spec = (
            "llama",
            arch.hidden_size,
            arch.intermediate_size,
            arch.num_layers,
            arch.num_heads,
            arch.num_heads,
            arch.vocab_size,
        )
    else:
        spec = ARCHITECTURES[model_id.partition("@")[0]]
    model_type, hidden, intermediate, layers, heads, kv_heads, vocab = spec
    kwargs = dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
    )
    AutoConfig.for_model(model_type, **kwargs).save_pretrained(tmp_path)
    return tmp_path


def test_presets_are_shipped() -> None:
    names = {c.name for c in CONFIGS}
    assert {
        "tiny-cpu.yaml",
        "llama3-8b-qlora.yaml",
        "llama3-70b-qlora.yaml",
        "mistral-7b-qlora.yaml",
        "phi3-mini-lora.yaml",
        "codellama-7b-sql.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_preset(path: Path, tmp_path: Path) -> None:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = load_run_config(path)
    ft = cfg.finetune
    assert build_lora_config(ft.lora).r == ft.lora.r
    bnb = build_bnb_config(ft.quantization, torch.bfloat16)
    assert (bnb is None) == (ft.quantization == "none")
    args = build_training_args(ft.train, tmp_path / "out", device="cpu", compute_dtype=torch.float32, has_eval=True)
    assert args.learning_rate == ft.train.learning_rate

    model_dir = architecture_dir(cfg.base_model, tmp_path / "arch")
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    linear_names = {name.rsplit(".", 1)[-1] for name, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = set(ft.lora.target_modules) - linear_names
    assert not missing, f"{path.name}: target_modules {sorted(missing)} not in {sorted(linear_names)}"

    on_gpu = ft.model_copy(update={"memory_limit_gib": GPU_GIB})
    dtype = torch.float32 if cfg.base_model.startswith("tuneship/") else torch.bfloat16
    estimate = estimate_memory(
        ResolvedModel(cfg.base_model, str(model_dir), "test"),
        on_gpu,
        max_seq_len=cfg.preprocess.max_seq_len,
        device="cpu",
        compute_dtype=dtype,
    )
    assert estimate.total_gib < estimate.available_gib, f"{path.name}: {estimate.describe()}"


def test_bad_preset_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS[0]).read_text() + "\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: finetune\.lora\.r: Value error, r=12|finetune\.lora: r=12"):
        load_run_config(bad, ["finetune.lora.r=12"])
    with pytest.raises(ConfigError, match=r"finetune\.train\.epochs: Input should be greater than 0"):
        load_run_config(bad, ["finetune.train.epochs=0"])
    with pytest.raises(ConfigError, match=r"finetune\.quantisation: Extra inputs are not permitted"):
        load_run_config(bad, ["finetune.quantisation=nf4"])


def test_a_hub_base_is_pinned_and_loads_that_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unpinned hub id is refused when the config loads; a pinned one resolves to that commit's snapshot in the
    Hugging Face cache (here filled from the offline checkpoint, as an air-gapped machine would be)."""
    import shutil

    from huggingface_hub import constants
    from transformers import AutoConfig

    from infra.artifacts import ArtifactStore, LocalBackend
    from offline.base_model import verified_checkpoint
    from tasks.base_model import BaseModelError, resolve_base_model

    with pytest.raises(ConfigError, match=r"base_model 'meta-llama/Meta-Llama-3-8B': a hub model must be pinned"):
        load_run_config(None, [], name="x", base_model="meta-llama/Meta-Llama-3-8B", data={"source": "s"})
    commit, other = "ab" * 20, "cd" * 20
    checkpoint = verified_checkpoint(RECIPES["sql-small"])
    assert checkpoint is not None
    snapshot = tmp_path / "hub" / "models--acme--sql-small" / "snapshots" / commit
    shutil.copytree(checkpoint, snapshot)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    store = ArtifactStore(LocalBackend(tmp_path / "store"), tmp_path / "cache")
    resolved = resolve_base_model(f"acme/sql-small@{commit}", store=store, cache_dir=tmp_path / "cache")
    assert (resolved.path, resolved.revision) == (str(snapshot), commit)
    assert AutoConfig.from_pretrained(resolved.path).num_hidden_layers == RECIPES["sql-small"].arch.num_layers
    with pytest.raises(BaseModelError, match=rf"cannot fetch acme/sql-small at commit {other[:12]}"):
        resolve_base_model(f"acme/sql-small@{other}", store=store, cache_dir=tmp_path / "cache")
