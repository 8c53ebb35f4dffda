"""Persisted task results are JSON of tuneship's refs: loading one builds only allow-listed types, never runs code."""

from __future__ import annotations

import pickle
import sys
from datetime import UTC, datetime

import pytest
from prefect.serializers import Serializer

from flows.results import RefSerializer, StoredError
from infra.artifacts import ArtifactRef
from tasks.refs import AdapterRef, ModelVersionRef, PromotionDecision, RuleResult

ARTIFACT = ArtifactRef(
    uri="s3://b/adapters/r1", key="adapters/r1", sha256="a" * 64, size=10, created_at=datetime(2026, 1, 1, tzinfo=UTC)
)


class Planted:
    def __reduce__(self):  # what a planted pickle record would run
        return (print, ("pwned",))


def test_refs_round_trip_with_their_types() -> None:
    adapter = AdapterRef(
        artifact=ARTIFACT,
        base_model="tuneship/sql-small",
        base_model_revision="r",
        rank=16,
        alpha=32,
        target_modules=["q_proj"],
        quantization="none",
        dataset_fingerprint="f",
        run_id="r1",
        metrics={"train_loss": 0.5},
    )
    version = ModelVersionRef(name="m", version="3", uri="models:/m/3", run_id="x", adapter_sha256="a" * 64)
    decision = PromotionDecision(
        name="m", version="3", promoted=True, previous_champion=None, rules={"ci": RuleResult(passed=True, value="ok")}
    )
    serializer = Serializer(type="tuneship-refs")  # how Prefect finds it from a record's metadata
    assert isinstance(serializer, RefSerializer)
    back = serializer.loads(serializer.dumps({"adapter": adapter, "pair": (version, decision), "n": [1, None]}))
    assert back == {"adapter": adapter, "pair": (version, decision), "n": [1, None]}
    assert isinstance(back["pair"], tuple) and isinstance(back["adapter"].artifact, ArtifactRef)
    error = serializer.loads(serializer.dumps(KeyError("missing")))
    assert isinstance(error, StoredError) and "KeyError" in str(error)


def test_anything_else_is_refused_both_ways(capsys: pytest.CaptureFixture[str]) -> None:
    serializer = RefSerializer()
    with pytest.raises(TypeError, match="Planted is not a type tuneship persists"):
        serializer.dumps(Planted())
    with pytest.raises(ValueError, match="'os.system'.*not a tuneship ref"):
        serializer.loads(b'{"__ref__": "os.system", "data": "id"}')
    with pytest.raises(ValueError, match="untagged mapping"):
        serializer.loads(b'{"py/object": "subprocess.Popen"}')
    with pytest.raises(ValueError):
        serializer.loads(pickle.dumps(Planted()))
    assert "pwned" not in capsys.readouterr().out


def test_a_flow_module_loaded_by_path_persists_its_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Prefect worker imports flows/retrain.py by path, under another module name: its RetrainSummary is a second
    class of the same definition, and it still persists (and loads back as the allow-listed class)."""
    import importlib.util

    from flows import retrain

    spec = importlib.util.spec_from_file_location("loaded_by_path", retrain.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "loaded_by_path", module)  # as Prefect's loader registers it
    spec.loader.exec_module(module)
    summary = module.RetrainSummary(
        model_name="m", dataset="d", adapter="a", report="r", version="1", promoted=False, reasons="", metrics={}
    )
    assert type(summary) is not retrain.RetrainSummary
    back = RefSerializer().loads(RefSerializer().dumps(summary))
    assert type(back) is retrain.RetrainSummary and back.model_dump() == summary.model_dump()
