"""The tenants file: each key limited to its tenant's models; a bad file names itself and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.gateway import GatewayConfig
from serving.tenants import TenantsError, load_key_models

GOOD = """
tenants:
  retail-analytics:
    keys: [sk-retail-0123456789abcdef, sk-retail-second-key-000]
    models: [retail-sql, base]
  clinic-ops:
    keys: [sk-clinic-0123456789abcdef]
    models: [clinic-sql]
"""


def test_each_key_gets_its_tenants_models_and_becomes_an_api_key(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(GOOD)
    key_models = load_key_models(path)
    assert key_models == {
        "sk-retail-0123456789abcdef": ["retail-sql", "base"],
        "sk-retail-second-key-000": ["retail-sql", "base"],
        "sk-clinic-0123456789abcdef": ["clinic-sql"],
    }
    config = GatewayConfig(api_keys=["sk-everything-0123456789"], key_models=key_models)
    assert set(config.api_keys) == {"sk-everything-0123456789", *key_models}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tenants:\n  a:\n    keys: [short]\n    models: [m]\n", r"tenants\.a\.keys: .*at least 16 characters"),
        ("tenants:\n  a:\n    keys: [sk-0123456789abcdef]\n    models: ['bad name']\n", r"tenants\.a\.models: "),
        ("tenants:\n  a:\n    keys: [sk-0123456789abcdef]\n", r"tenants\.a\.models: Field required"),
        ("tenants:\n  a:\n    keys: [sk-0123456789abcdef]\n    models: [m]\n    extra: 1\n", r"tenants\.a\.extra"),
        ("tenants: [\n", r"not YAML"),
        (GOOD.replace("sk-clinic-0123456789abcdef", "sk-retail-0123456789abcdef"), r"clinic-ops.keys: a key of"),
    ],
)
def test_a_bad_tenants_file_names_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    with pytest.raises(TenantsError, match=message) as err:
        load_key_models(path)
    assert str(path) in str(err.value)
    with pytest.raises(TenantsError, match="cannot read"):
        load_key_models(tmp_path / "missing.yaml")
