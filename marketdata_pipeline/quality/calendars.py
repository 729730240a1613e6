"""Trading calendars: NYSE sessions for stocks and ETFs, every day for crypto."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache

import exchange_calendars
import pandas as pd

from marketdata_pipeline.domain import Market

_CALENDAR_START = "1990-01-01"
EXTENDED_CLOSE = time(20, 0)  # stock minute bars run until 20:00 New York
ONE_DAY = timedelta(days=1)


@lru_cache(maxsize=2)
def _calendar(name: str) -> exchange_calendars.ExchangeCalendar:
    # Default bounds reach only 20 years back; Polygon's stock history is older.
    end = (pd.Timestamp.today() + pd.DateOffset(years=1)).strftime("%Y-%m-%d")
    return exchange_calendars.get_calendar(name, start=_CALENDAR_START, end=end)


def sessions(market: Market, first: date, last: date) -> list[date]:
    """The days in [first, last] that should have a daily bar in this market."""
    if last < first:
        return []
    if market.exchange_calendar is None:
        return [first + timedelta(days=i) for i in range((last - first).days + 1)]
    calendar = _calendar(market.exchange_calendar)
    # exchange_calendars raises for a day outside the calendar's bounds: none are sessions.
    first = max(first, calendar.first_session.date())
    last = min(last, calendar.last_session.date())
    if last < first:
        return []
    return [ts.date() for ts in calendar.sessions_in_range(first.isoformat(), last.isoformat())]


def trading_hours(market: Market, first: date, last: date) -> list[tuple[date, datetime, datetime]]:
    """Each session of [first, last] with its regular trading hours [open, close) in UTC: the
    exchange's (a half day closes early), or the whole day where the market never closes."""
    if market.exchange_calendar is None:
        return [
            (
                day,
                datetime.combine(day, time(0), UTC),
                datetime.combine(day, time(0), UTC) + ONE_DAY,
            )
            for day in sessions(market, first, last)
        ]
    if last < first:
        return []
    schedule = _calendar(market.exchange_calendar).schedule.loc[
        first.isoformat() : last.isoformat()
    ]
    return [
        (label.date(), opened.to_pydatetime(), closed.to_pydatetime())
        for label, opened, closed in zip(
            schedule.index, schedule["open"], schedule["close"], strict=True
        )
    ]


def last_complete_session(market: Market, now: datetime) -> date:
    """The latest day whose bars are all published: for stocks the last NYSE session whose
    extended hours have ended, for crypto the last full UTC day."""
    local = now.astimezone(market.zone)
    if market.exchange_calendar is None:
        return local.date() - timedelta(days=1)
    candidates = sessions(market, local.date() - timedelta(days=14), local.date())
    complete = [d for d in candidates if d < local.date() or local.time() >= EXTENDED_CLOSE]
    return complete[-1]


def refresh_months(market: Market, now: datetime) -> list[date]:
    """The month holding the last complete session (stocks) or day (crypto), and the month
    before when that day opens its month (late corrections to the previous month's end)."""
    day = last_complete_session(market, now)
    month = day.replace(day=1)
    if sessions(market, month, day)[0] == day:
        return [(month - timedelta(days=1)).replace(day=1), month]
    return [month]
