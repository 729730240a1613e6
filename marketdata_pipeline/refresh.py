"""Which months the schedules refresh."""

from __future__ import annotations

from datetime import date, datetime, timedelta

from marketdata_pipeline.market_calendar import is_first_of_month, last_complete_session


def refresh_months(asset_class: str, now: datetime) -> list[date]:
    """The month holding the last complete session (stocks) or day (crypto), and the month
    before when that day opens its month (late corrections to the previous month's end)."""
    day = last_complete_session(asset_class, now)
    month = day.replace(day=1)
    if is_first_of_month(asset_class, day):
        return [(month - timedelta(days=1)).replace(day=1), month]
    return [month]
