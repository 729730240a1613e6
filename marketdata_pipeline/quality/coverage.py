"""Quality measures behind the asset checks: rejection rate, missing sessions, coverage."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

import polars as pl

from marketdata_pipeline.domain import Market, Timeframe
from marketdata_pipeline.quality.calendars import sessions

MAX_REJECTION_RATE = 0.01


def rejection_rate(loaded: int, rejected: int) -> float:
    total = loaded + rejected
    return rejected / total if total else 0.0


def expected_days(market: Market, first: date, last: date, today: date) -> list[date]:
    """Sessions (stocks) or days (crypto) in [first, last] that are already over."""
    return [d for d in sessions(market, first, min(last, today)) if d < today]


def bar_days(market: Market, ts: pl.Series) -> set[date]:
    return set(ts.dt.convert_time_zone(market.zone.key).dt.date().unique().to_list())


@dataclass(frozen=True)
class Coverage:
    expected_days: int
    missing_days: list[date]
    expected_bars: int
    bars: int

    @property
    def ratio(self) -> float:
        return self.bars / self.expected_bars if self.expected_bars else 1.0


def coverage(
    market: Market,
    timeframe: Timeframe,
    first: date,
    last: date,
    ts: pl.Series,
    now: datetime | None = None,
) -> Coverage:
    """How many of the expected days and bars of [first, last] the stored bars cover."""
    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    days = expected_days(market, first, last, today)
    present = bar_days(market, ts)
    missing = [d for d in days if d not in present]
    per_day = 1 if timeframe is Timeframe.DAILY else market.minutes_per_day
    return Coverage(len(days), missing, len(days) * per_day, ts.len())
