"""The MLflow model registry, read and moved in one place: versions, aliases, tags, champion history, lineage.

    get_version("retail-sql", "champion", tracking_uri=uri)      # a version by number or alias
    list_versions("retail-sql", tracking_uri=uri)                 # aliases, key metrics, gate, lineage
    rollback("retail-sql", tracking_uri=uri)                      # @champion walks back its history

Aliases, not stages: ``@champion`` serves, ``@challenger`` is the newest candidate. The champion history
(a registered-model tag) lets repeated rollbacks walk back. The alias only ever moves to a version that is
READY. Writing a version (``tasks/register.py``) and the promotion gate live with the register stage; every
other caller reads and moves the registry through this module.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from infra.artifacts import ArtifactRef, ArtifactStore
from infra.errors import UserError

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "tuneship.champion_history"
BASE_TAGS = ("tuneship.base_model", "tuneship.base_revision")

T = TypeVar("T")
# What MLflow answers for a model, version or alias that does not exist; anything else (a server down, a
# timeout) is not the user's to fix and propagates, so the flow's retries see it.
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


# Registered model names (and versions, adapter names): what may appear in a URI, a shell argument or a manifest.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_model_name(name: str, *, what: str = "registered model name") -> str:
    """Return ``name`` if it matches :data:`MODEL_NAME`; raise ValueError naming the rule otherwise."""
    if not MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"{what} {name!r}: use 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def served_id(name: str, version: str) -> str:
    """The name vLLM serves version ``version`` of registered model ``name`` under (its adapter, loaded at runtime)."""
    return f"{name}-v{version}"


class RegistryError(UserError, RuntimeError):
    """A registry operation cannot be done (no such model or version, nothing to roll back to)."""


def client(tracking_uri: str) -> Any:
    """An ``MlflowClient`` whose registry is the tracking server's."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def retry(fn: Callable[..., T], *args: Any, attempts: int = 5, **kwargs: Any) -> T:
    """Retry a registry write that lost a race on the backend store (e.g. SQLite's 'database is locked')."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            if attempt == attempts - 1 or "locked" not in str(exc).lower():
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def wait_ready(mlflow_client: Any, name: str, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (status := mlflow_client.get_model_version(name, version).status) != "READY":
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RegistryError(f"model version {name}/{version} is {status}, not READY")
        time.sleep(0.5)


def get_version(name: str, ref: str, *, tracking_uri: str) -> Any:
    """The model version ``ref`` of ``name``: a version number or an alias (``champion``, ``challenger``)."""
    from mlflow.exceptions import MlflowException

    try:
        if str(ref).isdigit():
            return client(tracking_uri).get_model_version(name, str(ref))
        return client(tracking_uri).get_model_version_by_alias(name, ref)
    except MlflowException as exc:
        if exc.error_code not in NOT_FOUND:
            raise
        raise RegistryError(f"{name}: no version or alias {ref!r} at {tracking_uri}") from None


def champion_version(mlflow_client: Any, name: str) -> Any | None:
    """The version ``@champion`` points at, or None (no such model, or no champion yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code not in NOT_FOUND:
            raise
        return None


def champion_history(mlflow_client: Any, name: str) -> list[str]:
    return json.loads(mlflow_client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))


class ChampionMoved(RegistryError):
    """The champion changed between a promotion's decision and its alias write."""


def make_champion(mlflow_client: Any, name: str, version: str, *, expect: str | None) -> None:
    """Point ``@champion`` at ``version`` if it still points at ``expect`` (None: no champion), then append
    ``version`` to the champion history — after the alias, so a failed alias write leaves no history entry for
    ``rollback`` to follow. MLflow has no atomic compare-and-set; the check runs right before the write."""
    current = champion_version(mlflow_client, name)
    now = str(current.version) if current is not None else None
    if now != expect:
        raise ChampionMoved(
            f"{name}@champion is v{now} now, not v{expect} as when v{version} was judged: not promoting it"
        )
    history = champion_history(mlflow_client, name)
    retry(mlflow_client.set_registered_model_alias, name, CHAMPION, version)
    retry(mlflow_client.set_registered_model_tag, name, HISTORY_TAG, json.dumps([*history, version]))


def alias_version(mlflow_client: Any, name: str, alias: str) -> str | None:
    """The version number ``alias`` of ``name`` points at, or None."""
    if alias == CHAMPION:
        mv = champion_version(mlflow_client, name)
        return None if mv is None else str(mv.version)
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow_client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code not in NOT_FOUND:
            raise
        return None


def move_alias(mlflow_client: Any, name: str, alias: str, version: str, *, expect: str | None) -> None:
    """Point ``alias`` at ``version`` if it still points at ``expect`` (the champion keeps its history)."""
    if alias == CHAMPION:
        make_champion(mlflow_client, name, version, expect=expect)
        return
    now = alias_version(mlflow_client, name, alias)
    if now != expect:
        raise ChampionMoved(f"{name}@{alias} is v{now} now, not v{expect}: not moving it to v{version}")
    retry(mlflow_client.set_registered_model_alias, name, alias, version)


