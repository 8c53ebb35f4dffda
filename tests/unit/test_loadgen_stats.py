"""The load generator's statistics against known values."""

from __future__ import annotations

import math

import pytest

from serving.loadgen import LoadReport, LoadSpec, Sample, percentile


def test_percentiles_match_linear_interpolation_on_a_known_set() -> None:
    values = [float(v) for v in range(1, 101)]  # 1 … 100, shuffled order must not matter
    shuffled = values[::2] + values[1::2]
    assert percentile(shuffled, 50) == pytest.approx(50.5)
    assert percentile(shuffled, 95) == pytest.approx(95.05)
    assert percentile(shuffled, 99) == pytest.approx(99.01)
    assert percentile(shuffled, 0) == 1 and percentile(shuffled, 100) == 100
    assert percentile([0.2, 0.1, 0.4, 0.3], 50) == pytest.approx(0.25)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_report_counts_errors_and_derives_rates_and_time_per_token() -> None:
    samples = [
        Sample(True, latency=1.0, ttft=0.1, output_tokens=10),
        Sample(True, latency=2.0, ttft=0.2, output_tokens=19),
        Sample(False, latency=0.01, error="429: overloaded"),
    ]
    report = LoadReport(LoadSpec(url="http://x", concurrency=2), samples, wall_s=4.0)
    s = report.summary()
    assert s["requests"] == 3 and s["errors"] == 1 and s["error_rate"] == pytest.approx(1 / 3)
    assert s["requests_per_s"] == pytest.approx(0.5) and s["output_tokens_per_s"] == pytest.approx(29 / 4)
    assert samples[0].tpot == pytest.approx(0.1) and samples[1].tpot == pytest.approx(0.1)
    assert s["latency_s"]["p50"] == pytest.approx(1.5) and s["ttft_s"]["mean"] == pytest.approx(0.15)
    assert "| time per output token | 100.0 | 100.0 |" in report.markdown()
