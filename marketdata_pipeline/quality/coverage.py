"""Quality measures behind the asset checks: rejection rate, missing sessions, coverage."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

import polars as pl

from marketdata_pipeline import clock
from marketdata_pipeline.domain import Market, Timeframe
from marketdata_pipeline.quality.calendars import last_complete_session, sessions, trading_hours

MAX_REJECTION_RATE = 0.01


def rejection_rate(loaded: int, rejected: int) -> float:
    total = loaded + rejected
    return rejected / total if total else 0.0


def expected_days(market: Market, first: date, last: date, through: date) -> list[date]:
    """Sessions (stocks) or days (crypto) in [first, last] up to the complete one `through`."""
    return sessions(market, first, min(last, through))


@dataclass(frozen=True)
class Coverage:
    expected_days: int
    missing_days: list[date]
    expected_bars: int
    bars: int  # bars that count against `expected_bars` (see `coverage`)

    @property
    def ratio(self) -> float | None:
        """Share of the expected bars present, never above 1; None when none were due."""
        return self.bars / self.expected_bars if self.expected_bars else None


def coverage(
    market: Market,
    timeframe: Timeframe,
    first: date,
    last: date,
    ts: pl.Series,
    now: datetime | None = None,
) -> Coverage:
    """How many of the expected bars of [first, last] are there.

    Daily: one bar per finished session (stocks) or day (crypto). Minute: one bar per minute
    of regular trading hours (09:30-16:00 New York, shorter on half days; all day for
    crypto); extended-hours minutes are sparse on the provider and expected of no one. Only
    complete days count (`last_complete_session`: a session is complete once its extended
    hours end) and a bar counts once, so the figure never passes 1.
    """
    through = last_complete_session(market, now or clock.now())
    days = expected_days(market, first, last, through)
    bar_days = ts.dt.convert_time_zone(market.zone.key).dt.date()
    present = set(bar_days.unique().to_list())
    missing = [d for d in days if d not in present]
    if timeframe is Timeframe.DAILY:
        return Coverage(len(days), missing, len(days), len(days) - len(missing))
    if not days:  # nothing complete yet (the evening before a month's first session ends)
        return Coverage(0, [], 0, 0)
    hours = trading_hours(market, days[0], days[-1])
    opens = pl.Series([o for _, o, _ in hours], dtype=pl.Datetime("us", "UTC"))
    closes = pl.Series([c for _, _, c in hours], dtype=pl.Datetime("us", "UTC"))
    expected = int(sum((close - opened).total_seconds() // 60 for _, opened, close in hours))
    minutes = ts.cast(pl.Datetime("us", "UTC")).dt.truncate("1m").unique()
    session = opens.search_sorted(minutes, side="right").cast(pl.Int64) - 1
    inside = (session >= 0) & (minutes < closes.gather(session.clip(lower_bound=0)))
    return Coverage(len(days), missing, expected, int(inside.sum()))
