"""Trading calendars: NYSE sessions for stocks and ETFs, every day for crypto."""

from __future__ import annotations

from datetime import date, timedelta
from functools import lru_cache

import exchange_calendars
import pandas as pd

NEW_YORK = "America/New_York"
_CALENDAR_START = "1990-01-01"


@lru_cache(maxsize=1)
def nyse() -> exchange_calendars.ExchangeCalendar:
    # Default bounds reach only 20 years back; Polygon's stock history is older.
    end = (pd.Timestamp.today() + pd.DateOffset(years=1)).strftime("%Y-%m-%d")
    return exchange_calendars.get_calendar("XNYS", start=_CALENDAR_START, end=end)


def nyse_sessions(first: date, last: date) -> list[date]:
    """NYSE trading days in [first, last]."""
    if last < first:
        return []
    return [ts.date() for ts in nyse().sessions_in_range(first.isoformat(), last.isoformat())]


def every_day(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def sessions(asset_class: str, first: date, last: date) -> list[date]:
    """The days that should have a daily bar for this asset class."""
    return every_day(first, last) if asset_class == "crypto" else nyse_sessions(first, last)
