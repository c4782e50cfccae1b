"""bench.peers' repeated cells: rotation, medians and ranges, ratios, the flat-cost verdict and its table."""

from __future__ import annotations

from typing import Any

import pytest

from bench.peers import report
from bench.peers.repeats import Spread, collapse, flat_cost, order, ratio, spread, verdict


def test_each_repeat_rotates_the_levels() -> None:
    assert [order([16, 256], r) for r in range(3)] == [[16, 256], [256, 16], [16, 256]]
    assert [order([16, 64, 256], r) for r in range(4)] == [[16, 64, 256], [64, 256, 16], [256, 16, 64],
                                                           [16, 64, 256]]
    assert order([], 2) == []


def test_spread_of_what_was_measured() -> None:
    assert spread([3.0, 1.0, 2.0]) == Spread(2.0, 1.0, 3.0, 3)
    assert spread([4.0, None, 1.0]) == Spread(2.5, 1.0, 4.0, 2)  # an even count: the middle two's mean
    assert spread([None, None]) is None and spread([]) is None
    assert Spread(1.094, 1.02, 1.151, 3).text(2, "×") == "1.09× [1.02–1.15×]"
    assert Spread(0.4, 0.4, 0.4, 1).text() == "0.40"


def test_ratio_is_rounded_and_missing_without_a_positive_base() -> None:
    assert ratio(0.44, 0.40) == 1.1  # not 1.1000000000000003: exactly the limit
    assert ratio(1.0, 3.0) == 0.333
    assert ratio(None, 1.0) is None and ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None  # above idle, a cell of few requests can come out at 0


@pytest.mark.parametrize(("ratios", "expected"), [
    ([1.10, 1.10, 1.10], "flat"),  # exactly the limit is within it
    ([0.80, 1.05, 1.10], "flat"),
    ([1.101, 1.2, 1.3], "grows"),
    ([1.10, 1.2, 1.3], "undecided"),  # the lowest is at the limit: not all above it
    ([1.09, 1.26], "undecided"),  # the scatter of the last run: the range straddles the limit
    ([1.02], "undecided"),  # one measurement has no spread
    ([], "undecided"),
])
def test_verdict_claims_no_more_than_the_range(ratios: list[float], expected: str) -> None:
    assert verdict(spread(ratios)) == expected


def _row(repeat: int, c: int, cpu: float, above: float | None, up: float, **more: Any) -> dict[str, Any]:
    return {"system": "pf · task run", "kind": "task", "latency_ms": 0.0, "concurrency": c, "repeat": repeat,
            "rps": 100.0 * (repeat + 1), "p50_ms": 1.0, "p99_ms": 2.0, "errors": 1, "cpu_ms_per_request": cpu,
            "cpu_ms_above_idle": above, "upstream_cpu_ms_per_request": up,
            "cpu_ms_by_group": {"Gateway": cpu / 2}, "wrk": {"requests": 1}, **more}


def _load() -> list[dict[str, Any]]:
    """Three repeats at 16 and 256; repeat 2 lost its 256 cell (the system died mid-run)."""
    return [_row(0, 16, 5.0, 4.0, 1.0), _row(0, 256, 5.4, 4.4, 1.5),
            _row(1, 256, 5.3, 4.24, 1.2), _row(1, 16, 5.0, 4.0, 1.0),
            _row(2, 16, 6.0, 5.0, 1.0)]


def test_flat_cost_over_repeats_with_one_missing() -> None:
    (row,) = flat_cost(_load(), [16, 256], repeats=3)
    assert row["system"] == "pf · task run" and row["kind"] == "task" and (row["low"], row["high"]) == (16, 256)
    assert row["ratios"] == [1.1, 1.06]  # above idle, per repeat; repeat 2 has no pair
    assert row["ratio"] == {"median": 1.08, "low": 1.06, "high": 1.1, "n": 2}
    assert row["verdict"] == "flat"
    assert row["cpu_ms"]["16"] == {"median": 4.0, "low": 4.0, "high": 5.0, "n": 3}
    assert row["cpu_ms"]["256"]["n"] == 2
    assert row["upstream_ratios"] == [1.5, 1.2] and row["upstream_ratio"]["median"] == 1.35
    assert row["upstream_cpu_ms"]["256"] == {"median": 1.35, "low": 1.2, "high": 1.5, "n": 2}


def test_flat_cost_without_idle_uses_all_cpu() -> None:
    load = [_row(r, c, cpu, None, 1.0) for r in range(2) for c, cpu in ((16, 1.0), (256, 1.2))]
    (row,) = flat_cost(load, [16, 256], repeats=2)
    assert row["ratios"] == [1.2, 1.2] and row["verdict"] == "grows"


def test_collapse_gives_one_median_row_per_cell() -> None:
    rows = {r["concurrency"]: r for r in collapse(_load())}
    assert sorted(rows) == [16, 256]
    sixteen = rows[16]
    assert sixteen["repeats"] == 3 and sixteen["errors"] == 3
    assert sixteen["rps"] == 200.0 and sixteen["cpu_ms_per_request"] == 5.0 and sixteen["cpu_ms_above_idle"] == 4.0
    assert sixteen["cpu_ms_by_group"] == {"Gateway": 2.5}
    assert "wrk" not in sixteen and "repeat" not in sixteen
    assert rows[256]["repeats"] == 2 and rows[256]["cpu_ms_above_idle"] == pytest.approx(4.32)


def test_report_with_repeats_shows_medians_ranges_and_verdict() -> None:
    results = {"meta": {"date": "2026-12-07 18:00 UTC", "commit": "abc1234", "levels": [16, 256], "repeats": 3,
                        "latencies": [0.0], "duration_s": 5,
                        "machine": {"cores": 2, "loadavg_start": "1 1 1", "loadavg_end": "2 2 2", "note": "."}},
               "load": _load(), "ttft": []}
    text = report.markdown(results)
    assert "Each system's cells 3 times" in text and "### Flat cost: CPU per request by concurrency, 3 repeats" in text
    assert ("| pf · task run | 0 ms | 4.00 [4.00–5.00] | 4.32 [4.24–4.40], 2 of 3 | 1.08× [1.06–1.10×], 2 of 3 | "
            "flat | 1.35× [1.20–1.50×], 2 of 3 |") in text
    assert "| pf · task run | 200 / 150 | 5.00 / 5.35 |" in text  # the throughput table: medians
