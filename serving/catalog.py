"""The registry as the gateway routes by: which registered models it serves, where their aliases point, and the
names a request may use for them.

A request's ``model`` is one of

    base            the base model, no adapter
    NAME            NAME's champion (NAME@champion)
    NAME@ALIAS      the version MLflow's alias ALIAS of NAME points at (champion, challenger, any alias)
    NAME/VERSION    one registered version of NAME
    champion        with a default model (``tuneship serve NAME``): NAME@champion, and likewise challenger

vLLM serves version N of NAME under the served id ``NAME-vN`` (``infra.registry.served_id``). MLflow aliases are
the source of truth: :func:`read_catalog` reads them, and the gateway's route table is a cache of what it read,
refreshed by every deploy and by a periodic check, so every replica converges on the same targets. A served id
the catalog does not name is not reachable through the gateway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.artifacts import ArtifactStore
from infra.registry import ADAPTER, CHALLENGER, CHAMPION, MODEL_NAME, base_of, client, served_id, version_artifact

# Registered versions a catalog reads per refresh at most (MLflow's own page limit).
MAX_VERSIONS = 10_000
MAX_MODELS = 1000  # registered models per page


@dataclass(frozen=True)
class Version:
    """One registered version: what ``infra.registry.version_artifact`` needs to fetch and verify its adapter."""

    name: str
    version: str
    tags: dict[str, str] = field(hash=False, compare=False)

    @property
    def served(self) -> str:
        return served_id(self.name, self.version)


@dataclass(frozen=True)
class Catalog:
    """What the registry held at one read: every servable version and every alias, per registered model."""

    versions: dict[str, Version] = field(default_factory=dict)  # served id → version
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)  # model → alias → version number

    @property
    def models(self) -> set[str]:
        return {v.name for v in self.versions.values()}

    def routes(self) -> dict[str, str]:
        """The route-table entries: ``NAME@ALIAS`` → served id, for every alias on a servable version."""
        return {
            f"{name}@{alias}": served_id(name, number)
            for name, aliases in self.aliases.items()
            for alias, number in aliases.items()
            if served_id(name, number) in self.versions
        }

    def pinned(self) -> set[str]:
        """Served ids kept loaded: every champion."""
        return {served_id(name, a[CHAMPION]) for name, a in self.aliases.items() if CHAMPION in a}


@dataclass(frozen=True)
class Name:
    """A request's ``model``, parsed: the registered model it names (None: a static alias such as ``base``), and
    either the route-table key to look up or the version it names directly."""

    model: str | None
    key: str | None = None  # NAME@ALIAS, or a static alias
    version: str | None = None  # NAME/VERSION

    @classmethod
    def parse(cls, name: str, default_model: str | None = None) -> Name:
        if "/" in name:
            model, _, version = name.partition("/")
            return cls(model, version=version)
        if "@" in name:
            model, _, alias = name.partition("@")
            return cls(model, key=name if alias else None)
        if default_model and name in (CHAMPION, CHALLENGER):
            return cls(default_model, key=f"{default_model}@{name}")
        return cls(None, key=name)

    def routed(self, catalog: Catalog) -> Name:
        """A bare registered name means its champion."""
        if self.model is None and self.key in catalog.models:
            return Name(self.key, key=f"{self.key}@{CHAMPION}")
        return self


def read_catalog(
    tracking_uri: str, *, base: tuple[str | None, ...] | None = None, base_from: str | None = None
) -> Catalog:
    """Every version in the registry that has an adapter and every alias on them. Only versions trained on one
    base are kept: ``base`` (id, revision), or the base of ``base_from``'s champion (the model vLLM was started
    for); with neither, or no such champion yet, all. Blocking: the gateway runs it in a thread."""
    mlflow_client = client(tracking_uri)
    versions: dict[str, Version] = {}
    bases: dict[str, tuple[str | None, ...]] = {}
    for mv in mlflow_client.search_model_versions(max_results=MAX_VERSIONS):
        tags = dict(mv.tags or {})
        if not tags.get(ADAPTER[0]) or not MODEL_NAME.fullmatch(mv.name) or mv.status != "READY":
            continue
        version = Version(mv.name, str(mv.version), tags)
        versions[version.served] = version
        bases[version.served] = base_of(mv)
    names = {v.name for v in versions.values()}
    aliases: dict[str, dict[str, str]] = {}
    token = None
    while True:
        page: Any = mlflow_client.search_registered_models(max_results=MAX_MODELS, page_token=token)
        for model in page:
            if model.name in names:
                aliases[model.name] = {alias: str(number) for alias, number in (model.aliases or {}).items()}
        if not (token := page.token):
            break
    if base is None and base_from and CHAMPION in aliases.get(base_from, {}):
        base = bases[served_id(base_from, aliases[base_from][CHAMPION])]
    if base is not None:
        versions = {s: v for s, v in versions.items() if bases[s][: len(base)] == base}
    return Catalog(versions, aliases)


@dataclass(frozen=True)
class RegistrySource:
    """Where a gateway reads the registry and fetches adapters: the MLflow server and the artifact store, and the
    base vLLM serves — ``base`` (id, revision), or the base of ``base_from``'s champion: versions trained on
    another base are not routed."""

    tracking_uri: str
    store: ArtifactStore
    base: tuple[str | None, ...] | None = None
    base_from: str | None = None

    def read(self) -> Catalog:
        return read_catalog(self.tracking_uri, base=self.base, base_from=self.base_from)

    def fetch(self, version: Version) -> Path:
        """The version's adapter directory, as registered: its sha256 tag and every file's sha256 checked."""
        return self.store.get_dir(version_artifact(version, self.store, ADAPTER))
