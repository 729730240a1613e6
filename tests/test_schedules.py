"""Which months the schedules refresh, around month ends, weekends and holidays."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from marketdata_pipeline.defs.assets import ALL_BARS_ASSETS, bars_assets
from marketdata_pipeline.defs.resources import PolygonResource, WarehouseResource
from marketdata_pipeline.defs.schedules import (
    FRESHNESS_JOBS,
    REFRESH_JOBS,
    crypto_bars_daily,
    stock_bars_after_close,
    stock_bars_freshness,
    stock_bars_weekly,
)
from marketdata_pipeline.domain import Market
from marketdata_pipeline.quality.calendars import refresh_months

NY = ZoneInfo("America/New_York")


@pytest.mark.parametrize(
    ("now", "months"),
    [
        # Tuesday evening, mid-month: just this month.
        (datetime(2024, 3, 12, 20, 30, tzinfo=NY), [date(2024, 3, 1)]),
        # Friday Mar 1 evening: first session of March opens the month -> Feb too.
        (datetime(2024, 3, 1, 20, 30, tzinfo=NY), [date(2024, 2, 1), date(2024, 3, 1)]),
        # Monday Sep 2 2024 is Labor Day: Tuesday Sep 3 is September's first session.
        (datetime(2024, 9, 3, 20, 30, tzinfo=NY), [date(2024, 8, 1), date(2024, 9, 1)]),
        # Monday Sep 2 (holiday) morning: last complete session is Fri Aug 30 -> August only.
        (datetime(2024, 9, 2, 9, 0, tzinfo=NY), [date(2024, 8, 1)]),
        # Before extended hours end, today's session is not complete yet.
        (datetime(2024, 3, 12, 19, 0, tzinfo=NY), [date(2024, 3, 1)]),
        # New Year's Day 2025 (closed), Thursday Jan 2 is January's first session.
        (datetime(2025, 1, 2, 20, 30, tzinfo=NY), [date(2024, 12, 1), date(2025, 1, 1)]),
        (datetime(2025, 1, 1, 20, 30, tzinfo=NY), [date(2024, 12, 1)]),
        # Saturday Jun 1 2024: last session is Friday May 31.
        (datetime(2024, 6, 1, 12, 0, tzinfo=NY), [date(2024, 5, 1)]),
    ],
)
def test_stock_refresh_months(now: datetime, months: list[date]) -> None:
    assert refresh_months(Market.STOCK, now) == months


@pytest.mark.parametrize(
    ("now", "months"),
    [
        (datetime(2024, 3, 15, 0, 30, tzinfo=UTC), [date(2024, 3, 1)]),
        # 00:30 Mar 2: yesterday (Mar 1) opened March -> February too.
        (datetime(2024, 3, 2, 0, 30, tzinfo=UTC), [date(2024, 2, 1), date(2024, 3, 1)]),
        # 00:30 Mar 1: yesterday was Feb 29 (leap year) -> February only.
        (datetime(2024, 3, 1, 0, 30, tzinfo=UTC), [date(2024, 2, 1)]),
        # Weekends and holidays do not matter for crypto.
        (datetime(2025, 1, 2, 0, 30, tzinfo=UTC), [date(2024, 12, 1), date(2025, 1, 1)]),
    ],
)
def test_crypto_refresh_months(now: datetime, months: list[date]) -> None:
    assert refresh_months(Market.CRYPTO, now) == months


def test_a_night_is_one_run_per_asset_over_every_symbol() -> None:
    with dg.instance_for_test() as instance:
        context = dg.build_schedule_context(
            instance=instance, scheduled_execution_time=datetime(2024, 3, 1, 20, 30, tzinfo=NY)
        )
        assert isinstance(stock_bars_after_close(context), dg.SkipReason)
        instance.add_dynamic_partitions("stock_symbols", ["MSFT", "AAPL", "SPY"])
        requests = stock_bars_after_close(context)
        assert isinstance(requests, list)
        by_asset = {r.asset_selection[0].to_user_string(): r for r in requests}
        assert sorted(by_asset) == ["stock_daily_bars", "stock_minute_bars"]
        for name, request in by_asset.items():
            spec = next(s for s in ALL_BARS_ASSETS if s.name == name)
            keys = spec.partitions.get_partition_keys_in_range(
                request.partition_key_range,
                dynamic_partitions_store=instance,
            )
            assert sorted(keys) == [
                f"{month}|{symbol}"
                for month in ("2024-02-01", "2024-03-01")
                for symbol in ("AAPL", "MSFT", "SPY")
            ]
            assert request.run_config["ops"][name]["config"]["new_days_only"] is True
            # The run evaluates the asset's own checks, never the warehouse-wide freshness.
            assert set(request.asset_check_keys or ()) == set(spec.own_check_keys())
        assert len({r.run_key for r in requests}) == 2

        instance.add_dynamic_partitions("crypto_symbols", ["BTC", "ETH"])
        crypto = dg.build_schedule_context(
            instance=instance, scheduled_execution_time=datetime(2024, 7, 10, 0, 30, tzinfo=UTC)
        )
        crypto_requests = crypto_bars_daily(crypto)
        assert isinstance(crypto_requests, list) and len(crypto_requests) == 2
        assert {r.tags["dagster/asset_partition_range_start"] for r in crypto_requests} == {
            "2024-07-01|BTC"
        }


def test_the_weekly_pass_reloads_the_weeks_months_whole() -> None:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("stock_symbols", ["AAPL"])
        # Saturday Mar 2 2024: the week's sessions are Feb 26..Mar 1.
        context = dg.build_schedule_context(
            instance=instance, scheduled_execution_time=datetime(2024, 3, 2, 8, 0, tzinfo=NY)
        )
        requests = stock_bars_weekly(context)
        assert isinstance(requests, list) and len(requests) == 2
        for request in requests:
            assert request.tags["dagster/asset_partition_range_start"] == "2024-02-01|AAPL"
            assert request.tags["dagster/asset_partition_range_end"] == "2024-03-01|AAPL"
            name = request.asset_selection[0].to_user_string()
            assert request.run_config["ops"][name]["config"]["new_days_only"] is False


def test_freshness_runs_on_its_own_schedule_and_never_in_a_bars_run() -> None:
    freshness = {spec.freshness_check_key for spec in ALL_BARS_ASSETS}
    with dg.instance_for_test():  # resolving reads the current instance
        graph = dg.Definitions(
            assets=bars_assets,
            jobs=[*REFRESH_JOBS.values(), *FRESHNESS_JOBS.values()],
            resources={"warehouse": WarehouseResource(), "polygon": PolygonResource()},
        ).resolve_asset_graph()
    for market in Market:
        refresh = REFRESH_JOBS[market].selection.resolve_checks(graph)
        checks = FRESHNESS_JOBS[market].selection.resolve_checks(graph)
        assert not refresh & freshness
        assert checks and checks <= freshness
        assert {key.asset_key.to_user_string().split("_")[0] for key in checks} == {market}
    assert stock_bars_freshness.cron_schedule == "30 21 * * 1-5"
    # One truth about freshness in the UI: the per-symbol check, no asset-wide policy beside it.
    for asset in bars_assets:
        assert all(spec.freshness_policy is None for spec in asset.specs)


def test_schedule_timing() -> None:
    assert stock_bars_after_close.cron_schedule == "30 20 * * 1-5"
    assert stock_bars_after_close.execution_timezone == "America/New_York"
    assert crypto_bars_daily.execution_timezone == "UTC"
