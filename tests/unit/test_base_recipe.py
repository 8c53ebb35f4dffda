"""Base-model recipes: hashed, deterministic, cached; the quick tier's tiny recipe really trains."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from infra.artifacts import ArtifactStore, LocalBackend
from offline.base_model import RECIPES, BaseRecipe, LlamaArch, ensure_base_model, pretrain

MICRO = BaseRecipe(
    name="micro",
    arch=LlamaArch(hidden_size=128, num_layers=1, num_heads=2, intermediate_size=256, vocab_size=400),
    steps=3,
    batch_size=4,
    seq_len=64,
    tokenizer_docs=300,
    heldout_rows=4,
)


def test_head_dim_below_64_is_refused() -> None:
    with pytest.raises(ValueError, match="head_dim 16 < 64"):
        LlamaArch(hidden_size=64, num_heads=4)


def test_digest_covers_every_field() -> None:
    assert MICRO.digest() == dataclasses.replace(MICRO).digest()
    assert MICRO.digest() != dataclasses.replace(MICRO, steps=4).digest()
    assert MICRO.digest() != dataclasses.replace(MICRO, lr=1e-3).digest()
    assert MICRO.key.startswith("base-models/micro-")


def test_pretraining_is_deterministic(tmp_path: Path) -> None:
    pretrain(MICRO, tmp_path / "a", log=lambda *_: None)
    pretrain(MICRO, tmp_path / "b", log=lambda *_: None)
    for name in ("model.safetensors", "tokenizer.json"):
        a, b = (hashlib.sha256((tmp_path / d / name).read_bytes()).hexdigest() for d in "ab")
        assert a == b, name


def test_tiny_recipe_trains_and_is_reused(tiny_base, tmp_path: Path) -> None:
    metrics = json.loads((tiny_base.path / "pretrain_metrics.json").read_text())
    assert metrics["heldout_loss_final"] < 0.5 * metrics["heldout_loss_init"]
    store = ArtifactStore(LocalBackend(tmp_path / "store"), tmp_path / "cache")
    calls = []
    again = ensure_base_model(RECIPES["sql-tiny"], store=store, cache_dir=tiny_base.path.parents[1], log=calls.append)
    assert again.source == "cache" and calls == []  # nothing was trained
    assert again.ref.sha256 == tiny_base.ref.sha256
