"""Which months the schedules refresh, around month ends, weekends and holidays."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from marketdata_pipeline.defs.schedules import crypto_bars_daily, stock_bars_after_close
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


def test_schedules_request_every_registered_symbol() -> None:
    with dg.instance_for_test() as instance:
        context = dg.build_schedule_context(
            instance=instance, scheduled_execution_time=datetime(2024, 3, 1, 20, 30, tzinfo=NY)
        )
        assert isinstance(stock_bars_after_close(context), dg.SkipReason)
        instance.add_dynamic_partitions("stock_symbols", ["MSFT", "AAPL"])
        requests = stock_bars_after_close(context)
        assert isinstance(requests, list)
        assert [r.partition_key for r in requests] == [
            "2024-02-01|AAPL", "2024-02-01|MSFT", "2024-03-01|AAPL", "2024-03-01|MSFT"
        ]  # fmt: skip
        assert len({r.run_key for r in requests}) == 4

        instance.add_dynamic_partitions("crypto_symbols", ["BTC"])
        crypto = dg.build_schedule_context(
            instance=instance, scheduled_execution_time=datetime(2024, 7, 10, 0, 30, tzinfo=UTC)
        )
        crypto_requests = crypto_bars_daily(crypto)
        assert isinstance(crypto_requests, list)
        assert [r.partition_key for r in crypto_requests] == ["2024-07-01|BTC"]


def test_schedule_timing() -> None:
    assert stock_bars_after_close.cron_schedule == "30 20 * * 1-5"
    assert stock_bars_after_close.execution_timezone == "America/New_York"
    assert crypto_bars_daily.execution_timezone == "UTC"
