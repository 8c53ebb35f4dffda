"""The cost ledger: a price table (``infra/costs.yaml``) and the arithmetic from measured time and throughput
to dollars — per training run, per 1K requests, per 1M output tokens, and the break-even against an API.

    prices = load_prices()
    training_cost(prices, "aws-g5.xlarge", gpu_seconds=5400)                 # $ for that run, retries included
    serving_cost(prices, "aws-g5.xlarge", requests_per_s=4.2, output_tokens_per_s=310.0)
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError

from infra.errors import UserError

DEFAULT_PRICES = Path(__file__).with_name("costs.yaml")
HOURS_PER_MONTH = 730


class CostError(UserError, ValueError):
    pass


class InstancePrice(BaseModel):
    usd_per_hour: float = Field(gt=0)
    gpus: int = Field(ge=0)
    gpu: str
    source: str
    as_of: str


class ApiPrice(BaseModel):
    usd_per_1m_input_tokens: float = Field(ge=0)
    usd_per_1m_output_tokens: float = Field(ge=0)
    source: str
    as_of: str


class PriceTable(BaseModel):
    currency: str = "USD"
    instances: dict[str, InstancePrice]
    apis: dict[str, ApiPrice] = Field(default_factory=dict)

    def instance(self, name: str) -> InstancePrice:
        if name not in self.instances:
            raise CostError(f"no price for instance {name!r}; the price table has {sorted(self.instances)}")
        return self.instances[name]

    def api(self, name: str) -> ApiPrice:
        if name not in self.apis:
            raise CostError(f"no price for API {name!r}; the price table has {sorted(self.apis)}")
        return self.apis[name]


def load_prices(path: Path | None = None) -> PriceTable:
    path = Path(path or os.environ.get("TUNESHIP_COSTS_FILE") or DEFAULT_PRICES)
    try:
        return PriceTable.model_validate(yaml.safe_load(path.read_text()))
    except FileNotFoundError:
        raise CostError(f"{path}: no such price table") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CostError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


class TrainingCost(BaseModel):
    instance: str
    seconds: float
    usd: float


class ServingCost(BaseModel):
    instance: str
    usd_per_hour: float
    usd_per_1k_requests: float
    usd_per_1m_output_tokens: float
    breakeven_output_tokens_per_month: float | None = Field(
        default=None, description="Above this monthly volume the instance is cheaper than the API (if it keeps up)."
    )
    capacity_output_tokens_per_month: float
    api: str | None = None
    api_usd_per_1m_output_tokens: float | None = None


def training_cost(prices: PriceTable, instance: str, *, seconds: float) -> TrainingCost:
    """Wall-clock seconds on ``instance`` (every attempt, retries included) × its hourly price."""
    return TrainingCost(instance=instance, seconds=seconds, usd=prices.instance(instance).usd_per_hour * seconds / 3600)


def serving_cost(
    prices: PriceTable, instance: str, *, requests_per_s: float, output_tokens_per_s: float, api: str | None = None
) -> ServingCost:
    """Cost of serving at the measured throughput, with the instance kept busy."""
    hourly = prices.instance(instance).usd_per_hour
    if requests_per_s <= 0 or output_tokens_per_s <= 0:
        raise CostError("throughput must be positive to price serving")
    api_price = prices.api(api).usd_per_1m_output_tokens if api else None
    breakeven = hourly * HOURS_PER_MONTH / (api_price / 1e6) if api_price else None
    return ServingCost(
        instance=instance,
        usd_per_hour=hourly,
        usd_per_1k_requests=hourly / (requests_per_s * 3600) * 1000,
        usd_per_1m_output_tokens=hourly / (output_tokens_per_s * 3600) * 1e6,
        breakeven_output_tokens_per_month=breakeven,
        capacity_output_tokens_per_month=output_tokens_per_s * 3600 * HOURS_PER_MONTH,
        api=api,
        api_usd_per_1m_output_tokens=api_price,
    )
