"""Trading calendars: NYSE sessions for stocks and ETFs, every day for crypto."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

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


EXTENDED_CLOSE = time(20, 0)  # minute bars run until 20:00 New York


def last_complete_session(asset_class: str, now: datetime) -> date:
    """The latest day whose bars are all published: for stocks the last NYSE session whose
    extended hours have ended, for crypto the last full UTC day."""
    if asset_class == "crypto":
        return now.astimezone(UTC).date() - timedelta(days=1)
    local = now.astimezone(ZoneInfo(NEW_YORK))
    candidates = nyse_sessions(local.date() - timedelta(days=14), local.date())
    complete = [d for d in candidates if d < local.date() or local.time() >= EXTENDED_CLOSE]
    return complete[-1]


def is_first_of_month(asset_class: str, day: date) -> bool:
    """Whether `day` is the first session (stocks) or day (crypto) of its month."""
    return sessions(asset_class, day.replace(day=1), day)[0] == day
