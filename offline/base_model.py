"""Building a small Llama-architecture model in Hugging Face format, with its own byte-level BPE tokenizer.

No model hub is reachable from tuneship's CI and laptops, so the project makes its own base model.
This module holds the pieces every recipe shares: train a tokenizer with ``tokenizers``, initialise a
``LlamaForCausalLM`` from an architecture, and save both so that transformers, PEFT and vLLM load them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from infra.errors import UserError

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


@dataclass(frozen=True)
class LlamaArch:
    """Shape of a Llama model. ``head_dim`` must be 64 or more: vLLM's CPU attention rejects 16."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 704
    vocab_size: int = 2048
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.head_dim < 64:
            raise ValueError(f"head_dim {self.head_dim} < 64: vLLM's CPU attention needs head_dim 64 or more")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                raise ValueError(
                    f"{name} {getattr(self, name)} is not a multiple of 32: bitsandbytes' CPU 4-bit kernels need it"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer (bos/eos/pad specials, BOS prepended) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=None
    )


def init_model(arch: LlamaArch, tokenizer: Any, *, seed: int) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` of shape ``arch`` whose special ids match ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_heads,
        head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_model(model: Any, tokenizer: Any, out_dir: Path) -> Path:
    """Save model and tokenizer in Hugging Face format (safetensors) and return ``out_dir``."""
    from infra.prompts import ALPACA_CHAT_TEMPLATE

    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.chat_template = ALPACA_CHAT_TEMPLATE
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------------
# Recipes: a named, hashable description of how a base model is built. Same recipe, same model.

CORPUS_VERSION = "sql-corpus/1"
# What each corpus version is: the share of its questions asked in many sentence types (``offline/sql_varied``)
# and the share typed the way people type them (``offline/sql_corpus.typed_by_people``). Version 1 has neither,
# so the models built from it stay reproducible.
CORPUS_SHARES: dict[str, dict[str, float]] = {
    "sql-corpus/1": {},
    "sql-corpus/2": {"typed_share": 0.5},
    "sql-corpus/3": {"typed_share": 0.5, "varied_share": 0.6},
}


@dataclass(frozen=True)
class BaseRecipe:
    """How to build and pre-train an offline base model. Its digest names the cached artifact."""

    name: str
    arch: LlamaArch
    steps: int
    seq_len: int = 128
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    tokenizer_docs: int = 20_000
    heldout_rows: int = 64
    seed: int = 0
    corpus: str = CORPUS_VERSION

    def digest(self) -> str:
        import hashlib
        import json

        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    @property
    def key(self) -> str:
        return f"base-models/{self.name}-{self.digest()[:16]}"


RECIPES: dict[str, BaseRecipe] = {
    # The default base: 4.5M parameters, pre-trained for ≈10 minutes on 2 CPU cores. Five layers keep the
    # (16-bit under QLoRA) tied embeddings at 11.5 % of the weights, within the range of real 7–8B models.
    "sql-small": BaseRecipe(
        name="sql-small",
        arch=LlamaArch(hidden_size=256, num_layers=5, num_heads=4, intermediate_size=704, vocab_size=2048),
        steps=850,
        corpus="sql-corpus/3",
    ),
    # A small, fast recipe for the quick test tier: same code, fewer steps and parameters.
    "sql-tiny": BaseRecipe(
        name="sql-tiny",
        arch=LlamaArch(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=352, vocab_size=1024),
        steps=150,
        tokenizer_docs=5_000,
    ),
}


def _token_rows(tokenizer: Any, docs: Iterator[str], seq_len: int) -> Iterator[list[int]]:
    """Pack documents (BOS + tokens, EOS already in the text) into rows of ``seq_len + 1`` token ids."""
    buf: list[int] = []
    while True:
        batch = [next(docs) for _ in range(256)]
        for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]:
            buf.extend(ids)
        while len(buf) >= seq_len + 1:
            yield buf[: seq_len + 1]
            buf = buf[seq_len + 1 :]


def _lr_at(step: int, recipe: BaseRecipe) -> float:
    import math

    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(recipe: BaseRecipe, out_dir: Path, *, log: Any = print) -> dict[str, float]:
    """Train the tokenizer, pre-train the model on the generic corpus, save both to ``out_dir``.

    Deterministic for a recipe on a given machine (seeded corpus, init and data order). Writes
    ``pretrain_metrics.json`` beside the weights: held-out loss before and after, steps, tokens/s.
    """
    import itertools
    import json
    import os
    import time

    import torch

    from offline.sql_corpus import corpus

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    shares = CORPUS_SHARES[recipe.corpus]
    tok_docs = itertools.islice(corpus(recipe.seed + 1, eos="", **shares), recipe.tokenizer_docs)
    tokenizer = train_tokenizer(tok_docs, recipe.arch.vocab_size)
    eos = tokenizer.eos_token
    model = init_model(recipe.arch, tokenizer, seed=recipe.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{recipe.name}: {n_params / 1e6:.2f}M parameters, tokenizer {len(tokenizer)} tokens")

    heldout_rows = list(
        itertools.islice(
            _token_rows(tokenizer, corpus(recipe.seed + 2, eos, **shares), recipe.seq_len), recipe.heldout_rows
        )
    )
    heldout = torch.tensor(heldout_rows)

    def heldout_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses = [model(input_ids=chunk, labels=chunk).loss.item() for chunk in heldout.split(16)]
        model.train()
        return sum(losses) / len(losses)

    init_loss = heldout_loss()
    rows = _token_rows(tokenizer, corpus(recipe.seed, eos, **shares), recipe.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay)
    model.train()
    train_started = time.perf_counter()
    loss_value = float("nan")
    for step in range(recipe.steps):
        batch = torch.tensor(list(itertools.islice(rows, recipe.batch_size)))
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if step % 100 == 0 or step == recipe.steps - 1:
            log(f"step {step + 1}/{recipe.steps} loss {loss_value:.3f} ({time.perf_counter() - started:.0f} s)")
    train_seconds = time.perf_counter() - train_started
    tokens = recipe.steps * recipe.batch_size * recipe.seq_len
    metrics = {
        "parameters": n_params,
        "heldout_loss_init": init_loss,
        "heldout_loss_final": heldout_loss(),
        "train_loss_final": loss_value,
        "steps": recipe.steps,
        "tokens": tokens,
        "tokens_per_s": tokens / train_seconds,
        "seconds": time.perf_counter() - started,
    }
    save_model(model, tokenizer, out_dir)
    (out_dir / "tuneship_recipe.json").write_text(json.dumps({**asdict(recipe), "digest": recipe.digest()}, indent=1))
    (out_dir / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=1))
    log(f"held-out loss {init_loss:.3f} → {metrics['heldout_loss_final']:.3f} in {metrics['seconds']:.0f} s")
    return metrics


# --------------------------------------------------------------------------------------------------
# Checkpoints kept in the repository: a fresh machine loads the default base instead of pre-training it
# (≈9–18 min on 2 cores). Each is pinned by the sha256 its directory gets as an artifact
# (``infra.artifacts.tree_sha256``); ``tuneship base build --rebuild`` retrains it from its recipe and
# compares the files, and ``--rebuild --out offline/checkpoints/NAME`` writes a new one and prints its pin.

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
PINNED: dict[str, str] = {
    # sql-small, 850 steps on corpus version 3, pre-trained on a 2-core machine (832 s; held-out loss
    # 7.633 → 0.761 on its own corpus), with the seed's chat template.
    "sql-small-4effa66ccd50e44d": "3f620baa0cff235604966741f7c73ac110a330958d155cb728ef06cc02527082",
}


class CheckpointError(UserError):
    """A checkpoint in the repository does not match its pinned sha256."""


def checkpoint_path(recipe: BaseRecipe) -> Path:
    return CHECKPOINTS / recipe.key.removeprefix("base-models/")


def verified_checkpoint(recipe: BaseRecipe) -> Path | None:
    """The repository's checkpoint of ``recipe`` after checking it against its pin, or None if there is none."""
    from infra.artifacts import tree_sha256

    path = checkpoint_path(recipe)
    pin = PINNED.get(path.name)
    if pin is None or not path.is_dir():
        return None
    have = tree_sha256(path)
    if have != pin:
        raise CheckpointError(
            f"{path}: sha256 {have[:16]} does not match its pin {pin[:16]} (offline/base_model.py PINNED); "
            f"restore it with `git checkout -- {path}` or rebuild it with `tuneship base build --rebuild`"
        )
    return path


@dataclass(frozen=True)
class BaseModel:
    """A base model: its ref in the artifact store, a verified local directory, and where it came from."""

    recipe: BaseRecipe
    ref: Any  # infra.artifacts.ArtifactRef
    path: Path
    source: Literal["store", "cache", "checkpoint", "built"]


def ensure_base_model(recipe: BaseRecipe, *, store: Any, cache_dir: Path, log: Any = print) -> BaseModel:
    """Return the base model for ``recipe``, pre-training it only if nothing already holds it.

    Looked up by the recipe's digest: the artifact store, then the per-user cache (outside the checkout, so
    fresh clones on the same machine reuse it), then the repository's pinned checkpoint, and built last.
    What lands in the cache gets there by an atomic rename and is then uploaded to the store. A cached copy is
    used only when its sha256 is the store's (or, before the store has one, the checkpoint's pin); otherwise the
    verified store copy is used, or the cache is rebuilt.
    """
    import shutil
    import tempfile

    from infra.artifacts import tree_sha256

    local = cache_dir.expanduser() / recipe.key
    if store.exists(recipe.key):
        ref = store.ref(recipe.key)
        if local.is_dir() and tree_sha256(local) == ref.sha256:
            return BaseModel(recipe, ref, local, "store")
        if local.is_dir():
            log(f"base model cache {local} differs from {ref.uri} (sha256 {ref.sha256[:12]}): using the store's copy")
        return BaseModel(recipe, ref, store.get_dir(ref), "store")  # get_dir verifies every file
    pin = PINNED.get(checkpoint_path(recipe).name)
    if local.is_dir() and pin is not None and tree_sha256(local) != pin:
        log(f"base model cache {local} does not match its pin {pin[:12]}: discarded, restoring it")
        aside = local.with_name(f".rejected-{local.name}-{os.getpid()}")
        local.rename(aside)  # atomic: a concurrent reader sees the old directory or none
        shutil.rmtree(aside, ignore_errors=True)
    source: Literal["cache", "checkpoint", "built"] = "cache"
    if not local.is_dir():
        local.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=local.parent, prefix=".build-"))
        try:
            checkpoint = verified_checkpoint(recipe)
            if checkpoint is not None:
                shutil.copytree(checkpoint, staging, dirs_exist_ok=True)
                source = "checkpoint"
            else:
                pretrain(recipe, staging, log=log)
                source = "built"
            staging.rename(local)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    ref = store.put_dir(local, recipe.key)
    return BaseModel(recipe, ref, local, source)


def rebuild(recipe: BaseRecipe, out_dir: Path, *, log: Any = print) -> dict[str, bool]:
    """Pre-train ``recipe`` into ``out_dir`` and compare each file with the pinned checkpoint, if any.

    Returns ``{file: identical}`` for the files that define the model (weights, config, tokenizer);
    ``pretrain_metrics.json`` holds timings and is left out. Empty when the recipe has no checkpoint.
    """
    from infra.artifacts import file_sha256s

    pretrain(recipe, out_dir, log=log)
    checkpoint = verified_checkpoint(recipe)
    if checkpoint is None:
        return {}
    want, have = file_sha256s(checkpoint), file_sha256s(out_dir)
    return {name: have.get(name) == sha for name, sha in sorted(want.items()) if name != "pretrain_metrics.json"}
