"""Imports run one way: flows → tasks, serving, offline → infra; tasks stay free of Prefect; nothing but flows/
and the base-model resolution step (tasks/base_model.py) reaches into offline/, the stand-in for a model hub."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "infra": {"tasks", "flows", "serving", "offline"},
    "tasks": {"flows", "serving", "prefect", "offline"},
    "serving": {"tasks", "flows", "offline"},
    "offline": {"tasks", "flows", "serving", "prefect"},
}
# The one module below flows/ allowed into offline/: it maps `tuneship/<recipe>` to an offline base model.
RESOLUTION_STEP = "tasks/base_model.py"


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upwards(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    offenders = {
        f"{path.relative_to(REPO)} imports {sorted(bad)}"
        for path in files
        if (bad := imported_roots(path) & FORBIDDEN[package] - ({"offline"} if path.match(RESOLUTION_STEP) else set()))
    }
    assert not offenders, offenders


def test_only_the_resolution_step_reaches_into_offline() -> None:
    users = {
        str(path.relative_to(REPO))
        for package in FORBIDDEN
        if package != "offline"
        for path in (REPO / package).rglob("*.py")
        if "offline" in imported_roots(path)
    }
    assert users == {RESOLUTION_STEP}, users
