"""Imports run one way: flows → tasks → infra, serving → infra; tasks stay free of Prefect."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "infra": {"tasks", "flows", "serving"},
    "tasks": {"flows", "serving", "prefect"},
    "serving": {"tasks", "flows"},
}


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
        if (bad := imported_roots(path) & FORBIDDEN[package])
    }
    assert not offenders, offenders
