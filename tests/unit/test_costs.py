"""The cost ledger's arithmetic and its price table."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.costs import CostError, load_prices, serving_cost, training_cost


def test_the_shipped_price_table_has_the_seed_prices_with_sources() -> None:
    prices = load_prices()
    assert prices.instance("aws-g5.xlarge").usd_per_hour == 1.006
    assert prices.instance("aws-ml.g5.2xlarge").usd_per_hour == 1.52
    assert all(p.source and p.as_of for p in prices.instances.values())
    assert len(prices.instances) >= 5 and prices.apis


def test_training_cost_is_wall_clock_times_the_hourly_price() -> None:
    cost = training_cost(load_prices(), "aws-g5.xlarge", seconds=5400)
    assert cost.usd == pytest.approx(1.509)


def test_serving_cost_per_request_per_token_and_break_even() -> None:
    prices = load_prices()
    cost = serving_cost(
        prices, "aws-g5.xlarge", requests_per_s=2.0, output_tokens_per_s=100.0, api="openai-gpt-4o-mini"
    )
    assert cost.usd_per_1k_requests == pytest.approx(1.006 / 7200 * 1000)
    assert cost.usd_per_1m_output_tokens == pytest.approx(1.006 / 360000 * 1e6)  # ≈ $2.79
    # $1.006/h × 730 h = $734.38 a month buys 1,223.97M tokens at $0.60 per 1M.
    assert cost.breakeven_output_tokens_per_month == pytest.approx(1.006 * 730 / 0.6e-6)
    assert cost.capacity_output_tokens_per_month == pytest.approx(100 * 3600 * 730)


def test_unknown_instance_and_bad_tables_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CostError, match="no price for instance 'tpu-v9'"):
        training_cost(load_prices(), "tpu-v9", seconds=1)
    bad = tmp_path / "prices.yaml"
    bad.write_text(
        "instances:\n  x:\n    usd_per_hour: -1\n    gpus: 0\n    gpu: none\n    source: s\n    as_of: '1'\n"
    )
    with pytest.raises(CostError, match=r"prices.yaml: instances.x.usd_per_hour: Input should be greater than 0"):
        load_prices(bad)
