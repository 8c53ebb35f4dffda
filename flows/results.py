"""Persisted task and flow results as JSON of tuneship's own types — never pickle.

Prefect persists the results of cached stages (and of flows) to its result storage and loads them back on a
cache hit. Its default serializer is pickle, so whoever can write that storage would run code on the next load.
Here every persisted result goes through :class:`RefSerializer`: JSON in which a typed value is one of the
pipeline's refs (an allow-list, validated by its pydantic model on the way back), never an importable name.

Prefect reads a record back with the serializer *the record names* and accepts only saved storage blocks for
task results, so a planted record that names pickle would still be unpickled: the result storage
(``PREFECT_LOCAL_STORAGE_PATH``) must stay writable by the workers alone (docs/security.md).

    @task(persist_result=True, **PERSISTED)
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from typing import Any

from prefect.serializers import Serializer
from pydantic import BaseModel, Field

SERIALIZER_TYPE = "tuneship-refs"


class StoredError(RuntimeError):
    """An exception read back from a persisted result: its type name and message, not the object."""


def _types() -> dict[str, type]:
    """The types a persisted result may hold, by name (imported here, not named by the record)."""
    from flows.feedback import WatchResult
    from flows.retrain import RetrainSummary
    from infra.artifacts import ArtifactRef
    from infra.costs import TrainingCost
    from tasks.base_model import ResolvedModel
    from tasks.refs import (
        AdapterRef,
        CuratedRef,
        DatasetRef,
        Deployment,
        EvalReport,
        ModelVersionRef,
        PromotionDecision,
    )

    kinds = (
        AdapterRef,
        ArtifactRef,
        CuratedRef,
        DatasetRef,
        Deployment,
        EvalReport,
        ModelVersionRef,
        PromotionDecision,
        ResolvedModel,
        RetrainSummary,
        TrainingCost,
        WatchResult,
    )
    return {kind.__name__: kind for kind in kinds}


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, BaseException):
        return {"__error__": type(value).__name__, "message": str(value)}
    name = type(value).__name__
    kind = _types().get(name)
    # A worker imports the flow's file under a name of its own (Prefect loads the entrypoint by path), so its
    # RetrainSummary is a second class object of the same definition: the same qualified name and fields.
    same = kind is type(value) or (
        kind is not None
        and kind.__qualname__ == type(value).__qualname__
        and getattr(kind, "model_fields", None) is not None
        and set(kind.model_fields) == set(getattr(type(value), "model_fields", ()))
    )
    if not same:
        raise TypeError(f"{name} is not a type tuneship persists as a task result")
    if isinstance(value, BaseModel):
        return {"__ref__": name, "data": value.model_dump(mode="json")}
    if is_dataclass(value):
        return {"__ref__": name, "data": asdict(value)}
    raise TypeError(f"{name} is not a type tuneship persists as a task result")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _decode(v) for k, v in value["__dict__"].items()}
    if "__error__" in value:
        return StoredError(f"{value['__error__']}: {value['message']}")
    if "__ref__" in value:
        kind = _types().get(value["__ref__"])
        if kind is None:
            raise ValueError(f"a persisted result names {value['__ref__']!r}, which is not a tuneship ref")
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            return kind.model_validate(value["data"])
        return kind(**value["data"])
    raise ValueError(f"a persisted result holds an untagged mapping with keys {sorted(value)[:5]}")


class RefSerializer(Serializer):  # type: ignore[type-arg]
    """JSON of tuneship's refs (and None, numbers, strings, lists, tuples, string-keyed dicts)."""

    type: str = Field(default=SERIALIZER_TYPE, frozen=True)

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(_encode(obj), sort_keys=True).encode()

    def loads(self, blob: bytes) -> Any:
        return _decode(json.loads(blob))


PERSISTED: dict[str, Any] = {"result_serializer": RefSerializer()}
