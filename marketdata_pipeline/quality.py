"""Quality measures behind the asset checks: rejection rate, missing sessions, coverage."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import polars as pl

from marketdata_pipeline.market_calendar import NEW_YORK, sessions

MAX_REJECTION_RATE = 0.01
STOCK_MINUTES_PER_SESSION = 16 * 60  # 04:00-20:00 New York, extended hours included
CRYPTO_MINUTES_PER_DAY = 24 * 60


def rejection_rate(loaded: int, rejected: int) -> float:
    total = loaded + rejected
    return rejected / total if total else 0.0


def expected_days(asset_class: str, first: date, last: date, today: date) -> list[date]:
    """Sessions (stocks) or days (crypto) in [first, last] that are already over."""
    return [d for d in sessions(asset_class, first, min(last, today)) if d < today]


def zone(asset_class: str) -> ZoneInfo:
    return ZoneInfo("UTC" if asset_class == "crypto" else NEW_YORK)


def bar_days(asset_class: str, ts: pl.Series) -> set[date]:
    return set(ts.dt.convert_time_zone(zone(asset_class).key).dt.date().unique().to_list())


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
    asset_class: str,
    timeframe: str,
    first: date,
    last: date,
    ts: pl.Series,
    now: datetime | None = None,
) -> Coverage:
    """How many of the expected days and bars of [first, last] the stored bars cover."""
    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    days = expected_days(asset_class, first, last, today)
    present = bar_days(asset_class, ts)
    missing = [d for d in days if d not in present]
    if timeframe == "daily":
        per_day = 1
    else:
        per_day = CRYPTO_MINUTES_PER_DAY if asset_class == "crypto" else STOCK_MINUTES_PER_SESSION
    return Coverage(len(days), missing, len(days) * per_day, ts.len())