def restore_alias(mlflow_client: Any, name: str, alias: str, version: str, *, failed: str) -> None:
    """Point ``alias`` back at ``version`` after ``failed`` could not be served; the champion history forgets it."""
    retry(mlflow_client.set_registered_model_alias, name, alias, version)
    if alias == CHAMPION:
        history = champion_history(mlflow_client, name)
        if history and history[-1] == failed:
            history = history[:-1]
        retry(mlflow_client.set_registered_model_tag, name, HISTORY_TAG, json.dumps(history))


def set_version_tags(name: str, version: str, tags: dict[str, str], *, tracking_uri: str) -> None:
    mlflow_client = client(tracking_uri)
    for key, value in tags.items():
        retry(mlflow_client.set_model_version_tag, name, str(version), key, value)


def base_of(mv: Any) -> tuple[str | None, ...]:
    """(base model id, revision) a registered version's adapter was trained on, from its lineage tags."""
    return tuple(mv.tags.get(k) for k in BASE_TAGS)


def stored_key(uri: str, store: ArtifactStore, what: str) -> str:
    """The store key of ``uri``, which must live in ``store``."""
    prefix = store.root_uri.rstrip("/") + "/"
    if not uri.startswith(prefix):
        raise RegistryError(f"{what}: {uri or '(no uri)'} is not in this artifact store ({store.root_uri})")
    return uri[len(prefix) :]


# The artifacts a version names: (uri tag, sha256 tag, what). A version ships exactly the bytes it was
# registered with — the ref comes from the uri tag and must have the sha256 its tag recorded at registration.
ADAPTER = ("tuneship.adapter_uri", "tuneship.adapter_sha256", "adapter")
EVAL_REPORT = ("tuneship.eval_report_uri", "tuneship.eval_report_sha256", "eval report")
# A version evaluated under schema-constrained decoding (evaluate.decoding: sql_schema) carries the schema
# (infra.sql_grammar.schema_json); the gateway serves it under the grammar built from it.
SQL_SCHEMA_TAG = "tuneship.sql_schema"


def decoding_of(mv: Any) -> dict[str, Any]:
    """The request fields version ``mv`` is answered under (the grammar of its schema tag; none: free)."""
    from infra.sql_grammar import tagged_decoding

    return tagged_decoding((mv.tags or {}).get(SQL_SCHEMA_TAG))


def version_artifact(mv: Any, store: ArtifactStore, which: tuple[str, str, str]) -> ArtifactRef:
    """The ref of the artifact version ``mv`` names (``ADAPTER`` or ``EVAL_REPORT``), verified against the sha256
    recorded when the version was registered; :class:`RegistryError` if it is missing or the bytes changed."""
    uri_tag, sha_tag, what = which
    label = f"{mv.name} v{mv.version} {what}"
    key = stored_key(mv.tags.get(uri_tag, ""), store, label)
    want = mv.tags.get(sha_tag)
    if not want:
        raise RegistryError(f"{label}: the version has no {sha_tag} tag, so what it ships cannot be verified")
    ref = store.ref(key)
    if ref.sha256 != want:
        raise RegistryError(
            f"{label}: {ref.uri} holds content {ref.sha256[:12]}…, but the version was registered with "
            f"{want[:12]}… (the artifact changed after registration, or the tag points elsewhere)"
        )
    return ref


def rollback(name: str, *, tracking_uri: str) -> str:
    """Move ``champion`` back to the previous champion; return the version now serving."""
    mlflow_client = client(tracking_uri)
    history = champion_history(mlflow_client, name)
    current = champion_version(mlflow_client, name)
    if current is None:
        raise RegistryError(f"{name} has no champion to roll back from")
    if history and history[-1] == str(current.version):
        history = history[:-1]
    if not history:
        raise RegistryError(f"{name}: no earlier champion than version {current.version} to roll back to")
    target = history[-1]
    wait_ready(mlflow_client, name, target)
    retry(mlflow_client.set_registered_model_tag, name, HISTORY_TAG, json.dumps(history))
    retry(mlflow_client.set_registered_model_alias, name, CHAMPION, target)
    rolled_back_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    retry(mlflow_client.set_model_version_tag, name, str(current.version), "tuneship.rolled_back", rolled_back_at)
    return target


def list_versions(name: str, *, tracking_uri: str) -> list[dict[str, Any]]:
    """Every version of ``name``: aliases, key metrics and lineage, newest first."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    try:
        model = mlflow_client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in NOT_FOUND:
            raise
        raise RegistryError(f"no registered model {name!r} at {tracking_uri}") from exc
    aliases: dict[str, list[str]] = {}
    for alias, number in (model.aliases or {}).items():
        aliases.setdefault(str(number), []).append(alias)
    rows = []
    for mv in mlflow_client.search_model_versions(f"name = '{name}'"):
        tags = mv.tags
        rows.append(
            {
                "version": str(mv.version),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "accuracy": tags.get("tuneship.eval.accuracy_candidate"),
                "perplexity": tags.get("tuneship.eval.perplexity_candidate"),
                "gate": tags.get("tuneship.gate.decision", "not gated"),
                "adapter_sha256": tags.get("tuneship.adapter_sha256", "")[:12],
                "dataset": tags.get("tuneship.dataset_fingerprint", "")[:12],
                "base_model": tags.get("tuneship.base_model"),
                "git_sha": tags.get("tuneship.git_sha", "")[:12],
                "created": mv.creation_timestamp,
                "tags": dict(tags),
            }
        )
    return sorted(rows, key=lambda r: -int(r["version"]))
