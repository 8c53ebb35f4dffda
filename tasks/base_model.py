"""The base-model resolution step: a run config's ``base_model`` → something ``from_pretrained`` loads.

    base = resolve_base_model("tuneship/sql-small", store=store, cache_dir=settings.cache_dir)
    base = resolve_base_model("meta-llama/Meta-Llama-3-8B@8cde5ca8…", ...)  # a hub id pinned to a commit
    base = resolve_base_model("/models/my-llama", ...)                     # a local Hugging Face directory

``tuneship/<recipe>`` names one of the offline base models (``offline/base_model.py``): the stand-in for a
model hub on machines that have none. This module is the one place outside ``flows/`` that reaches into
``offline/``; the stages only ever see a :class:`ResolvedModel`.

A hub id must name a commit (``org/model@<40 hex>``): a branch like ``main`` moves, and a run must record,
and a later load must get, the weights it was trained on. It is fetched with ``huggingface_hub``'s
``snapshot_download`` (weights, config and tokenizer files only: no repository code) into the Hugging Face
cache, which works offline (``HF_HUB_OFFLINE=1``) once that commit is cached.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.artifacts import ArtifactStore
from infra.errors import UserError

OFFLINE_PREFIX = "tuneship/"
LOCAL_PREFIXES = ("/", "./", "../", "~")
HUB_PINNED = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)@(?P<commit>[0-9a-f]{40})")
# What a model needs from a hub repository: no *.py (remote code), no original/ or *.pth duplicates.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt"]


class BaseModelError(UserError, ValueError):
    """A run's ``base_model`` names nothing that can be loaded."""


@dataclass(frozen=True)
class ResolvedModel:
    """A base model ready for ``from_pretrained``: a local directory or a hub id, with a revision."""

    id: str  # what the run config said, e.g. "tuneship/sql-small" or "meta-llama/Meta-Llama-3-8B"
    path: str  # what from_pretrained gets
    revision: str  # sha256 of the offline build, or the hub revision


def _offline_recipe(name: str) -> Any:
    """The offline recipe ``tuneship/<recipe>`` names (an ``offline.base_model.BaseRecipe``); None for any other
    name; :class:`BaseModelError` for an offline name whose recipe does not exist."""
    if not name.startswith(OFFLINE_PREFIX):
        return None
    from offline.base_model import RECIPES

    recipe = RECIPES.get(name.removeprefix(OFFLINE_PREFIX))
    if recipe is None:
        raise BaseModelError(f"base_model {name!r}: no such offline recipe; choose one of {sorted(RECIPES)}")
    return recipe


def _hub_pin(name: str) -> tuple[str, str]:
    """(repo id, commit) of a hub name ``org/model@<commit>``; :class:`BaseModelError` for an unpinned one."""
    match = HUB_PINNED.fullmatch(name)
    if match is None:
        raise BaseModelError(
            f"base_model {name!r}: a hub model must be pinned to a commit, as org/model@<40-hex commit sha> "
            f"(a branch such as main moves); a local directory must start with /, ./, ../ or ~"
        )
    return match["repo"], match["commit"]


def check_base_model(name: str) -> None:
    """Refuse a ``tuneship/<recipe>`` name whose recipe does not exist and a hub id not pinned to a commit (run
    configs call this at load time)."""
    if _offline_recipe(name) is None and not name.startswith(LOCAL_PREFIXES):
        _hub_pin(name)


def resolve_base_model(name: str, *, store: ArtifactStore, cache_dir: Path, log: Any = print) -> ResolvedModel:
    """Map ``tuneship/<recipe>`` to an offline base model, a directory to itself, anything else to a hub id."""
    if recipe := _offline_recipe(name):
        from offline.base_model import ensure_base_model

        built = ensure_base_model(recipe, store=store, cache_dir=cache_dir, log=log)
        return ResolvedModel(name, str(built.path), built.ref.sha256)
    if name.startswith(LOCAL_PREFIXES):
        local = Path(name).expanduser()
        if not local.is_dir():
            raise BaseModelError(f"base_model {name!r}: no such directory")
        config = local / "config.json"
        revision = hashlib.sha256(config.read_bytes()).hexdigest() if config.exists() else "local"
        return ResolvedModel(name, str(local.resolve()), revision)
    repo, commit = _hub_pin(name)
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo, revision=commit, allow_patterns=HUB_FILES)
    except Exception as exc:  # offline, gated, unknown commit, incomplete cache: all the user's to fix
        raise BaseModelError(
            f"base_model {name!r}: cannot fetch {repo} at commit {commit[:12]} ({exc.__class__.__name__}: "
            f"{str(exc)[:300]}); without hub access, fill the Hugging Face cache (HF_HUB_CACHE) with that commit"
        ) from None
    return ResolvedModel(name, path, commit)


def stored_base_uri(name: str, store: ArtifactStore) -> str | None:
    """The artifact-store URI of an offline base model, for deployments that fetch it from there; else None."""
    try:
        recipe = _offline_recipe(name)
    except BaseModelError:
        return None
    return store.ref(recipe.key).uri if recipe and store.exists(recipe.key) else None
