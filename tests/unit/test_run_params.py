"""What a run parameter can name: a run config under deployments/configs/ or in the artifact store — never an
arbitrary file on the worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows import retrain as retrain_flow
from flows.retrain import config_file, publish_config
from infra.artifacts import ArtifactStore, LocalBackend
from tasks.config import ConfigError, load_run_config


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(LocalBackend(tmp_path / "store"), tmp_path / "cache")


def test_a_shipped_config_is_read_from_deployments_configs(store: ArtifactStore) -> None:
    path = config_file("deployments/configs/tiny-cpu.yaml", store)
    assert path == retrain_flow.CONFIG_ROOT.resolve() / "tiny-cpu.yaml"
    assert load_run_config(path).base_model == "tuneship/sql-small"


@pytest.mark.parametrize(
    "config",
    [
        "/etc/passwd",
        "../../../../etc/hostname",
        "deployments/configs/../../pyproject.toml",
        "deployments/configs/../prefect.yaml",
        "tests/conftest.py",
        "deployments/configs",
    ],
)
def test_a_path_outside_the_configs_is_refused(config: str, store: ArtifactStore) -> None:
    with pytest.raises(ConfigError, match=r"a run reads its config from deployments/configs/ .* or from the artifact"):
        config_file(config, store)


def test_a_symlink_out_of_the_configs_is_refused(
    tmp_path: Path, store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "secret.yaml"
    outside.write_text("name: x\n")
    link = tmp_path / "configs" / "link.yaml"
    link.parent.mkdir()
    link.symlink_to(outside)
    monkeypatch.setattr(retrain_flow, "CONFIG_ROOT", link.parent)
    monkeypatch.setattr(retrain_flow, "REPO", tmp_path)
    with pytest.raises(ConfigError, match="not from"):
        config_file("configs/link.yaml", store)


def test_a_config_elsewhere_travels_through_the_artifact_store(tmp_path: Path, store: ArtifactStore) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text((retrain_flow.CONFIG_ROOT / "tiny-cpu.yaml").read_text().replace("name: ", "name: mine-", 1))
    named = publish_config(mine, store)
    assert named.startswith("artifact://configs/") and named.endswith("/run.yaml")
    assert publish_config(mine, store) == named  # content-addressed: publishing again changes nothing
    assert load_run_config(config_file(named, store)).name.startswith("mine-")
    shipped = publish_config(retrain_flow.CONFIG_ROOT / "tiny-cpu.yaml", store)
    assert shipped == "deployments/configs/tiny-cpu.yaml"  # a shipped config is named, not copied
