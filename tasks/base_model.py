"""The base-model resolution step: a run config's ``base_model`` → something ``from_pretrained`` loads.

    base = resolve_base_model("tuneship/sql-small", store=store, cache_dir=settings.cache_dir)
    base = resolve_base_model("meta-llama/Meta-Llama-3-8B", ...)   # a hub id, loaded by transformers
    base = resolve_base_model("/models/my-llama", ...)             # a local Hugging Face directory

``tuneship/<recipe>`` names one of the offline base models (``offline/base_model.py``): the stand-in for a
model hub on machines that have none. This module is the one place outside ``flows/`` that reaches into
``offline/``; the stages only ever see a :class:`ResolvedModel`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.artifacts import ArtifactStore
from infra.errors import UserError

OFFLINE_PREFIX = "tuneship/"


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


def check_base_model(name: str) -> None:
    """Refuse a ``tuneship/<recipe>`` name whose recipe does not exist (run configs call this at load time)."""
    _offline_recipe(name)


def resolve_base_model(name: str, *, store: ArtifactStore, cache_dir: Path, log: Any = print) -> ResolvedModel:
    """Map ``tuneship/<recipe>`` to an offline base model, a directory to itself, anything else to a hub id."""
    if recipe := _offline_recipe(name):
        from offline.base_model import ensure_base_model

        built = ensure_base_model(recipe, store=store, cache_dir=cache_dir, log=log)
        return ResolvedModel(name, str(built.path), built.ref.sha256)
    if Path(name).is_dir():
        config = Path(name) / "config.json"
        revision = hashlib.sha256(config.read_bytes()).hexdigest() if config.exists() else "local"
        return ResolvedModel(name, str(Path(name).resolve()), revision)
    return ResolvedModel(name, name, "main")


def stored_base_uri(name: str, store: ArtifactStore) -> str | None:
    """The artifact-store URI of an offline base model, for deployments that fetch it from there; else None."""
    try:
        recipe = _offline_recipe(name)
    except BaseModelError:
        return None
    return store.ref(recipe.key).uri if recipe and store.exists(recipe.key) else None
