"""A symbol's warehouse statistics: bars per timeframe, span, validation rate, calendar gaps."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

import psycopg
from psycopg import sql

from marketdata_pipeline.domain import Timeframe
from marketdata_pipeline.quality.coverage import expected_days
from marketdata_pipeline.registry.symbols import TrackedSymbol, get


@dataclass(frozen=True)
class TimeframeStats:
    timeframe: Timeframe
    bars: int
    first_bar: datetime | None
    last_bar: datetime | None
    rejected: int
    missing_days: list[date] | None  # sessions (stocks) or days (crypto) without a bar
    # between the first and the last; None without bars (nothing to measure between)

    @property
    def validation_rate(self) -> float | None:
        """Share of received bars that passed; None when there were none."""
        total = self.bars + self.rejected
        return self.bars / total if total else None


def stats(conn: psycopg.Connection, symbol: str) -> tuple[TrackedSymbol, list[TimeframeStats]]:
    """Per timeframe: bars, first and last bar, validation rate, days missing in between."""
    tracked = get(conn, symbol)
    market = tracked.asset_class.market
    result = []
    for timeframe in Timeframe:
        table = sql.Identifier(timeframe.table)
        days_query = sql.SQL(
            "SELECT (ts AT TIME ZONE %s)::date, count(*) FROM {} WHERE symbol = %s GROUP BY 1"
        ).format(table)
        per_day: dict[date, int] = dict(conn.execute(days_query, (market.zone.key, tracked.symbol)))
        span = conn.execute(
            sql.SQL("SELECT min(ts), max(ts) FROM {} WHERE symbol = %s").format(table),
            (tracked.symbol,),
        ).fetchone()
        rejected = conn.execute(
            "SELECT count(*) FROM bars_rejected WHERE timeframe = %s AND symbol = %s",
            (timeframe, tracked.symbol),
        ).fetchone()
        missing: list[date] | None = None
        if per_day:
            first_day, last_day = min(per_day), max(per_day)
            expected = expected_days(market, first_day, last_day, last_day)
            missing = [d for d in expected if d not in per_day]
        result.append(
            TimeframeStats(
                timeframe,
                sum(per_day.values()),
                span[0] if span else None,
                span[1] if span else None,
                rejected[0] if rejected else 0,
                missing,
            )
        )
    return tracked, result
