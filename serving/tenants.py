"""Tenants: which API keys may call which models (``TUNESHIP_API_KEYS_FILE``).

    tenants:
      retail-analytics:
        keys: [sk-retail-…]            # the keys this tenant's callers present (Bearer)
        models: [retail-sql, base]     # registered model names (every alias and version of each), or base
      clinic-ops:
        keys: [sk-clinic-…]
        models: [clinic-sql]

A key in this file may call only its tenant's models: anything else is a 403, and ``/v1/models`` lists only
those. Keys in ``TUNESHIP_API_KEYS`` may call every model. The admin routes have their own keys.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from infra.errors import UserError
from infra.registry import check_model_name


class TenantsError(UserError, ValueError):
    """The tenants file cannot be used; the message names the file and the key."""


class Tenant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: list[str] = Field(min_length=1, description="API keys (at least 16 characters each)")
    models: list[str] = Field(min_length=1, description="registered model names, or base")

    @field_validator("keys")
    @classmethod
    def _long_keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if len(key) < 16 or key != key.strip():
                raise ValueError("each key needs at least 16 characters and no surrounding spaces")
        return keys

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: list[str]) -> list[str]:
        return [m if m == "base" else check_model_name(m) for m in models]


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenants: dict[str, Tenant] = Field(min_length=1)


def load_key_models(path: Path) -> dict[str, list[str]]:
    """Each key in the tenants file → the models it may call; :class:`TenantsError` naming the file and key."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise TenantsError(f"{path}: cannot read the tenants file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise TenantsError(f"{path}: not YAML: {exc}") from None
    try:
        tenants = TenantsFile.model_validate(raw).tenants
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise TenantsError(f"{path}: {where}: {first['msg']}") from None
    key_models: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for name, tenant in tenants.items():
        for key in tenant.keys:
            if key in owner:
                raise TenantsError(f"{path}: tenants.{name}.keys: a key of tenant {owner[key]!r} is listed again")
            owner[key] = name
            key_models[key] = list(tenant.models)
    return key_models
